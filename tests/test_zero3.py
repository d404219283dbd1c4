"""DeepSpeed ZeRO-3 on two CPU processes (gloo), through the functions Lightning's DeepSpeedStrategy reaches in
training (it refuses CPUs, so DeepSpeed's engine is driven directly): the checkpoint is loaded straight into each
rank's slices, LoRA / DoRA / full fine-tuning train with the losses of one process on the same global batch, and
the adapter or model written from gathered tensors is whole and reloads with `from_pretrained`."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")

ADAPTERS = ("lora", "dora", "full")
STEPS = 3


def ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        # every parameter partitioned, however small (the tiny model's are all under the default threshold)
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0, "torch_adam": True}},
        "steps_per_print": 10**9,
    }


def batches(rank: int) -> list[dict]:
    """Rank `rank`'s batch of each step: 2 rows of 24 tokens, all trained (the global batch is both ranks')."""
    generator = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(20, 3000, (STEPS, 2, 24), generator=generator)
    return [{"input_ids": x, "labels": x} for x in ids]


def adapter_config(name: str):
    from telechat_lab.config import AdapterConfig

    return AdapterConfig(type=name, use_dora=name == "dora", rank=4, alpha=8)


def worker(rank: int, port: int, base: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_SIZE="2", DS_ACCELERATOR="cpu")
    import deepspeed
    from safetensors.torch import load_file

    from telechat_lab.config import ModelConfig
    from telechat_lab.training.adapters import apply_adapter, count_parameters
    from telechat_lab.training.checkpoints import save_model, trained_parameters_finite
    from telechat_lab.training.module import load_base_model
    from telechat_lab.training.zero import created_whole, gathered_state_dict, partitioned_loading

    deepspeed.init_distributed(dist_backend="gloo")
    report = {}
    for name in ADAPTERS:
        config, cfg = ds_config(), adapter_config(name)
        # as TelechatLitModule.configure_model runs inside the zero.Init Lightning opens
        with deepspeed.zero.Init(config_dict_or_path=config), partitioned_loading(config):
            model = load_base_model(Path(base), ModelConfig(dtype="float32"), cfg)
            with created_whole(config):
                torch.manual_seed(0)  # the adapter's init: as in one_process_losses, the same on every rank
                model = apply_adapter(model, cfg).train()
        loaded = load_file(Path(base) / "model.safetensors")
        state = gathered_state_dict(model, trained_only=False)
        engine, *_ = deepspeed.initialize(
            model=model, config=config, model_parameters=[p for p in model.parameters() if p.requires_grad]
        )
        params = list(model.named_parameters())
        losses = []
        for batch in batches(rank):
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        trained = gathered_state_dict(model, trained_only=name != "full")
        result = {
            "partitioned": all(p.numel() == 0 and p.ds_numel > 0 for _, p in params),
            "counts": count_parameters(model),
            "finite": trained_parameters_finite(model),
            "losses": losses,
        }
        if rank == 0:
            # the base's tensors, loaded into the slices, come back whole
            base_keys = {k: k.replace("base_model.model.", "").replace(".base_layer", "") for k in state}
            result["loaded_exactly"] = all(
                torch.equal(state[k], loaded[base_keys[k]]) for k in state if base_keys[k] in loaded
            )
            result["loaded_keys"] = sum(base_keys[k] in loaded for k in state)
            directory = Path(out) / name
            directory.mkdir(parents=True)
            save_model(model, directory, Path(base), trained)
            torch.save(trained, Path(out) / f"{name}.pt")
        report[name] = result
        del engine, model
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process_losses(base: Path, name: str) -> list[float]:
    """The same steps in one process, no DeepSpeed: both ranks' rows as one batch, torch's AdamW."""
    from telechat_lab.config import ModelConfig
    from telechat_lab.training.adapters import apply_adapter
    from telechat_lab.training.module import load_base_model

    cfg = adapter_config(name)
    model = load_base_model(base, ModelConfig(dtype="float32"), cfg)
    torch.manual_seed(0)
    model = apply_adapter(model, cfg).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        both = [batches(rank)[step] for rank in (0, 1)]
        batch = {k: torch.cat([b[k] for b in both]) for k in both[0]}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.slow
def test_zero3_loads_partitioned_trains_like_one_process_and_writes_whole_weights(tmp_path):
    from peft import PeftModel

    from telechat_lab.config import ModelConfig
    from telechat_lab.resolve import model_dir
    from telechat_lab.training.adapters import apply_adapter, count_parameters
    from telechat_lab.training.module import load_base_model

    base = model_dir(None)
    torch.multiprocessing.spawn(worker, args=(free_port(), str(base), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in ADAPTERS:
        cfg = adapter_config(name)
        plain = apply_adapter(load_base_model(base, ModelConfig(dtype="float32"), cfg), cfg)
        for report in ranks:
            assert report[name]["partitioned"] and report[name]["finite"], name
            assert tuple(report[name]["counts"]) == count_parameters(plain), name
        assert ranks[0][name]["loaded_exactly"] and ranks[0][name]["loaded_keys"] > 0, name
        # ZeRO-3 averages the ranks' gradients: with equal token counts that is the one-batch mean
        global_losses = [(a + b) / 2 for a, b in zip(ranks[0][name]["losses"], ranks[1][name]["losses"])]
        assert global_losses == pytest.approx(one_process_losses(base, name), rel=2e-5), name

        written = torch.load(tmp_path / f"{name}.pt")
        assert written and all(t.numel() > 0 for t in written.values()), name
        if name == "full":
            reloaded = dict(type(plain).from_pretrained(tmp_path / name).named_parameters())
        else:
            peft = PeftModel.from_pretrained(load_base_model(base, ModelConfig(dtype="float32"), cfg), tmp_path / name)
            reloaded = {k: p for k, p in peft.named_parameters() if "lora_" in k}
            assert len(reloaded) == len(written), name
        for key, tensor in written.items():
            assert torch.equal(reloaded[key], tensor), (name, key)
        lora_b = [t for k, t in written.items() if "lora_B" in k]
        assert name == "full" or any(bool(t.abs().sum() > 0) for t in lora_b), name  # trained, not the init

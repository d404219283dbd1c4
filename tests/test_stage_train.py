"""The stage settings (validation, resume), the reference policy of each setup (adapters disabled, an SFT run's
adapter merged, a frozen copy, none), the memory it costs, and a short dpo / kto run end to end through
training.run.train on a synthetic batch source of the data contract's shape (the stage data module is another
part of the work; this one yields exactly its batches)."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import QUICK, compose_train, make_adapter, run_train
from test_preference import kto_batch, pairs_batch

from telechat_lab.config import AdapterConfig, ModelConfig, OptimConfig
from telechat_lab.config.schema import StageConfig
from telechat_lab.config.validate import config_problems
from telechat_lab.errors import CheckpointError, ConfigError
from telechat_lab.stages import settings
from telechat_lab.training.module import TelechatLitModule
from telechat_lab.training.objectives import sequence_logps
from telechat_lab.training.preference import IGNORE
from telechat_lab.training.run import train

# ------------------------------------------------------------------------------------------------ the settings


def problems(*overrides):
    return config_problems(compose_train(list(overrides)), cuda_available=False)


def test_every_stage_with_its_defaults_is_valid_and_the_defaults_are_trls():
    for stage in ("sft", "pt", "dpo", "kto"):
        assert problems(f"stage={stage}") == [], stage
    dpo = settings(compose_train(["stage=dpo"]).stage)
    assert dpo["loss"] == "sigmoid" and dpo["beta"] == 0.1 and dpo["simpo_gamma"] == 0.5 and dpo["sft_weight"] == 0
    assert settings(compose_train(["stage=kto"]).stage)["desirable_weight"] == 1.0
    assert settings(compose_train(["stage=sft"]).stage) == {"name": "sft"}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["stage.loss=orpo"], "stage.loss=orpo: stage=sft has no loss (it is for stage=dpo)"),
        (["stage=pt", "stage.beta=0.1"], "stage.beta=0.1: stage=pt has no beta (it is for stage=dpo|kto)"),
        (["stage=dpo", "stage.simpo_gamma=1"], "stage.simpo_gamma=1.0: stage.loss=sigmoid does not use it"),
        (["stage=dpo", "stage.desirable_weight=2"], "stage.desirable_weight=2.0: stage=dpo has no desirable_weight"),
        (["stage=dpo", "stage.loss=ipo", "stage.label_smoothing=0.1"], "stage.loss=ipo does not use it"),
        (["stage=dpo", "stage.loss=orpo", "stage.sft_weight=1"], "ORPO's loss holds its own SFT term"),
        (["stage=dpo", "stage.loss=simpo", "stage.precompute_reference=true"], "stage.loss=simpo is reference-free"),
        (["stage=dpo", "stage.label_smoothing=0.5"], "stage.label_smoothing=0.5: must be below 0.5"),
        (["stage=dpo", "stage.beta=0"], "stage.beta=0.0: must be greater than 0"),
        (["stage=kto", "stage.reference=/no/such/run"], "stage.reference=/no/such/run: neither an adapter"),
        (["stage=dpo", "stage.loss=dpo"], "stage.loss='dpo': expected one of sigmoid, ipo, orpo, simpo"),
    ],
)
def test_a_contradiction_is_one_message(overrides, expected):
    found = problems(*overrides)
    assert len(found) == 1 and expected in found[0], found


def test_a_full_parameter_reference_under_zero3_needs_precomputing():
    zero3 = ["stage=dpo", "adapter=full", "hardware=deepspeed_zero3"]
    found = config_problems(compose_train(zero3), cuda_available=True)
    assert any("stage.precompute_reference=true" in p for p in found), found
    found = config_problems(compose_train([*zero3, "stage.precompute_reference=true"]), cuda_available=True)
    assert not any("precompute_reference" in p for p in found), found


def test_a_stage_change_is_refused_on_resume(tmp_path):
    run_train(tmp_path, "trainer.max_steps=1")
    for change in (["stage=dpo"], ["stage=pt"]):
        with pytest.raises(ConfigError, match=r"stage\.name: sft -> "):
            run_train(tmp_path, "trainer.max_steps=2", "resume=true", *change)


# ------------------------------------------------------------------------------------------------ the reference


def module_for(model_dir, stage: StageConfig, adapter: AdapterConfig | None = None, seed: int = 0):
    torch.manual_seed(seed)
    module = TelechatLitModule(model_dir, ModelConfig(), adapter or AdapterConfig(), OptimConfig(), stage=stage)
    module.configure_model()
    return module


def storages(module) -> dict[int, int]:
    """Every tensor the module (and its reference) holds, by storage: {data_ptr: bytes}."""
    tensors = list(module.parameters()) + list(module.buffers())
    if getattr(module, "reference", None) is not None and module.reference.copy is not None:
        tensors += list(module.reference.copy.parameters()) + list(module.reference.copy.buffers())
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def test_lora_dpo_holds_one_copy_of_the_base_weights(tiny_dir):
    from telechat_lab.model.loading import load_model

    base = load_model(tiny_dir, torch.float32)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    for stage in (StageConfig(), StageConfig(name="dpo"), StageConfig(name="kto")):
        module = module_for(tiny_dir, stage)
        held = sum(storages(module).values())
        trained = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
        buffers = sum(b.untyped_storage().nbytes() for b in module.buffers())
        assert held == base_bytes + trained + buffers, stage.name  # the base once, the adapter, rotary buffers
        assert stage.name == "sft" or module.reference.copy is None
    full = module_for(tiny_dir, StageConfig(name="dpo"), AdapterConfig(type="full"))
    assert sum(storages(full).values()) >= 2 * base_bytes  # full fine-tuning: the frozen reference copy


def batch_logps(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).total


def test_the_reference_of_a_dpo_run_from_an_sft_adapter_is_the_sft_policy_never_the_bare_base(tiny_dir, tmp_path):
    from peft import PeftModel

    from telechat_lab.model.loading import load_model

    sft = make_adapter(tiny_dir, tmp_path / "sft", seed=3)
    batch = pairs_batch(seed=11)
    bare = batch_logps(load_model(tiny_dir, torch.float32), batch)
    sft_policy = batch_logps(PeftModel.from_pretrained(load_model(tiny_dir, torch.float32), str(sft)), batch)
    assert not torch.allclose(bare, sft_policy, atol=1e-3)  # the adapter matters on this batch

    module = module_for(tiny_dir, StageConfig(name="dpo", reference=str(sft)))
    torch.testing.assert_close(module.reference.compute(**_rows(batch)), sft_policy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch_logps(module.model, batch), sft_policy, rtol=1e-5, atol=1e-5)  # the start
    total, stats = module.objective.summed(dict(batch))
    assert float(total.detach()) / 3 == pytest.approx(math.log(2), abs=1e-6)
    assert float(stats["rewards/chosen"][0]) == 0.0


def _rows(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}


def test_full_parameter_dpo_keeps_a_frozen_reference(tiny_dir):
    module = module_for(tiny_dir, StageConfig(name="dpo"), AdapterConfig(type="full"))
    batch = pairs_batch(seed=12)
    before = module.reference.compute(**_rows(batch))
    optimizer = torch.optim.SGD([p for p in module.model.parameters() if p.requires_grad], lr=0.5)
    total, _ = module.objective.summed(dict(batch))
    total.backward()
    optimizer.step()
    torch.testing.assert_close(module.reference.compute(**_rows(batch)), before)
    assert not torch.allclose(batch_logps(module.model, batch), before, atol=1e-3)  # the policy moved
    assert not any(p.requires_grad for p in module.reference.copy.parameters())
    assert all(n.startswith("model.") for n, _ in module.named_parameters())  # the copy is no parameter of ours


def test_reference_free_losses_build_no_reference(tiny_dir):
    for loss in ("orpo", "simpo"):
        module = module_for(tiny_dir, StageConfig(name="dpo", loss=loss), AdapterConfig(type="full"))
        assert module.reference is None
        assert sum(storages(module).values()) < 1.5 * sum(p.numel() * 4 for p in module.model.parameters())


# ------------------------------------------------------------------------------------------------ end to end


class ResumedOrder(torch.utils.data.Sampler):
    """The batches in order, a resumed epoch continuing after those done (its length the whole epoch's, as
    Lightning counts a resumed epoch's batches from its progress)."""

    def __init__(self, n: int):
        self.n, self.skip = n, 0

    def __iter__(self):
        start, self.skip = self.skip, 0
        return iter(range(start, self.n))

    def __len__(self):
        return self.n


class SyntheticStageData(L.LightningDataModule):
    """Batches of the data contract's shape for stage=dpo / kto, in place of the stage data module: pairs whose
    chosen reply is always the same few tokens and whose rejected one is random (a preference a few steps learn),
    `step_examples` the pairs (examples) of each optimizer step over every rank."""

    def __init__(self, data, model_dir, kind: str = "pairwise"):
        super().__init__()
        self.cfg, self.kind = data, kind  # `kind`: the stage data module's attribute (contract_stages.md)
        self.report = {"train": {"examples": 24}, "fingerprint": {}}
        self.val_set = True if data.val_size else None
        g = torch.Generator().manual_seed(0)
        self.batches = [self._batch(g) for _ in range(6)]
        self.sampler = ResumedOrder(len(self.batches))
        self.val_batches = [self._batch(g) for _ in range(2)]

    def _batch(self, g):
        b = self.cfg.batch_size
        prompts = [torch.randint(5, 400, (4,), generator=g).tolist() for _ in range(b)]
        good = [[7, 8, 9, 10]] * b
        bad = [torch.randint(400, 800, (4,), generator=g).tolist() for _ in range(b)]
        if self.kind == "pairwise":
            rows = [p + r for p, r in zip(prompts, good)] + [p + r for p, r in zip(prompts, bad)]
            ids = torch.tensor(rows)
            labels = ids.clone()
            labels[:, :4] = IGNORE
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        batch, _ = kto_batch(seed=int(torch.randint(0, 1000, (1,), generator=g)), n=b)
        return batch

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None, sampler=self.sampler)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_batches, batch_size=None) if self.val_set else []

    def on_before_batch_transfer(self, batch, dataloader_idx):
        batch = dict(batch)
        trainer = self.trainer
        if trainer is not None and trainer.training:
            per_batch = batch["input_ids"].shape[0] // (2 if self.kind == "pairwise" else 1)
            batch["step_examples"] = torch.tensor(float(per_batch * trainer.accumulate_grad_batches))
        return batch

    def state_dict(self):
        return {"done": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state):
        self.sampler.skip = int(state["done"])


def metrics_rows(out: Path, newest: bool = False) -> list[dict]:
    """The run's CSV metrics (`newest`: those its last resume wrote, in logs/resumed-*)."""
    files = sorted(out.glob("logs/**/metrics.csv"), key=lambda f: f.stat().st_mtime)
    assert files, list(out.rglob("*"))
    with open(files[-1] if newest else files[0]) as f:
        return list(csv.DictReader(f))


def column(rows, name) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name) not in (None, "")]


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_a_short_preference_run_logs_trls_metrics_and_saves_its_adapter(tmp_path, monkeypatch, stage):
    synthetic(monkeypatch, "pairwise" if stage == "dpo" else "kto")
    out = tmp_path / "run"
    metrics = run_train(
        out, f"stage={stage}", "stage.beta=0.5", "trainer.max_steps=6", "data.val_size=2", "optim.lr=5e-3"
    )
    assert metrics["steps"] == 6 and (out / "adapter_config.json").is_file()
    rows = metrics_rows(out)
    names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]
    names += ["rewards/accuracies"] if stage == "dpo" else ["kl"]
    for name in names:
        assert len(column(rows, f"train/{name}")) == 6, name
        assert column(rows, f"val/{name}"), name
    losses = column(rows, "train/loss")
    assert len(losses) == 6 and column(rows, "val/loss")
    if stage == "dpo":
        assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # LoRA init: policy == reference
        assert column(rows, "train/rewards/chosen")[0] == 0.0
        assert column(rows, "train/rewards/accuracies")[-1] > 0.5  # the fixed chosen reply is learnt
        assert losses[-1] < losses[0]


def test_step_loss_is_the_mean_over_the_steps_pairs_however_accumulated(tiny_dir):
    """Two accumulated batches of one step give the loss and gradients of the one batch holding both."""
    module = module_for(tiny_dir, StageConfig(name="dpo", beta=0.4))
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    whole = pairs_batch(seed=13, pairs=4)

    def half(rows):
        return {k: torch.cat([v[rows], v[[r + 4 for r in rows]]]) for k, v in whole.items()}

    total, _ = module.objective.summed(dict(whole))
    (total / 4).backward()
    expected = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    module.model.zero_grad()
    parts = 0.0
    for rows in ([0, 1], [2, 3]):
        share, _ = module.objective.summed(half(rows))
        (share / 4).backward()
        parts += float(share.detach()) / 4
    assert parts == pytest.approx(float(total.detach()) / 4, rel=1e-5)
    for n, p in module.model.named_parameters():
        if n in expected:
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-7)


def synthetic(monkeypatch, kind: str = "pairwise") -> None:
    import telechat_lab.training.datamodule as datamodule

    monkeypatch.setattr(
        datamodule, "TelechatDataModule", lambda data, model_dir, **_: SyntheticStageData(data, model_dir, kind)
    )


def test_precomputed_reference_trains_as_the_frozen_copy_does_and_is_cached(tmp_path, monkeypatch, capsys):
    """Full-parameter DPO: precomputing the reference gives the losses of the frozen reference copy, with one model
    in memory; a second run on the same model and data reads the cache."""
    synthetic(monkeypatch)
    common = ["stage=dpo", "adapter=full", "trainer.max_steps=3", "data.val_size=2", "optim.lr=1e-3"]
    run_train(tmp_path / "copy", *common)
    run_train(tmp_path / "pre", *common, "stage.precompute_reference=true")
    copy_rows, pre_rows = metrics_rows(tmp_path / "copy"), metrics_rows(tmp_path / "pre")
    for name in ("train/loss", "train/rewards/margins", "val/loss"):
        assert column(pre_rows, name) == pytest.approx(column(copy_rows, name), rel=1e-5, abs=1e-6), name
    cached = list((tmp_path / "pre" / "cache" / "reference_logps").glob("*.pt"))
    assert len(cached) == 1
    rows = (6 + 2) * 4 * 2  # (train + val batches) * 4 pairs * (chosen, rejected), all different
    assert f"precomputing the reference log-probabilities of {rows} sequences" in capsys.readouterr().out
    again = tmp_path / "again"
    overrides = [*QUICK, *common, "stage.precompute_reference=true", f"output_dir={again}"]
    overrides.append(f"data.cache_dir={tmp_path / 'pre' / 'cache'}")  # the first run's cache
    train(compose_train(overrides), overrides)
    out = capsys.readouterr().out
    assert "precomputing" not in out
    assert f"reference log-probabilities of {rows} sequences: {cached[0]}" in out


def test_kto_refuses_precomputing_its_reference():
    found = problems("stage=kto", "stage.precompute_reference=true")
    assert len(found) == 1 and "changes every epoch" in found[0]


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_a_preference_run_resumes_exactly(tmp_path, monkeypatch, stage):
    """Interrupted after 3 steps and resumed, a run ends as the uninterrupted one (as SFT's test, 6 batches an
    epoch: the resumed part crosses into the second epoch)."""
    from helpers import adapter_weights, losses

    synthetic(monkeypatch, "pairwise" if stage == "dpo" else "kto")
    common = [f"stage={stage}", "stage.beta=0.5", "data.val_size=0", "optim.lr=5e-3", "save_steps=1"]
    common.append("trainer.max_steps=8")
    run_train(tmp_path / "whole", *common)
    stop = ["+callbacks.stop._target_=helpers.StopAfter", "+callbacks.stop.step=3"]
    run_train(tmp_path / "split", *common, *stop)
    assert len(losses(tmp_path / "split")) == 3
    run_train(tmp_path / "split", *common, "resume=true", "+callbacks.stop=null")
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "whole"), abs=1e-6)
    whole, split = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "split")
    assert whole.keys() == split.keys() and whole
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-6, atol=1e-7)
    resumed = column(metrics_rows(tmp_path / "split", newest=True), "train/rewards/margins")
    assert resumed == pytest.approx(column(metrics_rows(tmp_path / "whole"), "train/rewards/margins")[3:], abs=1e-5)


def test_precomputing_keeps_one_model(tiny_dir):
    module = module_for(tiny_dir, StageConfig(name="dpo", precompute_reference=True), AdapterConfig(type="full"))
    assert module.reference is not None and module.reference.copy is None
    assert sum(storages(module).values()) < 1.5 * sum(p.numel() * 4 for p in module.model.parameters())


def test_chain_sft_then_dpo_from_its_adapter_then_merge_and_chat(tmp_path, monkeypatch, capsys):
    """sft -> dpo with stage.reference=the SFT run -> merge -> chat. The DPO run starts at the SFT policy (its
    first loss ln 2), and the adapter it saves, stacked onto the SFT one, is on its own the trained policy: base +
    that adapter (and the merged export) score as the training module's final policy does; merge says it holds
    both runs."""
    from peft import PeftModel

    from telechat_lab import api
    from telechat_lab.model.loading import load_model
    from telechat_lab.resolve import model_dir
    from telechat_lab.training.run import settings_of

    sft = tmp_path / "sft"
    api.train([*QUICK, "trainer.max_steps=2", "optim.lr=1e-2", f"output_dir={sft}", f"data.cache_dir={tmp_path}/c"])
    synthetic(monkeypatch)
    dpo = tmp_path / "dpo"
    run_train(dpo, "stage=dpo", f"stage.reference={sft}", "trainer.max_steps=2", "optim.lr=1e-2", "data.val_size=0")
    assert column(metrics_rows(dpo), "train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)

    base = model_dir(None)
    recorded = settings_of(yaml.safe_load((dpo / "config.yaml").read_text()))  # the run's own settings
    trained = TelechatLitModule(base, recorded.model, recorded.adapter, recorded.optim, stage=recorded.stage)
    trained.configure_model()
    state = torch.load(sorted((dpo / "checkpoints").glob("step-*.ckpt"))[-1], weights_only=True)["state_dict"]
    trained.load_state_dict(state, strict=False)
    batch = pairs_batch(seed=21)
    expected = batch_logps(trained.model, batch)
    assert not torch.allclose(expected, trained.reference.compute(**_rows(batch)), atol=1e-3)  # DPO moved it
    config = (dpo / "adapter_config.json").read_text()
    rank = 2 * recorded.adapter.rank  # stacked: the SFT run's rank + this run's (the same preset)
    assert f'"base_model_name_or_path": "{base}"' in config and f'"r": {rank}' in config
    stacked = PeftModel.from_pretrained(load_model(base, torch.float32), str(dpo))
    torch.testing.assert_close(batch_logps(stacked, batch), expected, rtol=1e-5, atol=1e-4)

    capsys.readouterr()
    export = api.merge([f"adapter_path={dpo}", f"export_dir={tmp_path / 'merged'}", "dtype=float32"])
    said = f"{dpo.resolve()} holds the SFT run {sft.resolve()} and the DPO training on top of it"
    assert said in capsys.readouterr().out
    twice = tmp_path / "twice"  # the SFT adapter listed as well: refused before anything is loaded or written
    refused = re.escape(f"lists {sft.resolve()} and {dpo.resolve()}, but {said}")
    with pytest.raises(CheckpointError, match=refused):
        api.merge([f"adapter_path=['{sft}','{dpo}']", f"export_dir={twice}"])
    with pytest.raises(CheckpointError, match=re.escape(f"lists {dpo.resolve()} twice")):
        api.merge([f"adapter_path=['{dpo}','{tmp_path}/./dpo']", f"export_dir={twice}"])
    assert not twice.exists()
    torch.testing.assert_close(batch_logps(load_model(export, torch.float32), batch), expected, rtol=1e-5, atol=1e-4)
    session = api.chat([f"model.path={export}", "generation.do_sample=false", "generation.max_new_tokens=4"])
    assert isinstance("".join(session.reply("Who are you?")), str) and len(session.turns) == 1


def test_a_precomputed_table_is_read_and_with_adapters_completed_where_it_lacks_a_row(tiny_dir):
    from telechat_lab.training.objectives import row_keys

    batch = pairs_batch(seed=22)
    lora = module_for(tiny_dir, StageConfig(name="dpo", precompute_reference=True))
    expected = lora.reference.compute(**_rows(batch))
    keys = row_keys(batch["input_ids"], batch["attention_mask"], batch["labels"])
    lora.reference.table = {keys[0]: -1.5}
    got = lora.reference.logps(**_rows(batch))
    assert float(got[0]) == -1.5  # read from the table
    torch.testing.assert_close(got[1:], expected[1:])  # computed with the adapters disabled, and kept
    assert set(keys) <= lora.reference.table.keys()
    full = module_for(tiny_dir, StageConfig(name="dpo", precompute_reference=True), AdapterConfig(type="full"))
    full.reference.table = {keys[0]: -1.5}
    with pytest.raises(RuntimeError, match="no precomputed reference log-probability"):
        full.reference.logps(**_rows(batch))


def test_a_preference_stage_refuses_a_data_module_of_another_kind(tmp_path, monkeypatch):
    """A data module that yields SFT batches to stage=dpo (one of the Python API's own making): one message instead
    of reading conversation rows as chosen / rejected halves. (The stage's own data module refuses SFT datasets
    before loading them: tests/test_stage_data.py.)"""
    from telechat_lab.errors import DataError
    from telechat_lab.training import datamodule

    real = datamodule.TelechatDataModule.__init__

    def sft_batches(self, data, model_dir, kind="sft"):
        real(self, data, model_dir, kind="sft")

    monkeypatch.setattr(datamodule.TelechatDataModule, "__init__", sft_batches)
    with pytest.raises(DataError, match="stage=dpo trains on pairwise data, but the data module yields sft batches"):
        run_train(tmp_path, "stage=dpo", "trainer.max_steps=1")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_two_ranks_train_and_log_as_one_process_with_the_same_global_batch(tiny_dir, tmp_path, stage):
    """Each of 2 gloo ranks gets half of every global batch (kto: one rank only desirable examples, the other only
    undesirable ones): the step's loss (the mean over its pairs, step_examples), the metrics reduced over ranks
    and the trained weights equal one process's."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}:{Path(__file__).parents[1]}", "OMP_NUM_THREADS": "1"}
    results = {}
    for world in (1, 2):
        out = str(tmp_path / f"world{world}")
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).parent / "preference_ddp.py"), str(tiny_dir), out, str(world), stage],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[world] = (json.loads(Path(out + ".json").read_text()), torch.load(out + ".pt", weights_only=True))
    (one, one_weights), (two, two_weights) = results[1], results[2]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a.keys() == b.keys() and "train/rewards/chosen" in a
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-5), name
    for name, weight in one_weights.items():
        torch.testing.assert_close(two_weights[name], weight, rtol=1e-4, atol=1e-6)


def test_the_run_says_which_settings_and_which_reference_it_trains_with(tiny_dir, tmp_path, capsys):
    module_for(tiny_dir, StageConfig(name="dpo"))
    said = capsys.readouterr().out
    assert (
        "stage=dpo: loss sigmoid, beta 0.1, label_smoothing 0.0, sft_weight 0.0; "
        "reference: the base with the adapters disabled" in said
    )
    sft = make_adapter(tiny_dir, tmp_path / "sft")
    module_for(tiny_dir, StageConfig(name="kto", reference=str(sft)))
    assert f"reference: the SFT policy of {sft} (merged into the base; the new adapter disabled)" in (
        capsys.readouterr().out
    )
    module_for(tiny_dir, StageConfig(name="dpo", loss="simpo"), AdapterConfig(type="full"))
    assert "reference: none (reference-free)" in capsys.readouterr().out
    module_for(tiny_dir, StageConfig(name="dpo", precompute_reference=True), AdapterConfig(type="full"))
    assert "reference: the starting weights, precomputed before training" in capsys.readouterr().out
    module_for(tiny_dir, StageConfig(name="sft"))
    assert "stage=" not in capsys.readouterr().out

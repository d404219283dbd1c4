"""Training on CPU with the tiny model: config composition and validation, every adapter, freeze,
checkpoints in HF/PEFT format, resume equivalence, DDP (gloo), a multirun with its summary, wandb
offline."""

import csv
import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CONF, QUICK, REPO, compose_train, losses, run_train, train_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from telechat_lab.config import ConfigError, TrainConfig, config_problems, validate
from telechat_lab.errors import OutputDirError


def typed(cfg) -> TrainConfig:
    return OmegaConf.to_object(cfg)


# ---------------------------------------------------------------- composition and validation


@pytest.mark.parametrize(
    "preset", sorted(p.stem for p in (REPO / "telechat_lab" / "conf" / "experiment").glob("*.yaml"))
)
def test_every_experiment_preset_composes(preset):
    cfg = compose_train([f"experiment={preset}"])
    problems = config_problems(cfg, cuda_available=True)
    assert cfg.task_name and all(p.startswith("model.path=") for p in problems), problems


def test_reference_command_preset_reproduces_its_settings():
    cfg = compose_train(["experiment=telechat2_7b_lora_sft"])
    assert cfg.model.path == "./telechat_7B" and cfg.model.name == "telechat2_7b"
    assert cfg.data.datasets == ["identity", "alpaca_en_demo"] and cfg.data.cutoff_len == 1024
    assert cfg.data.max_samples == 100000 and cfg.data.batch_size == 1 and cfg.data.packing is False
    assert cfg.data.preprocessing_num_workers == 16
    assert cfg.optim.lr == 3e-5 and cfg.optim.scheduler == "cosine" and cfg.optim.warmup_steps == 0
    assert cfg.trainer.max_epochs == 2 and cfg.trainer.accumulate_grad_batches == 1
    assert cfg.trainer.gradient_clip_val == 1.0
    assert cfg.adapter.type == "lora" and (cfg.adapter.rank, cfg.adapter.alpha, cfg.adapter.dropout) == (8, 16, 0.0)
    assert cfg.adapter.target == "all"
    assert cfg.logging_steps == 1 and cfg.save_steps == 100 and cfg.plot_loss is True
    assert cfg.output_dir == "saves/telechat_7B_lora" and cfg.hardware.ddp_timeout == 180000000
    assert "wandb" not in cfg.logger  # --report_to none


@pytest.mark.parametrize(
    "group,options",
    [
        ("adapter", ["lora", "dora", "qlora", "full", "freeze"]),
        (
            "hardware",
            ["auto", "cpu", "gpu", "ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "multinode"],
        ),
        ("model", ["tiny", "telechat2_3b", "telechat2_7b", "telechat2_35b", "telechat2_115b"]),
        ("logger", ["csv", "tensorboard", "wandb", "none"]),
    ],
)
def test_every_group_option_composes(group, options):
    for option in options:
        cfg = compose_train([f"{group}={option}"])
        assert cfg[group] is not None


def test_deepspeed_arguments_and_overrides():
    from telechat_lab.training.strategy import deepspeed_arguments, trainer_arguments

    cfg = typed(
        compose_train(
            [
                "hardware=deepspeed_zero3_offload",
                "+hardware.deepspeed.overrides.zero_optimization.reduce_bucket_size=1000",
            ]
        )
    )
    args = deepspeed_arguments(cfg.hardware.deepspeed, exclude_frozen=True)
    assert args == {
        "stage": 3,
        "offload_optimizer": True,
        "offload_parameters": True,
        "pin_memory": True,
        "exclude_frozen_parameters": True,
    }
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    strategy = trainer_arguments(cfg.hardware)["strategy"]
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu" and zero["reduce_bucket_size"] == 1000


def test_config_errors_are_all_listed_at_once():
    # composed as train.py's command-line check does: onto the schema's untyped copy, so every bad value arrives
    cfg = compose_train(
        [
            "schema=train_unchecked",
            "adapter=full",
            "+adapter.quantization={bits:4}",
            "hardware=deepspeed_zero3",
            "+model.colour=blue",
            "optim.lr=fast",
            "+trainer.not_an_arg=1",
        ]
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg, cuda_available=False)
    message = str(err.value)
    for expected in (
        "model.colour: unknown key",
        "optim.lr='fast': expected a number",
        "trainer.not_an_arg: not an argument",
        "adapter.quantization with adapter.type=full",
        "DeepSpeed ZeRO-3 needs CUDA",
    ):
        assert expected in message, message


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["adapter=dora", "adapter.use_dora=false"],
            "adapter.use_dora=false with adapter.type=dora: that trains plain",
        ),
        (["adapter=lora", "adapter.use_dora=true"], "adapter.use_dora=true with adapter.type=lora: that is DoRA"),
        (["adapter=qlora", "adapter.use_dora=true"], "adapter.use_dora=true with adapter.type=qlora: that is DoRA"),
        (["adapter=full", "adapter.use_dora=true"], "adapter.use_dora=true with adapter.type=full: that is DoRA"),
        (["adapter=qlora", "adapter.type=lora"], "adapter.quantization with adapter.type=lora: a quantised"),
        (
            ["adapter=qlora", "adapter.type=dora", "adapter.use_dora=true"],
            "adapter.quantization with adapter.type=dora: a quantised",
        ),
    ],
)
def test_settings_that_contradict_the_adapter_kind_are_refused(overrides, expected):
    # each would train something other than the kind the run is named (and printed) as
    with pytest.raises(ConfigError, match="invalid configuration") as err:
        validate(compose_train(overrides), cuda_available=False)
    assert expected in str(err.value) and "use adapter=" in str(err.value), str(err.value)


def test_every_adapter_preset_agrees_with_its_kind():
    for preset in sorted(p.stem for p in (Path(CONF) / "adapter").glob("*.yaml")):
        validate(compose_train([f"adapter={preset}"]), cuda_available=False)


def test_missing_checkpoint_fails_before_loading():
    cfg = compose_train(["model=telechat2_7b", "model.path=/nonexistent/TeleChat2-7B"])
    with pytest.raises(ConfigError, match="model.path=/nonexistent/TeleChat2-7B: no config.json"):
        validate(cfg, cuda_available=False)


def test_liger_loss_needs_cuda_and_liger_kernel():
    with pytest.raises(ConfigError, match="model.loss_implementation=liger: no CUDA GPU is visible"):
        validate(compose_train(["model.loss_implementation=liger"]), cuda_available=False)
    validate(compose_train(["model.loss_implementation=fused"]), cuda_available=False)


def test_default_config_is_valid():
    validate(compose_train([]), cuda_available=False)


# ---------------------------------------------------------------- training with each adapter


@pytest.mark.parametrize("adapter", ["lora", "dora", "qlora", "full"])
def test_adapter_trains_and_lowers_the_loss(tmp_path, adapter):
    if adapter == "qlora":
        pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")
    metrics = run_train(tmp_path, f"adapter={adapter}", "trainer.max_epochs=6")
    history = losses(tmp_path)
    assert len(history) == 24 and metrics["steps"] == 24
    first, last = sum(history[:4]) / 4, sum(history[-4:]) / 4
    assert last < first - 0.5, (adapter, first, last)
    if adapter == "full":  # a HF checkpoint directory with TeleChat2's own names
        names = set(load_file(tmp_path / "model.safetensors"))
        assert "transformer.h.0.self_attention.key_value.weight" in names and "lm_head.weight" in names
    else:  # a PEFT adapter that names its base by absolute path
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        assert Path(config["base_model_name_or_path"]).is_absolute()
        assert (Path(config["base_model_name_or_path"]) / "config.json").exists()
        assert set(config["target_modules"]) == {"query", "key_value", "dense", "gate_proj", "up_proj", "down_proj"}
        assert config["use_dora"] is (adapter == "dora")
        assert (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "tokenizer.model").exists()


def test_qlora_base_really_is_4bit(tmp_path):
    pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")
    import bitsandbytes as bnb

    from telechat_lab.resolve import model_dir
    from telechat_lab.training.module import TelechatLitModule

    cfg = typed(compose_train(["adapter=qlora"]))
    module = TelechatLitModule(model_dir(None), cfg.model, cfg.adapter, cfg.optim)
    module.configure_model()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.model.modules())


def test_adapter_reloads_with_peft_and_gives_the_trained_logits(tmp_path):
    from peft import PeftModel

    from telechat_lab.model import Telechat2ForCausalLM

    run_train(tmp_path, "adapter=lora", "trainer.max_steps=4")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    base = Telechat2ForCausalLM.from_pretrained(config["base_model_name_or_path"])
    ids = torch.randint(20, 3000, (1, 12))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, tmp_path).eval()(input_ids=ids).logits
    assert (tuned - before).abs().max() > 1e-4  # the adapter is not a no-op


def test_freeze_trains_only_the_last_blocks(tmp_path):
    from telechat_lab.resolve import model_dir

    run_train(tmp_path, "adapter=freeze", "adapter.trainable_layers=1", "trainer.max_steps=3")
    base = load_file(model_dir(None) / "model.safetensors")
    tuned = load_file(tmp_path / "model.safetensors")
    assert set(base) == set(tuned)
    for name in base:
        changed = not torch.equal(base[name], tuned[name])
        assert changed == name.startswith("transformer.h.1."), name


def test_logged_metrics_and_plots(tmp_path):
    run_train(tmp_path, "trainer.max_steps=6", "data.val_size=4", "trainer.val_check_interval=3", "logging_steps=2")
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {
        "epoch",
        "step",
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_seen",
        "train/tokens_per_s",
        "train/peak_mem_gb",
        "val/loss",
    }  # one lr, names grouped
    # one row per step that logs something (training every 2nd of 6 steps, validation after the 3rd and 6th),
    # numbered as the checkpoints are
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 6]
    assert [bool(r["train/loss"]) for r in rows] == [True, False, True, True]
    assert [bool(r["val/loss"]) for r in rows] == [False, True, False, True]
    with open(tmp_path / "loss_history.csv") as f:
        val_steps = [int(r["step"]) for r in csv.DictReader(f) if r["split"] == "val"]
    assert val_steps == [3, 6]
    # the epoch is fractional: 16 examples, 4 held out for validation, batch 4 -> 3 batches an epoch
    assert [float(r["epoch"]) for r in rows] == pytest.approx([2 / 3, 1.0, 4 / 3, 2.0])
    seen = [float(r["train/tokens_seen"]) for r in rows if r["train/tokens_seen"]]
    assert seen == sorted(seen) and seen[0] > 0
    assert (tmp_path / "training_loss.png").stat().st_size > 1000
    assert (tmp_path / "validation_loss.png").stat().st_size > 1000
    assert len(losses(tmp_path, "val")) == 2


def test_logger_none_writes_no_csv_and_tensorboard_no_hp_metric(tmp_path):
    run_train(tmp_path / "none", "logger=none", "trainer.max_steps=2")
    assert not (tmp_path / "none" / "logs").exists() and (tmp_path / "none" / "loss_history.csv").exists()
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(tmp_path / "tb", "logger=tensorboard", "trainer.max_steps=2")
    events = EventAccumulator(str(next((tmp_path / "tb" / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "hp_metric" not in tags


def test_checkpoints_every_save_steps(tmp_path):
    run_train(tmp_path, "trainer.max_steps=4", "save_steps=2")
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert (tmp_path / "checkpoint-4" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        f"step-000000{n}.{e}" for n in (2, 4) for e in ("ckpt", "json")
    ]


@pytest.mark.parametrize("stop_at", [3, 5])  # mid-epoch (4 batches an epoch) and in the second epoch
def test_resume_reproduces_the_uninterrupted_run(tmp_path, stop_at):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(straight, "trainer.max_steps=8", "save_steps=1")
    run_train(
        split,
        "trainer.max_steps=8",
        "save_steps=1",
        "+callbacks.stop._target_=helpers.StopAfter",
        f"+callbacks.stop.step={stop_at}",
    )
    assert len(losses(split)) == stop_at
    run_train(split, "trainer.max_steps=8", "save_steps=1", "resume=true", "+callbacks.stop=null")
    assert losses(split) == pytest.approx(losses(straight), abs=1e-5)
    assert len(losses(split)) == 8


def test_resume_without_a_run_says_so(tmp_path):
    with pytest.raises(OutputDirError, match="holds no run to continue"):
        run_train(tmp_path / "nothing", "resume=true", "trainer.max_steps=1")


# ---------------------------------------------------------------- processes: DDP, multirun, wandb


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    train_cli(
        [
            *QUICK,
            "hardware=ddp",
            "hardware.accelerator=cpu",
            "hardware.devices=2",
            "trainer.max_steps=3",
            f"output_dir={out}",
            f"data.cache_dir={tmp_path}/cache",
        ],
        tmp_path,
    )
    assert (out / "adapter_model.safetensors").exists()
    assert len(losses(out)) == 3
    with open(out / "logs" / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    # two ranks share 16 examples in batches of 4: 2 steps an epoch, so 3 steps are 1.5 epochs
    assert float(last["epoch"]) == pytest.approx(1.5)


def assert_quiet(output: str) -> None:
    """No warning, and no line twice within a run (each job of a sweep prints its own report), in what a command
    printed; progress bars aside."""
    assert "warning" not in output.lower(), output
    for block in re.split(r"\[HYDRA\]\s+#\d+ : .*", output):
        lines = [line for line in block.splitlines() if line.strip() and "━" not in line]
        repeated = {line for line in lines if lines.count(line) > 1 and not line.startswith("|")}
        assert not repeated, repeated


@pytest.mark.slow
def test_sweep_summary_sorts_marks_and_plots(tmp_path):
    sweep = tmp_path / "sweep"
    proc = train_cli(
        [
            "-m",
            *QUICK,
            "adapter=lora,dora",
            "trainer.max_steps=2",
            "data.val_size=4",
            f"hydra.sweep.dir={sweep}",
            f"data.cache_dir={tmp_path}/cache",
        ],
        tmp_path,
    )
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["best", "job", "adapter", "train_loss", "val_loss", "steps", "skipped_steps", "status"]
    assert {r["adapter"] for r in rows} == {"lora", "dora"}  # one column per swept setting, nothing else
    losses_ = [float(r["val_loss"]) for r in rows]
    assert losses_ == sorted(losses_) and [r["best"] for r in rows] == ["*", ""]
    assert (sweep / "sweep_loss.png").stat().st_size > 1000
    assert "sorted by val_loss (minimize)" in (sweep / "summary.md").read_text()
    assert_quiet(proc.stdout + proc.stderr)  # every job's console too


@pytest.mark.slow
def test_wandb_one_run_per_job_grouped_by_sweep_and_resumed_in_place(tmp_path):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    sweep = tmp_path / "sweep"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = train_cli(
        [
            "-m",
            *QUICK,
            "logger=wandb",
            "logger.wandb.tags=[demo]",
            "adapter=lora,dora",
            "trainer.max_steps=2",
            "trainer.enable_progress_bar=true",
            f"hydra.sweep.dir={sweep}",
            f"data.cache_dir={tmp_path}/cache",
        ],
        tmp_path,
        env=env,
    )
    assert_quiet(proc.stdout + proc.stderr)
    assert "train/loss" in proc.stdout and "v_num" not in proc.stdout  # the bar shows the loss, not wandb's id
    ids = []
    for job, adapter in (("0", "lora"), ("1", "dora")):
        (run_dir,) = (sweep / job / "wandb").glob("offline-run-*")
        records = next(run_dir.glob("run-*.wandb")).read_bytes()
        for key in (b"train-sweep", f"adapter={adapter}".encode(), b"demo", b"train/loss", b"cutoff_len"):
            assert key in records, (job, key)  # the group, a short name, the tags, the metrics, the config
        assert b"output_dir=" not in records.split(b"cutoff_len")[0]  # the name holds no path
        ids.append(run_dir.name.rsplit("-", 1)[1])
    assert ids[0] != ids[1]  # one wandb run per job
    assert json.loads((sweep / "0" / "run.json").read_text())["wandb_id"] == ids[0]
    train_cli([f"output_dir={sweep / '0'}", "resume=true", "trainer.max_steps=3"], tmp_path, env=env)
    assert {p.name.rsplit("-", 1)[1] for p in (sweep / "0" / "wandb").glob("offline-run-*")} == {ids[0]}


def test_wandb_from_the_python_api(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = run_train(tmp_path, "logger=wandb", "adapter=dora", "trainer.max_steps=1")
    assert metrics["steps"] == 1 and list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_optuna_study_persists_and_continues(tmp_path):
    pytest.importorskip("optuna", reason="the sweep extra is not installed")
    search = [
        "-m",
        *QUICK,
        "hparams_search=lora_optuna",
        "trainer.max_steps=2",
        "data.val_size=4",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}",
        f"data.cache_dir={tmp_path}/cache",
    ]
    train_cli([*search, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'first'}"], tmp_path)
    with open(tmp_path / "first" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    results = yaml.safe_load((tmp_path / "first" / "optimization_results.yaml").read_text())
    assert results["trials"] == 2 and results["best_value"] == pytest.approx(float(rows[0]["val_loss"]))
    assert 1e-5 <= results["best_params"]["optim.lr"] <= 1e-2
    # the same study, asked for 3 trials in all: one more runs, at a point not tried before
    train_cli([*search, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'again'}"], tmp_path)
    results = yaml.safe_load((tmp_path / "again" / "optimization_results.yaml").read_text())
    assert results["trials"] == 3 and len(list((tmp_path / "again").glob("[0-9]*"))) == 1
    refused = train_cli(["-m", *QUICK, "hparams_search=lora_optuna"], tmp_path, check=False)
    assert refused.returncode == 2 and "data.val_size=0 holds no validation split" in refused.stderr


def test_optuna_sweeper_search_space():
    pytest.importorskip("optuna", reason="the sweep extra is not installed")
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.telechat_lab_sweepers.optuna_sweeper import distribution

    parse = OverridesParser.create().parse_overrides
    lr, rank, layers, dropout, fixed = (
        distribution(o)
        for o in parse(
            [
                "optim.lr=tag(log, interval(1e-5, 1e-2))",
                "adapter.rank=choice(4, 8)",
                "x=range(1, 5)",
                "adapter.dropout=interval(0.0, 0.1)",
                "seed=3",
            ]
        )
    )
    assert lr == FloatDistribution(1e-5, 1e-2, log=True) and rank == CategoricalDistribution([4, 8])
    assert layers == IntDistribution(1, 4) and dropout == FloatDistribution(0.0, 0.1) and fixed == "3"


def test_slurm_launcher_preset_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the sweep extra is not installed")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hardware=ddp"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_ and launcher.tasks_per_node == 8 and launcher.nodes == 1


def test_cli_lists_every_unknown_key_at_once(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "model.colour=blue",
            "adapter=dora",
            "adapter.rnak=4",
            "optim.lr=1e-4",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "model.colour: unknown key" in proc.stderr and "adapter.rnak: unknown key" in proc.stderr
    assert "optim.lr" not in proc.stderr  # a known key is not reported
    assert not (tmp_path / "outputs").exists()  # nothing was started


def test_packing_checkpointing_accumulation_and_schedule(tmp_path):
    """Packed rows, gradient checkpointing, accumulation 2, linear schedule with warmup, rsLoRA on a
    list of targets: it trains, and the learning rate warms up then decays."""
    run_train(
        tmp_path,
        "data.packing=true",
        "data.cutoff_len=256",
        "data.batch_size=2",
        "data.max_samples=40",
        "model.gradient_checkpointing=true",
        "trainer.accumulate_grad_batches=2",
        "optim.scheduler=linear",
        "optim.warmup_steps=2",
        "adapter.rslora=true",
        "adapter.target=[query,key_value,down_proj]",
        "trainer.max_steps=6",
    )
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    lrs = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    peak = lrs.index(max(lrs))
    assert lrs[0] < max(lrs) and 0 < peak < len(lrs) - 1 and lrs[-1] < max(lrs)  # warm-up, then linear decay
    seen = [float(r["train/tokens_seen"]) for r in rows if r.get("train/tokens_seen")]
    assert seen[-1] <= 6 * 2 * 2 * 256  # real tokens only: never more than the rows' capacity
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_rslora"] and set(config["target_modules"]) == {"query", "key_value", "down_proj"}


def test_tensorboard_logger_writes_events(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    run_train(tmp_path, "logger=tensorboard", "trainer.max_steps=2")
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert (tmp_path / "logs" / "metrics.csv").exists()


def test_freeze_modules_to_save_by_name(tmp_path):
    from telechat_lab.resolve import model_dir

    run_train(
        tmp_path,
        "adapter=freeze",
        "adapter.trainable_layers=1",
        "adapter.modules_to_save=[ln_f]",
        "trainer.max_steps=2",
    )
    base = load_file(model_dir(None) / "model.safetensors")
    tuned = load_file(tmp_path / "model.safetensors")
    assert not torch.equal(base["transformer.ln_f.weight"], tuned["transformer.ln_f.weight"])
    assert torch.equal(base["lm_head.weight"], tuned["lm_head.weight"])
    with pytest.raises(ValueError, match="no module named 'ln_final'"):
        run_train(tmp_path / "bad", "adapter=freeze", "adapter.modules_to_save=[ln_final]", "trainer.max_steps=1")


def test_resume_keeps_the_interrupted_runs_metrics(tmp_path):
    run_train(
        tmp_path,
        "trainer.max_steps=8",
        "save_steps=1",
        "+callbacks.stop._target_=helpers.StopAfter",
        "+callbacks.stop.step=3",
    )
    first = (tmp_path / "logs" / "metrics.csv").read_text()
    run_train(tmp_path, "trainer.max_steps=8", "save_steps=1", "resume=true", "+callbacks.stop=null")
    assert (tmp_path / "logs" / "metrics.csv").read_text() == first
    resumed = list((tmp_path / "logs").glob("resumed-*/metrics.csv"))
    assert len(resumed) == 1 and "train/loss" in resumed[0].read_text()


def test_a_default_run_is_quiet_says_where_everything_is_and_counts_to_max_steps(tmp_path):
    out = tmp_path / "demo"
    # as on a new machine (the tiny model not yet written), with the libraries' own log levels
    first_time = {"TELECHAT_LAB_CACHE": str(tmp_path / "cache"), "TRANSFORMERS_VERBOSITY": None}
    proc = train_cli([f"output_dir={out}", "trainer.max_steps=3"], tmp_path, env=first_time)
    assert_quiet(proc.stdout + proc.stderr)
    assert not proc.stderr.strip(), proc.stderr  # nothing but the report, the bar and the summary
    for line in (
        f"adapter: {out}",
        f"loss plot:  {out / 'training_loss.png'}",
        f"metrics:    {out / 'logs' / 'metrics.csv'}",
        "training 61,440 of 1,143,936 parameters (lora rank 16",
    ):
        assert line in proc.stdout
    # the steps taken, and the training set's size said as that (not as the examples the 3 steps saw)
    assert re.search(
        r"^trained 61,440 of 1,143,936 parameters for 3 steps \(training set: [\d,]+ examples\)", proc.stdout, re.M
    )
    # the bar ends where max_steps ends the run, in the epoch it ends in (not at the epoch's 56 batches of 10 epochs)
    bar = next(line for line in proc.stdout.splitlines() if line.startswith("Epoch"))
    assert bar.startswith("Epoch 1/1") and " 3/3 " in bar, bar
    assert (out / "training_loss.png").exists() and (out / "adapter_model.safetensors").exists()
    # resumed mid-epoch, the bar goes on from the batches already done to the new max_steps
    proc = train_cli([f"output_dir={out}", "resume=true", "trainer.max_steps=5"], tmp_path, env=first_time)
    assert_quiet(proc.stdout + proc.stderr)  # no "dataloader is not resumable": the data module resumes it
    bar = next(line for line in proc.stdout.splitlines() if line.startswith("Epoch"))
    assert bar.startswith("Epoch 1/1") and " 5/5 " in bar, bar


def test_a_bars_rate_is_shown_once_known():
    """A bar's batches per second: none before it has timed a batch (a new validation bar, a one-batch validation;
    Lightning's column says 0.00it/s there), then the batches after the first over the time since it."""
    from rich.progress import Progress

    from telechat_lab.training.callbacks import StepsProgressBar

    now = [0.0]
    columns = StepsProgressBar().configure_columns(None)
    progress = Progress(*columns, get_time=lambda: now[0], disable=True)
    task = progress.add_task("Validation", total=3)

    def shown() -> str:
        return " ".join(str(column.render(progress.tasks[task])) for column in columns)

    assert "--it/s" in shown() and "0.00it/s" not in shown()
    for batch, at in enumerate((0.5, 1.0, 1.5), 1):
        now[0] = at
        progress.update(task, completed=batch)
        if batch == 1:
            assert "--it/s" in shown() and "0.00it/s" not in shown()
    assert "2.00it/s" in shown(), shown()  # 2 batches in the second after the first one's end


def test_bf16_mixed_precision_trains_on_cpu(tmp_path, capsys):
    metrics = run_train(tmp_path, "hardware=cpu", "hardware.precision=bf16-mixed", "trainer.max_steps=3")
    assert metrics["steps"] == 3 and all(math.isfinite(x) for x in losses(tmp_path))
    assert "bfloat16 frozen, float32 trained weights" in capsys.readouterr().out


@pytest.mark.parametrize("adapter", ["lora", "freeze", "full"])
def test_mixed_precision_keeps_a_frozen_base_in_bf16_and_trains_in_fp32(adapter):
    """No fp32 copy of a frozen base (adapters); what is trained is fp32 (the optimizer's master weights)."""
    from telechat_lab.config import AdapterConfig, ModelConfig
    from telechat_lab.model.loading import upcast_trained
    from telechat_lab.resolve import model_dir
    from telechat_lab.training.adapters import apply_adapter
    from telechat_lab.training.module import load_base_model

    cfg = AdapterConfig(type=adapter, trainable_layers=1)
    model = apply_adapter(load_base_model(model_dir(None), ModelConfig(), cfg, "bf16-mixed"), cfg)
    upcast_trained(model, "bf16-mixed")
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained == {torch.float32}
    assert frozen == (set() if adapter == "full" else {torch.bfloat16})
    true_half = apply_adapter(load_base_model(model_dir(None), ModelConfig(), cfg, "bf16-true"), cfg)
    loaded = {n: p.dtype for n, p in true_half.named_parameters()}
    upcast_trained(true_half, "bf16-true")
    assert {n: p.dtype for n, p in true_half.named_parameters()} == loaded  # "-true": everything as loaded
    assert true_half.get_input_embeddings().weight.dtype == torch.bfloat16


@pytest.mark.slow
def test_ddp_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Two gloo processes: interrupted after 3 steps then resumed equals 6 steps straight (the data
    module shards and resumes the sample order itself)."""
    ddp = [
        *QUICK,
        "hardware=ddp",
        "hardware.accelerator=cpu",
        "hardware.devices=2",
        "data.batch_size=2",
        "trainer.max_steps=6",
        "save_steps=1",
        f"data.cache_dir={tmp_path}/cache",
    ]
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    train_cli([*ddp, f"output_dir={tmp_path / 'straight'}"], tmp_path, env=env)
    train_cli(
        [
            *ddp,
            f"output_dir={tmp_path / 'split'}",
            "+callbacks.stop._target_=helpers.StopAfter",
            "+callbacks.stop.step=3",
        ],
        tmp_path,
        env=env,
    )
    assert len(losses(tmp_path / "split")) == 3
    train_cli([*ddp, f"output_dir={tmp_path / 'split'}", "resume=true", "+callbacks.stop=null"], tmp_path, env=env)
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "straight"), abs=1e-5)


def test_resume_a_finished_run_with_more_epochs(tmp_path):
    """A checkpoint from an epoch's last batch: the next epoch starts from its first batch."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(straight, "trainer.max_epochs=2", "save_steps=4")
    run_train(split, "trainer.max_epochs=1", "save_steps=4")
    metrics = run_train(split, "trainer.max_epochs=2", "save_steps=4", "resume=true")
    assert metrics["steps"] == 8
    # the schedule differs (1 vs 2 epochs planned), so compare the data: same number of steps per epoch
    assert len(losses(split)) == len(losses(straight)) == 8


def test_final_validation_is_recorded_once_and_can_be_disabled(tmp_path):
    run_train(tmp_path / "a", "data.val_size=4", "trainer.max_steps=3")
    assert len(losses(tmp_path / "a", "val")) == 1  # measured at the end, recorded once
    metrics = run_train(tmp_path / "b", "data.val_size=4", "trainer.max_steps=3", "+trainer.limit_val_batches=0")
    assert metrics["val_loss"] is None and metrics["steps"] == 3


def test_override_check_leaves_glob_sweeps_to_hydra():
    from telechat_lab.config import command_line_config

    assert command_line_config(["-m", "adapter=glob(*)", "optim.lr=1e-4"], CONF, "train") == ([], None)
    problems, _ = command_line_config(["-m", "adapter=lora,dora", "adapter.rnak=1"], CONF, "train")
    assert problems == ["adapter.rnak: unknown key; did you mean adapter.rank?"]
    # '+' adds a key only where new keys are allowed (Trainer arguments, loggers, callbacks): said only there
    problems, _ = command_line_config(["trainer.max_tim=1", "nonsense=1"], CONF, "train")
    assert problems == [
        "trainer.max_tim: unknown key; did you mean trainer.max_time, trainer.max_steps? "
        "(to add a new key write +trainer.max_tim=...)",
        "nonsense: unknown key",
    ]


@pytest.mark.parametrize("loss_implementation", ["fused", "chunked"])
def test_flop_accounting_matches_what_torch_counts(tmp_path, loss_implementation):
    """The hardware FLOPs of training/flops.py against torch's own count of every matmul and attention of one
    LoRA training step (forward, backward, the chunked loss's recompute of lm_head or the fused loss's single
    pass), for a padded and a packed batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from telechat_lab.config import AdapterConfig, ModelConfig
    from telechat_lab.resolve import model_dir
    from telechat_lab.training.adapters import apply_adapter
    from telechat_lab.training.flops import batch_tokens_and_pairs, count_flops
    from telechat_lab.training.module import load_base_model

    model = apply_adapter(
        load_base_model(model_dir(None), ModelConfig(attn_implementation="eager"), AdapterConfig()), AdapterConfig()
    ).train()
    model.config.loss_implementation = loss_implementation
    counts = count_flops(model, model.config, gradient_checkpointing=False)
    ids = torch.randint(20, 3000, (2, 48))
    batches = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids},
        {
            "input_ids": ids[:1],
            "position_ids": torch.cat([torch.arange(30), torch.arange(18)])[None],
            "labels": ids[:1],
        },
    ]
    for batch in batches:
        with FlopCounterMode(display=False) as counter:
            model(**batch).loss.backward()
        tokens, pairs = (float(v) for v in batch_tokens_and_pairs(batch))
        estimate = counts.hardware(tokens, pairs)
        # the estimate counts causal pairs; eager attention computes the full square and masks it
        square = (
            4
            * model.config.hidden_size
            * model.config.n_layer
            * 3
            * (sum(n * n for n in ([48, 48] if "attention_mask" in batch else [30, 18])) / 2 - pairs)
        )
        assert counter.get_total_flops() == pytest.approx(estimate + square, rel=0.03), batch.keys()
    assert counts.model_per_token == 6 * sum(p.numel() for p in model.parameters())


def test_hydra_flags_pass_the_command_line_check(tmp_path):
    """The early check of train.py leaves Hydra's own flags alone: printing the config, and shell completion."""
    cfg = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--cfg", "job", "adapter=dora"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cfg.returncode == 0 and "use_dora: true" in cfg.stdout, cfg.stderr
    completion = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "-sc", "query=bash"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COMP_LINE": "python train.py adap"},
    )
    assert completion.returncode == 0 and "adapter=" in completion.stdout, completion.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_the_installed_package_runs_from_any_directory(tmp_path):
    """pip install of the package (configs and demo data inside it), then `telechat-lab train` and inspect from a
    directory that is not the checkout."""
    site = tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import telechat_lab; print(telechat_lab.__file__)"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
    )
    assert where.stdout.startswith(str(site)), where.stdout  # the installed copy, not the checkout
    proc = subprocess.run(
        [
            str(site / "bin" / "telechat-lab"),
            "train",
            "output_dir=run",
            "trainer.max_steps=2",
            "data.max_samples=8",
            "trainer.enable_progress_bar=false",
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (elsewhere / "run" / "adapter_model.safetensors").exists()
    assert "resume:     telechat-lab train output_dir=" in proc.stdout
    inspect = subprocess.run(
        [sys.executable, "-m", "telechat_lab.data.inspect", "data.datasets=[identity]", "show=0"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert inspect.returncode == 0 and "identity" in inspect.stdout, inspect.stderr[-3000:]


def test_the_python_api_runs_every_command(tmp_path):
    """The README's notebook example: train, merge, chat and inspect from Python, with results returned."""
    from telechat_lab import api
    from telechat_lab.errors import ConfigError

    cache = f"data.cache_dir={tmp_path / 'cache'}"
    metrics = api.train([*QUICK, "trainer.max_steps=2", f"output_dir={tmp_path / 'run'}", cache])
    assert metrics["steps"] == 2 and metrics["status"] == "completed" and metrics["train_loss"] > 0
    export = api.merge([f"adapter_path={tmp_path / 'run'}", f"export_dir={tmp_path / 'merged'}"])
    assert (export / "config.json").exists()
    session = api.chat([f"model.path={export}", "generation.do_sample=false", "generation.max_new_tokens=4"])
    assert isinstance("".join(session.reply("Who are you?")), str) and len(session.turns) == 1
    report = api.inspect(["data.datasets=[identity]", "show=0", cache])
    assert report["datasets"]["identity"]["examples"] == 40
    with pytest.raises(ConfigError, match="data.batch_size=0: must be at least 1"):
        api.train(["data.batch_size=0"])


@pytest.mark.slow
def test_compiled_blocks_train_as_the_plain_ones(tmp_path, capsys):
    plain = run_train(tmp_path / "plain", "trainer.max_steps=2")
    compiled = run_train(tmp_path / "compiled", "trainer.max_steps=2", "model.compile=true")
    assert "compiled blocks" in capsys.readouterr().out
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    assert compiled["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)


def test_shell_completion_of_the_telechat_lab_command(tmp_path):
    """`eval "$(telechat-lab train -sc install=bash)"` registers telechat-lab; its queries complete the command
    names, then each command's groups and keys."""
    program = "import sys; sys.argv[0] = 'telechat-lab'; from telechat_lab.cli import main; main()"

    def complete(args, line=None):
        env = {**os.environ, **({"COMP_LINE": line} if line is not None else {})}
        proc = subprocess.run(
            [sys.executable, "-c", program, *args], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert complete(["train", "-sc", "install=bash"]).rstrip().endswith("hydra_bash_completion telechat-lab")
    commands = ["train", "merge", "chat", "inspect", "serve", "eval", "tiny"]
    assert complete(["-sc", "query=bash"], "telechat-lab ").split() == commands
    assert complete(["-sc", "query=bash"], "telechat-lab me").split() == ["merge"]
    assert "adapter=lora" in complete(["-sc", "query=bash"], "telechat-lab train adapter=").split()
    assert "export_dir=" in complete(["-sc", "query=bash"], "telechat-lab merge export_").split()
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_sweep_with_a_failing_job_goes_on_summarises_and_exits_non_zero(tmp_path):
    sweep = tmp_path / "sweep"
    proc = train_cli(
        ["-m", f"hydra.sweep.dir={sweep}", "data.datasets=[nope],[identity]", "trainer.max_steps=1"],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: unknown dataset(s) ['nope']" in proc.stderr and "1 of 2 jobs failed: 0" in proc.stderr
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["job"], r["status"]) for r in rows] == [("1", "completed"), ("0", "failed")]


def test_a_config_is_validated_once(tmp_path, monkeypatch):
    """The API's train validated a config three times (the command-line check, compose, prepare), a resume four;
    now each config once: the given one, and for a resume only its merged settings (the run's own with the
    command's changes: what it runs), not the command's config as well."""
    validator = importlib.import_module("telechat_lab.config.validate")  # the package exports validate()
    from telechat_lab import api

    calls = []
    checks = validator._cross_field_problems
    monkeypatch.setattr(validator, "_cross_field_problems", lambda *a: calls.append(1) or checks(*a))
    run = [*QUICK, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert api.train([*run, "trainer.max_steps=1"])["steps"] == 1
    assert len(calls) == 1
    assert api.train([*run, "trainer.max_steps=2", "resume=true"])["steps"] == 2
    assert len(calls) == 2

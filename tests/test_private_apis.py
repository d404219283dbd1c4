"""The private names of libraries that telechat_lab.private_apis lists: each still there, with the parameters and
the meaning the accessors rely on (a library update that changes one fails here, not in a training run)."""

import importlib
import inspect

import pytest
import torch
from helpers import CONF

from telechat_lab import private_apis
from telechat_lab.targets import targets


@pytest.mark.parametrize("module, cls, method, parameters", private_apis.OVERRIDDEN, ids=lambda v: str(v))
def test_overridden_private_methods_keep_their_parameters(module, cls, method, parameters):
    owner = getattr(importlib.import_module(module), cls)
    assert tuple(inspect.signature(getattr(owner, method)).parameters) == parameters
    assert private_apis.overridden(module, cls, method) == (owner, method)


def test_lightning_accessors(tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    assert private_apis.compute_dtype(MixedPrecision("bf16-mixed", "cpu")) is torch.bfloat16
    assert private_apis.compute_dtype(Precision()) is torch.float32
    assert private_apis.add_prefix({"loss": 1.0}, "train", "-") == {"train-loss": 1.0}
    logger = CSVLogger(tmp_path, prefix="p")
    assert private_apis.logger_prefix(logger) == "p" and not private_apis.experiment_started(logger)
    logger.experiment  # noqa: B018  (creates it)
    assert private_apis.experiment_started(logger)


def test_wandb_logger_settings(tmp_path):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=tmp_path, offline=True, project="p", anonymous=False)
    settings = private_apis.wandb_init_settings(logger)
    assert settings is logger._wandb_init and settings["project"] == "p" and "anonymous" in settings
    assert not private_apis.experiment_started(logger)


def test_torch_accessors():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    private_apis.set_last_lr(scheduler, [0.25])
    assert scheduler.get_last_lr() == [0.25]
    model.register_buffer("kept", torch.zeros(1))
    model.register_buffer("dropped", torch.zeros(1), persistent=False)
    assert [name for name, _ in private_apis.persistent_buffers(model)] == ["kept"]


def test_transformers_and_hydra_accessors(tiny_dir):
    from hydra import compose, initialize_config_dir
    from hydra.plugins.sweeper import Sweeper
    from transformers import AutoConfig

    import telechat_lab.config.schema  # noqa: F401  (registers the schemas train.yaml is typed against)

    config = AutoConfig.from_pretrained(tiny_dir, attn_implementation="eager")
    assert private_apis.attn_implementation(config) == "eager"
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        default, optuna = (
            compose("train", overrides=o, return_hydra_config=True).hydra.sweeper
            for o in ([], ["hydra/sweeper=telechat_optuna"])
        )
    basic = private_apis.hydra_basic_sweeper()  # after composing: Hydra's plugin scan may load the module anew
    assert issubclass(basic, Sweeper) and targets(default, basic) and not targets(optuna, basic)


def test_targets_compare_classes_not_names():
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from telechat_lab.training.loggers import StepCSVLogger

    assert targets({"_target_": "telechat_lab.training.loggers.StepCSVLogger"}, CSVLogger)
    assert issubclass(StepCSVLogger, CSVLogger)
    assert not targets({"_target_": "lightning.pytorch.loggers.TensorBoardLogger"}, CSVLogger)
    assert not targets({"_target_": "my.own.CSVLoggerLike"}, CSVLogger)  # the name alone no longer matches
    assert targets({"_target_": "lightning.pytorch.loggers.WandbLogger"}, WandbLogger)
    assert not targets({"name": "no target"}, WandbLogger)


def test_hydra_override_application_is_what_compose_does():
    """The config check composes once and applies the key=value overrides itself, through Hydra's own step."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    import telechat_lab.config.schema  # noqa: F401  (registers the schemas train.yaml is typed against)

    overrides = [
        "optim.lr=0.5",
        "+trainer.max_time=00:00:01:00",
        "~trainer.max_epochs",
        "++seed=3",
        "data.datasets=[a,b]",
    ]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        expected = compose("train", overrides=["schema=train_unchecked", *overrides])
        applied = compose("train", overrides=["schema=train_unchecked"])
    private_apis.apply_overrides(OverridesParser.create().parse_overrides(overrides), applied)
    assert OmegaConf.to_container(applied) == OmegaConf.to_container(expected)
    assert applied.optim.lr == 0.5 and applied.seed == 3 and "max_epochs" not in applied.trainer


def test_lm_eval_reads_the_git_commit_from_files(tmp_path, monkeypatch):
    """The name lm_eval.evaluator calls for the working directory's commit, replaced inside the block by lm-eval's
    own reading of .git (no `git` process), and put back after it."""
    pytest.importorskip("lm_eval", reason="the eval extra (lm-evaluation-harness) is not installed")
    import subprocess

    import lm_eval.evaluator
    from lm_eval.loggers.utils import get_git_commit_hash

    assert lm_eval.evaluator.get_git_commit_hash is get_git_commit_hash
    (tmp_path / ".git" / "refs" / "heads").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".git" / "refs" / "heads" / "main").write_text("abc123\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "check_output", lambda *a, **k: pytest.fail("ran a process"))
    with private_apis.lm_eval_git_hash_from_files():
        assert lm_eval.evaluator.get_git_commit_hash() == "abc123"
    assert lm_eval.evaluator.get_git_commit_hash is get_git_commit_hash

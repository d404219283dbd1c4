"""The check of a command line before Hydra runs (telechat_lab/config/command_line.py): Hydra's own groups and keys,
near names for misspelt keys, missing extras, and what each command completes and documents."""

import pytest
from helpers import CONF

from telechat_lab.config import command_line_config


def problems(*argv, command="train"):
    return command_line_config(list(argv), CONF, command)[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "adapter=lora,dora"],
        ["-m", "hparams_search=lora_optuna", "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2"],
        ["-m", "hydra/launcher=slurm", "hardware=ddp", "adapter=lora,dora"],
    ],
)
def test_hydra_groups_pass_the_check(argv):
    """hydra/launcher=... is Hydra's group, not one of train's (it was refused: 'train has no hydra/launcher')."""
    assert problems(*argv) == []


def test_a_misspelt_hydra_group_option_is_named():
    assert problems("-m", "hydra/launcher=jobli", "adapter=lora,dora") == [
        "hydra/launcher=jobli: no such option; choose one of basic, joblib, slurm, submitit_local, submitit_slurm"
    ]


@pytest.mark.parametrize(
    "arg,suggested",
    [
        ("trainer.max_step=5", "trainer.max_steps"),  # Lightning's Trainer arguments, before offering '+'
        ("optim.learning_rate=1e-4", "optim.lr"),  # the HF name inside the group
        ("learning_rate=1e-4", "optim.lr"),
        ("num_train_epochs=2", "trainer.max_epochs"),
        ("per_device_train_batch_size=2", "data.batch_size"),
        ("adapter.lora_rank=4", "adapter.rank"),
        ("logger.csv.save_di=x", "logger.csv.save_dir"),  # a free-form group's own keys
    ],
)
def test_unknown_keys_get_the_near_name(arg, suggested):
    (problem,) = problems(arg)
    key = arg.split("=")[0]
    assert problem.startswith(f"{key}: unknown key; did you mean {suggested}"), problem


def test_a_trainer_key_is_suggested_before_adding_one():
    assert problems("trainer.max_step=5") == [
        "trainer.max_step: unknown key; did you mean trainer.max_steps, trainer.max_time, trainer.min_steps? "
        "(to add a new key write +trainer.max_step=...)"
    ]


def test_every_alias_names_a_real_key():
    from helpers import compose_train

    from telechat_lab.config.suggest import ALIASES

    cfg = compose_train([])
    from telechat_lab.config.suggest import _exists

    assert [alias for alias in ALIASES.values() if not _exists(cfg, alias)] == []

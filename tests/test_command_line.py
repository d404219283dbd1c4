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

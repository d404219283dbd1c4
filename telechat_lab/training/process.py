"""Who this process is in a run: the first process of a command or a rank a launcher started, a job SLURM started
again, and how the user started it (for the commands it prints)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

OUTPUT_ENV = "TELECHAT_LAB_OUTPUT_DIR"  # pins output_dir for the processes a DDP launcher starts
COMMAND_ENV = "TELECHAT_LAB_COMMAND"  # how the command was started (set by telechat_lab.cli)


def launched_worker() -> bool:
    """A process a launcher started for another rank of this run (it reads the run's files, never writes them)."""
    return any(os.environ.get(name, "0") != "0" for name in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def requeued_by_slurm() -> bool:
    """SLURM started this job again (after `scontrol requeue`): the same command continues its own run."""
    return os.environ.get("SLURM_RESTART_COUNT", "0") != "0"


def train_command() -> str:
    """How this run was started ("python train.py" or "telechat-lab train"), for the commands it prints."""
    return os.environ.get(COMMAND_ENV, "python train.py")


def resume_command(output_dir: Path) -> str:
    """The command that continues the run in `output_dir`, quoted to paste back into a shell (and for Hydra)."""
    return f"{train_command()} {shlex.quote(f'output_dir={override_value(str(output_dir))}')} resume=true"


def override_value(text: str) -> str:
    """`text` as the value of a Hydra override: as it is where Hydra reads it so, else quoted."""
    if re.fullmatch(r"[\w/.+%@~-]+", text):
        return text
    # Hydra reads a backslash as itself, but before a quote (or the closing one) as an escape
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + escaped.replace("'", "\\'").replace("${", "\\${") + "'"

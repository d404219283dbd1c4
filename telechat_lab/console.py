"""What the console shows: this project's report lines, its warnings, the libraries' warnings that matter, and
progress for long work; not the libraries' chatter. Every command calls `quiet_libraries()` first.

Logging goes through one stream (Hydra's job logging: conf/hydra/job_logging/), Python warnings included; the
libraries' INFO chatter is off, and the few warnings that are not ours and say nothing a user can act on are
filtered by their exact text, each with the reason beside it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (message pattern, category, why it is not shown)
NOT_OURS = [
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, "peft's PeftModel reads the old property"),
    (r"`gradient_checkpointing_enable` is deprecated", FutureWarning, "peft's kbit preparation calls the old name"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning, "Lightning's own pytree code on torch >= 2.10"),
    (
        r"`training_step` returned `None`",
        Warning,
        "nan_policy=skip skips a step by returning None, on purpose; our own line says which step and why",
    ),
    (
        r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",
        Warning,
        "Lightning looks for state_dict() on the DataLoader; our data module restores the sampler's position "
        "itself (resume equals the uninterrupted run: tests/test_train.py, tests/test_reliability.py)",
    ),
]


def quiet_lightning() -> None:
    """Lightning's INFO lines (devices found, a tip, how it counts batches, "fit stopped") off, and its own handler
    gone (its warnings go through the one stream). Called once Lightning is imported: its import sets them."""
    import lightning.pytorch  # noqa: F401

    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.WARNING)


def quiet_libraries(name_accelerator: bool = True) -> None:
    """The libraries' chatter off; `name_accelerator=False`: all but `name_deepspeed_accelerator` (it imports torch:
    seconds that a config error's report need not wait for)."""
    logging.captureWarnings(True)  # warnings.warn -> the same log stream as everything else
    # bitsandbytes warns at import that its optional CPU kernels package is absent (irrelevant unless QLoRA runs
    # on a CPU, which is for tests); its errors still show
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for pattern, category, _why in NOT_OURS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # set before forking workers; no fork warning
    if name_accelerator:
        name_deepspeed_accelerator()


def name_deepspeed_accelerator() -> None:
    """deepspeed, where installed, is imported by accelerate (which transformers imports) and on a machine without
    a GPU warns that it "was unable to detect" one and uses its CPU accelerator: that accelerator named up front."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def show_loading_progress(weights_bytes: int) -> bool:
    """transformers' weight-loading bar is worth showing for a real checkpoint, not for a tiny one."""
    return weights_bytes >= 256 * 2**20


@contextmanager
def without_transformers_bars(off: bool = True) -> Iterator[None]:
    """transformers' loading / writing bars off inside the block (when `off`): for work that takes no time, and
    for checkpoints written while the training bar is on the screen."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if off:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


_shown_in_sweep: dict[str, str] = {}  # a sweep's directory -> the last report printed by one of its jobs


def print_once_per_sweep(text: str) -> None:
    """Print a report; in a sweep, only when it differs from the one an earlier job of the sweep printed (the
    dataset table is the same for every job that does not sweep a data setting)."""
    from telechat_lab.hydra_runtime import sweep_dir

    sweep = sweep_dir()
    if sweep is not None:
        if _shown_in_sweep.get(str(sweep)) == text:
            return
        _shown_in_sweep[str(sweep)] = text
    print(text, flush=True)

"""Every private name of a library that this package relies on, in one place: each where the library offers no
public way to do the same. Code reaches them only through the accessors here, or (a private method that a class
of ours overrides, or one we wrap) names them in OVERRIDDEN; tests/test_private_apis.py fails when a library
renames one, drops it or changes its parameters. Libraries are imported when an accessor is called.
(modeling_telechat2.py reads `config._attn_implementation` itself, as every transformers model does: it is copied
into exports as remote code, which cannot import this package.)"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# (module, class, private method, its parameter names): methods overridden (or wrapped) here
OVERRIDDEN = (
    # StepsProgressBar: the epoch count a step-limited run will reach
    ("lightning.pytorch.callbacks", "RichProgressBar", "_get_train_description", ("self", "current_epoch")),
    # Telechat2PreTrainedModel: a missing flash-attn package named with the setting to change
    ("transformers", "PreTrainedModel", "_flash_attn_can_dispatch", ("self", "flash_attn_version", "is_init_check")),
    # cli: shell completion builds each query's search path once
    (
        "hydra._internal.config_loader_impl",
        "ConfigLoaderImpl",
        "_parse_overrides_and_create_caching_repo",
        ("self", "config_name", "overrides"),
    ),
)


def overridden(module: str, cls: str, method: str) -> tuple[type, str] | None:
    """(the class, the method's name) of an OVERRIDDEN row, or None where this library version lacks it."""
    row = next((r for r in OVERRIDDEN if r[:3] == (module, cls, method)), None)
    assert row is not None, f"{module}.{cls}.{method} is not listed in OVERRIDDEN"
    try:
        owner = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return None
    return (owner, method) if hasattr(owner, method) else None


def hydra_basic_sweeper() -> type:
    """Hydra's own sweeper class (it has no public import path)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return BasicSweeper


def apply_overrides(overrides: list, cfg) -> None:
    """Apply parsed key=value overrides (+key, ++key, ~key) to a composed config as Hydra's compose applies them
    after the defaults list (Hydra has no public call for it; the config check composes once, then applies those
    of known keys)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    ConfigLoaderImpl._apply_overrides_to_config(overrides, cfg)


def compute_dtype(precision_plugin) -> Any:
    """The dtype a Lightning precision plugin computes in (what ThroughputMonitor looks its peak FLOPs up by)."""
    from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

    return _plugin_to_compute_dtype(precision_plugin)


def add_prefix(metrics: dict, prefix: str, separator: str) -> dict:
    """Metric names with a Lightning logger's `prefix` (as its own log_metrics adds it)."""
    from lightning.fabric.utilities.logger import _add_prefix

    return _add_prefix(metrics, prefix, separator)


def logger_prefix(logger) -> str:
    """The `prefix` a Lightning CSVLogger / WandbLogger was made with (no public property holds it)."""
    return logger._prefix


def experiment_started(logger) -> bool:
    """Whether a Lightning logger has created its experiment (`logger.experiment` would create it)."""
    return logger._experiment is not None


def wandb_init_settings(logger) -> dict:
    """The settings a Lightning WandbLogger will pass to wandb.init (empty for another logger)."""
    return getattr(logger, "_wandb_init", {})


def set_last_lr(scheduler, rates: list[float]) -> None:
    """What a torch LR scheduler's get_last_lr() reports, for rates set on its optimizer directly."""
    scheduler._last_lr = list(rates)


def persistent_buffers(module) -> list[tuple[str, Any]]:
    """(name, buffer) of a torch module's own buffers that its state_dict holds (persistent=True)."""
    return [(n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]


def attn_implementation(config) -> str:
    """The attention implementation transformers resolved for a model config (sdpa, eager, flash_attention_2)."""
    return config._attn_implementation


@contextmanager
def lm_eval_git_hash_from_files() -> Iterator[None]:
    """Inside the block lm-eval's simple_evaluate reads the working directory's git commit from its .git folder (its
    own fallback where git is not installed) instead of running `git describe`, whose stderr it leaves on the
    console ("fatal: not a git repository" outside a repository); no argument or setting of lm-eval avoids that
    call. It patches the name lm_eval.evaluator imported (none: nothing to patch)."""
    from unittest import mock

    import lm_eval.evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    if not hasattr(lm_eval.evaluator, "get_git_commit_hash"):
        yield
        return
    with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: get_commit_from_path(os.getcwd())):
        yield

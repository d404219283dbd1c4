"""`model.path` resolved in one place for training, inspection, merging and chat: a TeleChat2 checkpoint
directory, or, when null, the tiny random model (written on first use)."""

from __future__ import annotations

import os
from pathlib import Path

from telechat_lab.tokenizer import find_model_file


def _unset(path: str | os.PathLike | None) -> bool:
    return path is None or str(path) in ("", "null", "None")


def model_dir(path: str | os.PathLike | None) -> Path:
    """A checkpoint directory that must hold config.json; null: the tiny model."""
    if _unset(path):
        from telechat_lab.tiny import default_tiny_checkpoint

        return default_tiny_checkpoint()
    resolved = Path(path).expanduser().resolve()
    if not (resolved / "config.json").is_file():
        raise FileNotFoundError(f"model.path={path}: no config.json there; point model.path at a TeleChat2 "
                                "checkpoint directory (config.json, *.safetensors, tokenizer.model)")
    return resolved


def tokenizer_dir(path: str | os.PathLike | None) -> Path:
    """A directory (or tokenizer.model file) that holds the tokenizer: what inspection needs; null: the tiny
    model's."""
    if _unset(path):
        return model_dir(None)
    resolved = Path(path).expanduser().resolve()
    if find_model_file(resolved) is None:
        raise FileNotFoundError(f"model.path={path}: no tokenizer.model there (a TeleChat2 checkpoint directory, "
                                "or any directory holding its tokenizer.model)")
    return resolved

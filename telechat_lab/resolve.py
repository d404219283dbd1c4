"""`model.path` resolved in one place for training, inspection, merging and chat: a TeleChat2 checkpoint
directory, or, when null, the tiny random model (written on first use)."""

from __future__ import annotations

import os
from pathlib import Path

from telechat_lab.errors import CheckpointError
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
        raise CheckpointError(
            f"model.path={path}: no config.json there; point model.path at a TeleChat2 "
            "checkpoint directory (config.json, *.safetensors, tokenizer.model)"
        )
    return resolved


def tokenizer_dir(path: str | os.PathLike | None) -> Path:
    """A directory (or tokenizer.model file) that holds the tokenizer: what inspection needs; null: the tiny
    model's."""
    if _unset(path):
        return model_dir(None)
    resolved = Path(path).expanduser().resolve()
    if find_model_file(resolved) is None:
        raise CheckpointError(
            f"model.path={path}: no tokenizer.model there (a TeleChat2 checkpoint directory, "
            "or any directory holding its tokenizer.model)"
        )
    return resolved


def adapter_dirs(adapter_path: str | os.PathLike | list | None) -> list[Path]:
    """adapter_path as a list of absolute directories (it may be one path or a list)."""
    if adapter_path in (None, "", []):
        return []
    paths = [adapter_path] if isinstance(adapter_path, (str, os.PathLike)) else list(adapter_path)
    return [Path(p).expanduser().resolve() for p in paths]


def check_adapter(directory: Path) -> dict:
    """An adapter directory's adapter_config.json (a LoRA / DoRA one), with its weights present and complete;
    CheckpointError naming the file otherwise."""
    from telechat_lab.files import check_safetensors, read_json

    if not directory.is_dir():
        raise CheckpointError(f"adapter_path={directory}: no such directory")
    config = read_json(directory / "adapter_config.json", "the adapter config")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{directory}: only LoRA / DoRA adapters can be applied or merged "
            f"(adapter_config.json says peft_type={config.get('peft_type')})"
        )
    weights = directory / "adapter_model.safetensors"
    if weights.is_file():
        check_safetensors(weights)
    elif not (directory / "adapter_model.bin").is_file():
        raise CheckpointError(f"{weights} is missing (an interrupted write?)")
    return config


def base_and_adapters(model_path: str | None, adapter_path, stacked: bool = True) -> tuple[Path, list[Path]]:
    """The base checkpoint (model.path, else the first adapter's base_model_name_or_path) and the adapters, every
    file they need checked before anything is loaded. `stacked`: the adapters are applied one on top of another
    (merge, chat, eval; serve gives False: each is served on its own)."""
    from telechat_lab.adapter_origin import check_not_applied_twice
    from telechat_lab.model.checks import check_adapter_weights, check_checkpoint

    adapters = adapter_dirs(adapter_path)
    configs = [check_adapter(a) for a in adapters]
    if stacked:
        check_not_applied_twice(adapters)
    if model_path:
        base = model_dir(model_path)
    elif not adapters:
        raise CheckpointError("model.path is not set and there is no adapter_path to take the base from")
    elif not configs[0].get("base_model_name_or_path"):
        raise CheckpointError(f"{adapters[0] / 'adapter_config.json'} names no base_model_name_or_path: set model.path")
    else:
        base = model_dir(configs[0]["base_model_name_or_path"])
    check_checkpoint(base)  # its tensors against its config.json
    for adapter in adapters:  # its tensors against its config and this base: names, ranks, shapes, finite
        check_adapter_weights(adapter, base)
    return base, adapters

"""The prompt settings a run trained with, for the commands that use its adapters (chat, serve, merge): the
`data.default_system` its `config.yaml` (beside every adapter and checkpoint) recorded. A command's own
`default_system` wins over it, and says so; an adapter without a config.yaml (trained elsewhere) records nothing.
Only the default system prompt changes a prompt: the other template options (train_role_tokens, mask_history,
placeholders) decide which tokens were trained or the training data's text, not how a prompt is built."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from telechat_lab.errors import ConfigError

_NOT_RECORDED = object()


def recorded_setting(adapter: Path, key: str, missing=_NOT_RECORDED):
    """The setting `key` the run that saved `adapter` recorded in its config.yaml, or `missing`."""
    path = adapter / "config.yaml"
    try:
        recorded = OmegaConf.load(path) if path.is_file() else None
    except Exception:  # a config.yaml of another tool (not YAML OmegaConf reads): nothing recorded by a run
        return missing
    if not isinstance(recorded, DictConfig):
        return missing
    return OmegaConf.select(recorded, key, default=missing)


def recorded_default_system(adapter: Path):
    """`adapter`'s run's data.default_system (None: TeleChat's default), or _NOT_RECORDED."""
    return recorded_setting(adapter, "data.default_system")


def default_system_for(adapters: list[Path], given: str | None, command: str) -> str | None:
    """The default system prompt for prompts to `adapters` (stacked): `given` (the command's default_system) when
    set, else what their runs trained with (None: TeleChat's default). Stacked adapters that trained with
    different ones need `given`."""
    recorded = {a: s for a in adapters if (s := recorded_default_system(a)) is not _NOT_RECORDED}
    if given is not None:
        for adapter, system in recorded.items():
            if system != given:
                trained = "TeleChat's default" if system is None else repr(system)
                print(
                    f"{command}: default_system={given!r} replaces the system prompt {adapter} was trained with "
                    f"({trained}, data.default_system in its config.yaml)",
                    file=sys.stderr,
                    flush=True,
                )
        return given
    if len(set(recorded.values())) > 1:
        listed = ", ".join(f"{a}: {s!r}" for a, s in recorded.items())
        raise ConfigError(
            f"the adapters were trained with different default system prompts ({listed}); "
            f"choose one with default_system=TEXT"
        )
    return next(iter(recorded.values()), None)

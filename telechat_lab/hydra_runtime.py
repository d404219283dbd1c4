"""What Hydra's runtime says about the running job, for any layer (it imports only Hydra). Outside @hydra.main
(the Python API) there is no job: no overrides, no multirun."""

from __future__ import annotations

import sys
from pathlib import Path


def _hydra_config():
    """Hydra's config of the running job, or None outside @hydra.main."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get()
    except ValueError:
        return None


def is_multirun() -> bool:
    """This is a job of a Hydra multirun (-m)."""
    from hydra.types import RunMode

    hc = _hydra_config()
    return hc is not None and hc.mode == RunMode.MULTIRUN


def sweep_dir() -> Path | None:
    """The sweep's directory when this is a job of a Hydra multirun."""
    return Path(_hydra_config().sweep.dir) if is_multirun() else None


def job_dir() -> Path | None:
    """A multirun job's own directory (under the sweep's); None outside a multirun."""
    return Path(_hydra_config().runtime.output_dir).resolve() if is_multirun() else None


def hydra_overrides() -> list[str]:
    """The command line's overrides when running under @hydra.main (else none)."""
    hc = _hydra_config()
    return [] if hc is None else list(hc.overrides.task)


def swept_keys() -> set[str]:
    """The settings a sweep varies: its sweeper's params, and the command line's sweep overrides (a,b / choice(..)
    / range(..) / interval(..)) where the job runs in the sweep's own process."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not is_multirun():
        return set()
    keys = set((_hydra_config().sweeper.get("params") or {}).keys())
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if "=" in a])
    except Exception:
        return keys
    return keys | {o.key_or_group for o in overrides if o.is_sweep_override()}

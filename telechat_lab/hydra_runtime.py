"""What Hydra's runtime says about the running job, for any layer (it imports only Hydra)."""

from __future__ import annotations

from pathlib import Path


def sweep_dir() -> Path | None:
    """The sweep's directory when this is a job of a Hydra multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    except ValueError:
        return None

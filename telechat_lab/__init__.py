"""telechat-lab: fine-tuning for the TeleChat2 family (see README.md)."""

import os
from pathlib import Path


def cache_root() -> Path:
    """Where encoded datasets and the tiny checkpoint are cached: $TELECHAT_LAB_CACHE or ~/.cache/telechat_lab."""
    return Path(os.environ.get("TELECHAT_LAB_CACHE", "~/.cache/telechat_lab")).expanduser()

"""This package's TeleChat2 modeling files as remote code beside a checkpoint's config.json: transformers
(`trust_remote_code=True`) and PEFT load such a directory without telechat-lab installed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent
REMOTE_CODE = ("configuration_telechat2.py", "modeling_telechat2.py")
# only the classes the release's own modeling file has too (users swap it in): no AutoModel entry
AUTO_MAP = {
    "AutoConfig": "configuration_telechat2.Telechat2Config",
    "AutoModelForCausalLM": "modeling_telechat2.Telechat2ForCausalLM",
}


def add_remote_code(directory: Path, **config) -> None:
    """The remote-code files beside `directory`'s config.json and its `auto_map` to them (with `config`'s
    entries): transformers (`trust_remote_code=True`) and PEFT load the directory without this package."""
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(auto_map=dict(AUTO_MAP), **config)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in REMOTE_CODE:
        shutil.copy(MODEL_DIR / name, directory / name)

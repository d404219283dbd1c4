"""A run's data fingerprint: per dataset the content hash of each file (named relative to the dataset's path, so a
moved data directory is the same data) and the number of examples, and the identity of the training set and of
the validation split (their sizes and which examples they hold, in order). A checkpoint records it (the data
module's state); a resume compares it with the data it finds (training/datamodule.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .dataset import EncodedDataset


def _split_identity(ds: EncodedDataset | None) -> dict | None:
    if ds is None:
        return None
    order = np.ascontiguousarray(ds.index, dtype=np.int64)
    return {"examples": len(ds), "order": hashlib.blake2b(order.tobytes(), digest_size=16).hexdigest()}


def data_fingerprint(
    datasets: dict[str, dict], paths: dict[str, Path], train: EncodedDataset, val: EncodedDataset | None
) -> dict:
    """`datasets`: the report's per-dataset counts (with "files": {path: hash}); `paths`: each dataset's path."""
    fingerprint: dict = {"datasets": {}, "train": _split_identity(train), "validation": _split_identity(val)}
    for name, counts in datasets.items():
        base = paths[name] if paths[name].is_dir() else paths[name].parent
        files = {os.path.relpath(path, base): digest for path, digest in counts.get("files", {}).items()}
        fingerprint["datasets"][name] = {"files": files, "examples": counts["examples"]}
    return fingerprint


def fingerprint_changes(recorded: dict, current: dict) -> list[str]:
    """What differs between two fingerprints, one phrase per dataset or split ([] when nothing does)."""
    changes = []
    old, new = recorded.get("datasets", {}), current.get("datasets", {})
    for name in sorted(set(old) | set(new)):
        if name not in new:
            changes.append(f"dataset '{name}' is no longer used")
            continue
        if name not in old:
            changes.append(f"dataset '{name}' is new")
            continue
        what = []
        was, now = old[name].get("files", {}), new[name].get("files", {})
        edited = sorted(f for f in set(was) & set(now) if was[f] != now[f])
        what += [f"{f} changed" for f in edited]
        what += [f"{f} added" for f in sorted(set(now) - set(was))]
        what += [f"{f} removed" for f in sorted(set(was) - set(now))]
        if old[name].get("examples") != new[name].get("examples"):
            what.append(f"{old[name].get('examples')} -> {new[name].get('examples')} examples")
        if what:
            changes.append(f"dataset '{name}' ({', '.join(what)})")
    for key, label in (("train", "the training set"), ("validation", "the validation split")):
        was, now = recorded.get(key), current.get(key)
        if was == now:
            continue
        if was is None or now is None:
            changes.append(f"{label}: {'none' if was is None else 'one'} -> {'none' if now is None else 'one'}")
        elif was["examples"] != now["examples"]:
            changes.append(f"{label}: {was['examples']} -> {now['examples']} examples")
        else:
            changes.append(f"{label}: other examples")
    return changes

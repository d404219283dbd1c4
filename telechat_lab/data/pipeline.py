"""The configured datasets as training and validation sets: each encoded (data/preprocess.py), then mixed by
ratio, sampled, and split, seeded and deterministic; and the report of what became of every record."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from telechat_lab.config import DataConfig
from telechat_lab.errors import DataError

from .dataset import EncodedDataset
from .encoder import TemplateOptions
from .fingerprint import data_fingerprint
from .preprocess import encode_datasets
from .registry import check_kinds, load_dataset_info

DEMO_DATA = Path(__file__).resolve().parents[1] / "demo_data"  # the demo datasets shipped with the package


def dataset_names(cfg: DataConfig) -> list[str]:
    """data.datasets as a list (it may be given as "a,b")."""
    names = cfg.datasets.split(",") if isinstance(cfg.datasets, str) else list(cfg.datasets)
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise DataError("data.datasets is empty: name at least one dataset of dataset_info.json")
    return names


def template_options(cfg: DataConfig) -> TemplateOptions:
    return TemplateOptions(
        cfg.cutoff_len, cfg.train_on_prompt, cfg.mask_history, cfg.default_system, cfg.train_role_tokens
    )


def resolved_dataset_dir(dataset_dir: str) -> Path:
    """data.dataset_dir; the default `data`, where the working directory has no such directory, is the demo data
    shipped with the package."""
    path = Path(dataset_dir).expanduser()
    if path == Path("data") and not path.exists():
        return DEMO_DATA
    return path.resolve()


# ------------------------------------------------------------------------------------------ assembly


def mix_indices(n: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """floor(ratio) full copies plus a seeded random subset of the fractional part."""
    if ratio < 0:
        raise DataError(f"mixing ratio must be >= 0, got {ratio}")
    whole, frac = int(ratio), ratio - int(ratio)
    extra = rng.choice(n, size=round(frac * n), replace=False) if frac and n else np.zeros(0, np.int64)
    return np.concatenate([np.tile(np.arange(n), whole), np.sort(extra)]).astype(np.int64)


def build_datasets(
    cfg: DataConfig, tokenizer_path: str | Path, shuffle_order: bool = True, sample: bool = True, kind: str = "sft"
) -> tuple[EncodedDataset, EncodedDataset | None, dict]:
    """(train, validation or None, report). `report` holds per-dataset counts and totals, and the data's
    fingerprint (data/fingerprint.py). `kind`: the data the stage reads (stages.py: sft, pt, pairwise, kto); a
    dataset of another kind is refused before any record is read. A pair is one example: mixing, sampling and
    the validation split take or leave both of its sequences.
    `sample=False` skips mixing ratios and num_samples: every encoded example once (inspection)."""
    tokenizer_path = Path(tokenizer_path)
    names = dataset_names(cfg)
    specs = load_dataset_info(resolved_dataset_dir(cfg.dataset_dir), names)  # only the entries used are checked
    check_kinds([specs[n] for n in names], kind)
    mix = dict(cfg.mix or {})
    unknown_mix = set(mix) - set(names)
    if unknown_mix:
        raise DataError(f"data.mix names dataset(s) {sorted(unknown_mix)} that are not in data.datasets {names}")

    rng = np.random.default_rng(cfg.seed)
    parts, report = [], {"datasets": {}}
    for name, (ds, counts) in zip(
        names, encode_datasets([specs[n] for n in names], cfg, tokenizer_path, template_options(cfg))
    ):
        n = ds.stored()
        index = mix_indices(n, float(mix.get(name, 1.0)) if sample else 1.0, rng)
        wanted = specs[name].num_samples if sample else None
        if wanted and len(index):  # LLaMA-Factory's rule: a random subset, or every example plus random extras
            index = rng.permutation(index)
            extra = rng.choice(index, size=max(0, wanted - len(index)))
            index = np.sort(np.concatenate([index[:wanted], extra]))
        ds = ds.with_index(index)
        parts.append(ds)
        report["datasets"][name] = {**counts, **ds.stats()}
    full = EncodedDataset.concat(parts)
    if not len(full):
        raise DataError(
            f"no training examples: data.mix gives every dataset of {names} a ratio of 0; give at least "
            "one a ratio above 0"
        )

    order = rng.permutation(len(full)) if shuffle_order else np.arange(len(full))
    n_val = _val_count(cfg.val_size, len(full))
    val = full.subset(order[:n_val]) if n_val else None
    train = full.subset(np.sort(order[n_val:]) if not shuffle_order else order[n_val:])
    if not len(train):
        raise DataError(f"no training examples left after the validation split (data.val_size={cfg.val_size})")
    report["train"] = train.stats()
    report["val"] = val.stats() if val is not None else None
    report["fingerprint"] = data_fingerprint(report["datasets"], {n: specs[n].path for n in names}, train, val)
    for key in ("truncated", "dropped", "skipped", "split"):
        report[key] = sum(d.get(key, 0) for d in report["datasets"].values())
    return train, val, report


def _val_count(val_size: float, n: int) -> int:
    if not val_size:
        return 0
    count = int(val_size) if val_size >= 1 else math.floor(val_size * n)
    if val_size >= 1 and val_size != int(val_size):
        raise DataError(f"data.val_size={val_size}: a fraction below 1 or a whole number of examples")
    if count >= n:
        raise DataError(f"data.val_size={val_size} leaves no training example out of {n}")
    return max(count, 1)


REPORT_COLUMNS = ("records", "examples", "tokens", "trained_tokens", "truncated", "dropped", "skipped")


def format_report(report: dict) -> str:
    """What became of every dataset's records: examples made, tokens, and the records truncated (to
    data.cutoff_len), dropped (no trainable reply fits) and skipped (bad records, data.on_bad_record=skip),
    with where the first few dropped and skipped ones are and why."""
    datasets = report["datasets"]
    width = max(len("dataset"), *(len(n) for n in datasets))
    header = f"{'dataset':<{width}}  " + "  ".join(f"{c.replace('_', ' '):>14}" for c in REPORT_COLUMNS)
    lines = [header]
    for name, counts in datasets.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{counts.get(c, 0):>14,}" for c in REPORT_COLUMNS))
    total = {c: sum(d.get(c, 0) for d in datasets.values()) for c in REPORT_COLUMNS}
    if len(datasets) > 1:
        lines.append(f"{'total':<{width}}  " + "  ".join(f"{total[c]:>14,}" for c in REPORT_COLUMNS))
    for name, counts in datasets.items():
        if counts.get("split"):
            lines.append(
                f"{name}: {counts['split']} document(s) longer than data.cutoff_len split into rows of at most "
                "data.cutoff_len tokens (each an example)"
            )
        if counts.get("dropped"):
            lines.append(
                f"{name}: {counts['dropped']} dropped (no trainable reply within data.cutoff_len), e.g. "
                + _places(counts.get("dropped_at", []), name)
            )
        if counts.get("skipped"):
            reasons = ", ".join(f"{n} {reason}" for reason, n in counts.get("skip_reasons", {}).items())
            lines.append(
                f"{name}: {counts['skipped']} skipped ({reasons}), e.g. " + _places(counts.get("skipped_at", []), name)
            )
    train, val = report.get("train") or {}, report.get("val")
    if train:
        lines.append(
            f"train: {train['examples']:,} examples, {train['tokens']:,} tokens"
            + (f"; validation: {val['examples']:,} examples" if val else "; no validation split")
        )
    return "\n".join(lines)


_PLACE = re.compile(r"(?P<head>.* (?:line|record)) (?P<index>\d+)(?P<rest>(?::.*)?)$")  # a record's place


def _places(places: list[str], name: str) -> str:
    """Where records are ("dataset 'd': PATH line 5", "... line 7: message 2", ...) said once a file, in order:
    "PATH lines 5, 7: message 2 and 12", the dataset's name, which the report's line starts with, left out."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for place in places:
        found = _PLACE.match(place.removeprefix(f"dataset '{name}': "))
        if found:
            groups.setdefault(found["head"], []).append((int(found["index"]), found["index"] + found["rest"]))
        else:
            groups.setdefault(place, [])
    said = []
    for head, indices in groups.items():
        at = [text for _, text in sorted(indices)]  # unreadable lines come first in the counts, then the rest
        if len(at) > 1:
            said.append(f"{head}s {', '.join(at[:-1])} and {at[-1]}")
        else:
            said.append(f"{head} {at[0]}" if at else head)
    return "; ".join(said)

"""Load, encode (in parallel, cached on disk), mix and split the configured datasets.

Each dataset is encoded once per (data files, tokenizer, template, options) and the result cached
as arrays; a second run, or every job of a sweep, re-uses it. Mixing and the validation split are
seeded and deterministic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import sys
from array import array
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from telechat_lab import cache_root
from telechat_lab.config import DataConfig
from telechat_lab.tokenizer import tokenizer_hash

from .formats import to_conversation
from .registry import DataError, DatasetSpec, index_unit, load_dataset_info, read_records
from .template import IGNORE, TEMPLATE_VERSION, ChatEncoder, TemplateOptions

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


def dataset_names(cfg: DataConfig) -> list[str]:
    """data.datasets as a list (it may be given as "a,b")."""
    names = cfg.datasets.split(",") if isinstance(cfg.datasets, str) else list(cfg.datasets)
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise DataError("data.datasets is empty: name at least one dataset of dataset_info.json")
    return names


def template_options(cfg: DataConfig) -> TemplateOptions:
    return TemplateOptions(cfg.cutoff_len, cfg.train_on_prompt, cfg.mask_history, cfg.default_system,
                           cfg.train_role_tokens)


def resolved_dataset_dir(dataset_dir: str) -> Path:
    """data.dataset_dir; a relative one that does not exist in the working directory is the bundled demo data's."""
    path = Path(dataset_dir).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    return path.resolve()


class EncodedDataset:
    """Encoded examples stored flat: example i is tokens[offsets[i]:offsets[i+1]]; `index` selects
    (and may repeat) examples; `source` gives each example's (dataset, record) for inspection."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray, offsets: np.ndarray, index: np.ndarray | None = None,
                 source: np.ndarray | None = None, names: Sequence[str] = ()):
        self.tokens, self.labels, self.offsets = tokens, labels, offsets
        self.index = np.arange(len(offsets) - 1) if index is None else index
        self.source = source if source is not None else np.zeros((len(offsets) - 1, 2), dtype=np.int64)
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        j = self.index[i]
        start, end = self.offsets[j], self.offsets[j + 1]
        return {"input_ids": self.tokens[start:end], "labels": self.labels[start:end]}

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)[self.index]

    def subset(self, positions: np.ndarray) -> EncodedDataset:
        return EncodedDataset(self.tokens, self.labels, self.offsets, self.index[positions], self.source, self.names)

    def stats(self) -> dict[str, int]:
        lengths = self.lengths()
        trained = np.add.reduceat(self.labels != IGNORE, self.offsets[:-1]) if len(self.offsets) > 1 else np.zeros(0)
        return {"examples": len(self), "tokens": int(lengths.sum()), "trained_tokens": int(trained[self.index].sum())}

    @staticmethod
    def concat(parts: Sequence[EncodedDataset]) -> EncodedDataset:
        tokens, labels, offsets, index, source, base = [], [], [np.zeros(1, dtype=np.int64)], [], [], 0
        end = 0  # tokens so far
        names: list[str] = []
        for part in parts:
            tokens.append(part.tokens)
            labels.append(part.labels)
            offsets.append(part.offsets[1:] + end)
            end += int(part.offsets[-1])
            index.append(part.index + base)
            src = part.source.copy()
            src[:, 0] += len(names)
            source.append(src)
            names += part.names
            base += len(part.offsets) - 1
        return EncodedDataset(np.concatenate(tokens), np.concatenate(labels), np.concatenate(offsets),
                              np.concatenate(index), np.concatenate(source), names)


# ------------------------------------------------------------------------------------------ encoding


_ENCODERS: dict[tuple, ChatEncoder] = {}
BATCH = 4096  # records per SentencePiece batch call


def get_encoder(tokenizer_path: Path, options: TemplateOptions, num_threads: int = 1) -> ChatEncoder:
    """One encoder per (tokenizer, options, threads), shared by every dataset of a run."""
    key = (str(tokenizer_path), options, num_threads)
    if key not in _ENCODERS:
        _ENCODERS[key] = ChatEncoder(tokenizer_path, options, num_threads=num_threads)
    return _ENCODERS[key]


_SHARED_RECORDS: list = []  # the records being encoded, inherited by forked workers


def _encode_job(job: tuple) -> tuple:
    tokenizer_path, options, spec, records, placeholders = job
    if isinstance(records, tuple):  # (dataset, start, end) into the parent's records
        n, start, end = records
        records = _SHARED_RECORDS[n][start:end]
    return _encode_records(get_encoder(Path(tokenizer_path), options), spec, records, placeholders)


def _encode_records(encoder: ChatEncoder, spec: DatasetSpec, records: list, placeholders: dict) -> tuple:
    tokens: list[int] = []
    labels: list[int] = []
    lengths, kept, truncated, dropped = [], [], 0, 0
    units: dict = {}  # file -> what its record index counts ("line" or "record")
    for start in range(0, len(records), BATCH):
        convs, wheres = [], []
        for path, index, record in records[start:start + BATCH]:
            unit = units.get(path) or units.setdefault(path, index_unit(path))
            where = f"dataset '{spec.name}': {path} {unit} {index}"
            conv = to_conversation(spec, record, where)
            if placeholders:
                conv.turns = [(_fill(u, placeholders), _fill(a, placeholders)) for u, a in conv.turns]
            convs.append(conv)
            wheres.append(where)
        for pos, enc in enumerate(encoder.encode_batch(convs, wheres), start):
            if enc is None:
                dropped += 1
                continue
            truncated += enc.truncated
            tokens += enc.input_ids
            labels += enc.labels
            lengths.append(len(enc.input_ids))
            kept.append(pos)
    return (np.frombuffer(array("i", tokens), dtype=np.int32), np.frombuffer(array("i", labels), dtype=np.int32),
            np.asarray(lengths, dtype=np.int64), np.asarray(kept, dtype=np.int64), truncated, dropped)


def _fill(text: str, placeholders: dict[str, str]) -> str:
    for key, value in placeholders.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def encode_dataset(spec: DatasetSpec, cfg: DataConfig, tokenizer_path: Path) -> tuple[EncodedDataset, dict]:
    """Encode one dataset (records in file order), re-using the on-disk cache when it is valid."""
    return encode_datasets([spec], cfg, tokenizer_path)[0]


def encode_datasets(specs: list[DatasetSpec], cfg: DataConfig, tokenizer_path: Path) -> list[tuple]:
    """[(dataset, counts)] for `specs`: cached ones loaded, the others encoded, with
    data.preprocessing_num_workers processes sharing one pool over all their records."""
    options = template_options(cfg)
    results: list = [None] * len(specs)
    pending = []  # (position, spec, records, placeholders, cache_file)
    for i, spec in enumerate(specs):
        placeholders = dict(cfg.placeholders) if spec.name in set(cfg.fill_placeholders) else {}
        cache_file = _cache_file(spec, cfg, tokenizer_path, options, placeholders)
        if cache_file.exists() and not cfg.overwrite_cache:
            try:
                results[i] = _load_cache(cache_file, spec.name)
                continue
            except Exception as err:  # a corrupt cache is rebuilt, never trusted
                log.warning("ignoring unreadable cache %s: %s", cache_file, err)
        records = read_records(spec)
        if not records:
            raise DataError(f"dataset '{spec.name}': {spec.path} holds no records")
        if cfg.max_samples:
            records = records[: cfg.max_samples]
        pending.append((i, spec, records, placeholders, cache_file))

    workers = max(1, int(cfg.preprocessing_num_workers or 1))
    total = sum(len(p[2]) for p in pending)
    if workers > 1 and total >= 32 * workers:
        chunk = -(-total // (2 * workers))  # two shares a worker evens out uneven records
        fork = sys.platform == "linux"
        jobs, owners = [], []
        for n, (_, spec, records, placeholders, _) in enumerate(pending):
            for start in range(0, len(records), chunk):
                # forked workers read the records from the parent's memory: only (dataset, range) travels
                share = (n, start, start + chunk) if fork else records[start:start + chunk]
                jobs.append((str(tokenizer_path), options, spec, share, placeholders))
                owners.append((n, start))
        _SHARED_RECORDS[:] = [p[2] for p in pending] if fork else []
        try:
            with mp.get_context("fork" if fork else "spawn").Pool(min(workers, len(jobs))) as pool:
                outputs = pool.map(_encode_job, jobs)
        finally:
            _SHARED_RECORDS.clear()
        encoded = [[] for _ in pending]
        for (n, start), part in zip(owners, outputs):
            part[3][:] += start
            encoded[n].append(part)
        encoded = [tuple(np.concatenate([p[k] for p in parts]) for k in range(4))
                   + (sum(p[4] for p in parts), sum(p[5] for p in parts)) for parts in encoded]
    else:
        encoder = get_encoder(tokenizer_path, options)
        encoded = [_encode_records(encoder, spec, records, placeholders)
                   for _, spec, records, placeholders, _ in pending]

    for (i, spec, records, _, cache_file), (tokens, labels, lengths, kept, truncated, dropped) in zip(pending,
                                                                                                      encoded):
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        record_index = np.array([records[k][1] for k in kept], dtype=np.int64)
        counts = {"records": len(records), "truncated": int(truncated), "dropped": int(dropped)}
        if not len(kept):
            raise DataError(f"dataset '{spec.name}': all {len(records)} records were dropped (no trainable "
                            f"reply within data.cutoff_len={cfg.cutoff_len})")
        source = np.stack([np.zeros_like(record_index), record_index], axis=1)
        dataset = EncodedDataset(tokens, labels, offsets, None, source, [spec.name])
        _save_cache(cache_file, dataset, counts)
        results[i] = (dataset, counts)
    return results


def _file_fingerprint(spec: DatasetSpec) -> list:
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in spec.files()]


def _cache_file(spec, cfg, tokenizer_path, options, placeholders) -> Path | None:
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root()
    key = json.dumps({
        "version": TEMPLATE_VERSION, "files": _file_fingerprint(spec), "tokenizer": tokenizer_hash(tokenizer_path),
        "spec": [spec.formatting, spec.columns, spec.tags], "options": asdict(options),
        "placeholders": placeholders, "max_samples": cfg.max_samples,
    }, sort_keys=True, default=str)
    return root / "datasets" / f"{spec.name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def _save_cache(path: Path, ds: EncodedDataset, counts: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, tokens=ds.tokens, labels=ds.labels, offsets=ds.offsets, source=ds.source,
             counts=np.frombuffer(json.dumps(counts).encode(), dtype=np.uint8))
    os.replace(tmp, path)


def _load_cache(path: Path, name: str) -> tuple[EncodedDataset, dict]:
    with np.load(path) as f:
        counts = json.loads(f["counts"].tobytes().decode())
        ds = EncodedDataset(f["tokens"], f["labels"], f["offsets"], None, f["source"], [name])
    counts["cached"] = True
    return ds, counts


# ------------------------------------------------------------------------------------------ assembly


def mix_indices(n: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """floor(ratio) full copies plus a seeded random subset of the fractional part."""
    if ratio < 0:
        raise DataError(f"mixing ratio must be >= 0, got {ratio}")
    whole, frac = int(ratio), ratio - int(ratio)
    extra = rng.choice(n, size=round(frac * n), replace=False) if frac and n else np.zeros(0, np.int64)
    return np.concatenate([np.tile(np.arange(n), whole), np.sort(extra)]).astype(np.int64)


def build_datasets(cfg: DataConfig, tokenizer_path: str | Path, shuffle_order: bool = True, sample: bool = True
                   ) -> tuple[EncodedDataset, EncodedDataset | None, dict]:
    """(train, validation or None, report). `report` holds per-dataset counts and totals.
    `sample=False` skips mixing ratios and num_samples: every encoded example once (inspection)."""
    tokenizer_path = Path(tokenizer_path)
    names = dataset_names(cfg)
    specs = load_dataset_info(resolved_dataset_dir(cfg.dataset_dir), names)  # only the entries used are checked
    mix = dict(cfg.mix or {})
    unknown_mix = set(mix) - set(names)
    if unknown_mix:
        raise DataError(f"data.mix names dataset(s) {sorted(unknown_mix)} that are not in data.datasets {names}")

    rng = np.random.default_rng(cfg.seed)
    parts, report = [], {"datasets": {}}
    for name, (ds, counts) in zip(names, encode_datasets([specs[n] for n in names], cfg, tokenizer_path)):
        n = len(ds.offsets) - 1
        index = mix_indices(n, float(mix.get(name, 1.0)) if sample else 1.0, rng)
        wanted = specs[name].num_samples if sample else None
        if wanted and len(index):  # LLaMA-Factory's rule: a random subset, or every example plus random extras
            index = rng.permutation(index)
            extra = rng.choice(index, size=max(0, wanted - len(index)))
            index = np.sort(np.concatenate([index[:wanted], extra]))
        ds = EncodedDataset(ds.tokens, ds.labels, ds.offsets, index, ds.source, ds.names)
        parts.append(ds)
        report["datasets"][name] = {**counts, **ds.stats()}
    full = EncodedDataset.concat(parts)

    order = rng.permutation(len(full)) if shuffle_order else np.arange(len(full))
    n_val = _val_count(cfg.val_size, len(full))
    val = full.subset(order[:n_val]) if n_val else None
    train = full.subset(np.sort(order[n_val:]) if not shuffle_order else order[n_val:])
    if not len(train):
        raise DataError(f"no training examples left after the validation split (data.val_size={cfg.val_size})")
    report["train"] = train.stats()
    report["val"] = val.stats() if val is not None else None
    report["truncated"] = sum(d["truncated"] for d in report["datasets"].values())
    report["dropped"] = sum(d["dropped"] for d in report["datasets"].values())
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

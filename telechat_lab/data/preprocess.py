"""Encoding datasets: records -> conversations -> ids and labels, in `data.preprocessing_num_workers`
processes sharing one pool over every dataset's records, with a progress bar, and cached on disk as arrays
keyed by the files' contents (data/content_hash.py), the tokenizer, the template version, the kind of data
(conversations, raw text, preference pairs, KTO examples: registry.py) and the options (a second run, or every job
of a sweep, re-uses it). A cache file is checked when loaded (its arrays consistent, every id inside the vocabulary,
the rows of a pair sharing their untrained prompt) and rebuilt when it is not; one that cannot be written is a
warning (data/cache_files.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import sys
from array import array
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from telechat_lab import cache_root
from telechat_lab.config import DataConfig
from telechat_lab.errors import BadRecord, DataError
from telechat_lab.tokenizer import IGNORE_INDEX, tokenizer_hash

from .cache_files import remove_dead_temporaries, write_cache_file
from .content_hash import content_hashes
from .dataset import EncodedDataset
from .encoder import TEMPLATE_VERSION, ChatEncoder, TemplateOptions
from .formats import Conversation, to_conversation, to_prompted, to_text
from .registry import DatasetSpec, index_unit, read_records

log = logging.getLogger(__name__)
BATCH = 4096  # records per SentencePiece batch call
EXAMPLES_SHOWN = 3  # of the dropped / skipped records, how many the report names


class EncodeJob(NamedTuple):
    tokenizer_path: str
    options: TemplateOptions
    spec: DatasetSpec
    records: list | tuple  # (file, index, record) triples, or (dataset, start, end) into the parent's records
    placeholders: dict
    skip_bad: bool


class EncodedPart(NamedTuple):
    """A run of one dataset's records, encoded."""

    tokens: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    kept: np.ndarray  # the position (among the records given) of each example
    truncated: int
    dropped: list[str]  # where each record without a trainable reply within cutoff_len is
    skipped: list[tuple[str, str]]  # (reason, where) of each bad record skipped
    fields: dict[str, np.ndarray]  # per example: prompt_len (pairwise, kto), kto_tag (kto)
    split: int = 0  # raw-text documents split into several rows
    records: int = 0  # records read (progress)

    @staticmethod
    def join(parts: list[tuple[int, EncodedPart]]) -> EncodedPart:
        """Parts of one dataset, each with the position of its first record."""
        return EncodedPart(
            *(np.concatenate([getattr(p, k) for _, p in parts]) for k in ("tokens", "labels", "lengths")),
            np.concatenate([p.kept + start for start, p in parts]),
            sum(p.truncated for _, p in parts),
            [w for _, p in parts for w in p.dropped],
            [s for _, p in parts for s in p.skipped],
            {key: np.concatenate([p.fields[key] for _, p in parts]) for key in parts[0][1].fields},
            sum(p.split for _, p in parts),
            sum(p.records for _, p in parts),
        )


_ENCODERS: dict[tuple, ChatEncoder] = {}


def get_encoder(tokenizer_path: Path, options: TemplateOptions, num_threads: int = 1) -> ChatEncoder:
    """One encoder per (tokenizer, options, threads), shared by every dataset of a run."""
    key = (str(tokenizer_path), options, num_threads)
    if key not in _ENCODERS:
        _ENCODERS[key] = ChatEncoder(tokenizer_path, options, num_threads=num_threads)
    return _ENCODERS[key]


_SHARED_RECORDS: list = []  # the records being encoded, inherited by forked workers


def _encode_job(job: EncodeJob) -> EncodedPart:
    records = job.records
    if isinstance(records, tuple):
        n, start, end = records
        records = _SHARED_RECORDS[n][start:end]
    return encode_records(
        get_encoder(Path(job.tokenizer_path), job.options), job.spec, records, job.placeholders, job.skip_bad
    )


PARSERS = {"sft": to_conversation, "pt": to_text, "pairwise": to_prompted, "kto": to_prompted}
FIELDS = {"sft": (), "pt": (), "pairwise": ("prompt_len",), "kto": ("prompt_len", "kto_tag")}
ROWS = {"sft": 1, "pt": 1, "pairwise": 2, "kto": 1}  # sequences an example stores


def encode_records(
    encoder: ChatEncoder, spec: DatasetSpec, records: list, placeholders: dict, skip_bad: bool = False
) -> EncodedPart:
    """The records of one dataset of kind `spec.kind` encoded (registry.py; encoder.py for each kind)."""
    tokens: list[int] = []
    labels: list[int] = []
    lengths, kept, truncated, dropped, skipped, split = [], [], 0, [], [], 0
    fields: dict[str, list] = {key: [] for key in FIELDS[spec.kind]}
    parse = PARSERS[spec.kind]
    units: dict = {}  # file -> what its record index counts ("line" or "record")
    for start in range(0, len(records), BATCH):
        items, positions, wheres = [], [], []
        for pos, (path, index, record) in enumerate(records[start : start + BATCH], start):
            unit = units.get(path) or units.setdefault(path, index_unit(path))
            where = f"dataset '{spec.name}': {path} {unit} {index}"
            try:
                item = parse(spec, record, where)
            except BadRecord as bad:
                if not skip_bad:
                    raise
                skipped.append((bad.reason, bad.where))
                continue
            items.append(_filled(item, placeholders) if placeholders else item)
            positions.append(pos)
            wheres.append(where)
        if spec.kind == "pt":
            for pos, (rows, was_split) in zip(positions, encoder.encode_texts(items)):
                split += was_split
                for row in rows:
                    tokens += row
                    labels += row
                    lengths.append(len(row))
                    kept.append(pos)
            continue
        encode = encoder.encode_batch if spec.kind == "sft" else encoder.encode_prompted_batch
        for pos, where, item, enc in zip(positions, wheres, items, encode(items)):
            if enc is None:
                dropped.append(where)
                continue
            truncated += enc.truncated
            for input_ids, row_labels in [(enc.input_ids, enc.labels)] if spec.kind == "sft" else enc.rows:
                tokens += input_ids
                labels += row_labels
                lengths.append(len(input_ids))
            kept.append(pos)
            if spec.kind != "sft":
                fields["prompt_len"].append(enc.prompt_len)
            if spec.kind == "kto":
                fields["kto_tag"].append(item.tag)
    return EncodedPart(
        np.frombuffer(array("i", tokens), dtype=np.int32),
        np.frombuffer(array("i", labels), dtype=np.int32),
        np.asarray(lengths, dtype=np.int64),
        np.asarray(kept, dtype=np.int64),
        truncated,
        dropped,
        skipped,
        {key: np.asarray(values, dtype=bool if key == "kto_tag" else np.int64) for key, values in fields.items()},
        split,
        len(records),
    )


def _filled(item, placeholders: dict[str, str]):
    """A parsed record (conversation, text or prompt with replies) with its {{placeholders}} filled."""
    if isinstance(item, str):
        return _fill(item, placeholders)
    conv = item if isinstance(item, Conversation) else item.conv
    conv.turns = [(_fill(u, placeholders), _fill(a, placeholders)) for u, a in conv.turns]
    if not isinstance(item, Conversation):
        item.query = _fill(item.query, placeholders)
        item.replies = [_fill(r, placeholders) for r in item.replies]
    return item


def _fill(text: str, placeholders: dict[str, str]) -> str:
    for key, value in placeholders.items():
        text = text.replace("{{" + key + "}}", value)
    return text


class _Pending(NamedTuple):
    position: int  # in the specs asked for
    spec: DatasetSpec
    records: list
    unreadable: list[BadRecord]  # lines that are no record at all (skipped)
    placeholders: dict
    cache_file: Path


def encode_datasets(
    specs: list[DatasetSpec], cfg: DataConfig, tokenizer_path: Path, options: TemplateOptions
) -> list[tuple[EncodedDataset, dict]]:
    """[(dataset, counts)] for `specs`: cached ones loaded, the others encoded, with
    data.preprocessing_num_workers processes sharing one pool over all their records."""
    results: list = [None] * len(specs)
    pending: list[_Pending] = []
    skip_bad = cfg.on_bad_record == "skip"
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root()
    remove_dead_temporaries(root)
    remove_dead_temporaries(root / "datasets")
    hashes = {}
    for i, spec in enumerate(specs):
        placeholders = dict(cfg.placeholders) if spec.name in set(cfg.fill_placeholders) else {}
        hashes[i] = content_hashes(spec.files(), f"dataset '{spec.name}'", root, cfg.trust_file_stat)
        cache_file = _cache_file(root, spec, cfg, tokenizer_path, options, placeholders, hashes[i])
        if cache_file.is_file() and not cfg.overwrite_cache:
            try:
                dataset, counts = _load_cache(cache_file, spec.name)
                _check_cached(
                    dataset,
                    counts,
                    get_encoder(tokenizer_path, options).sp.get_piece_size(),
                    options.cutoff_len,
                    spec.kind,
                )
                results[i] = (dataset, {**counts, "files": hashes[i]})
                continue
            except Exception as err:  # a corrupt cache is rebuilt, never trusted
                log.warning("rebuilding the data cache %s: %s", cache_file, err)
        records, unreadable = read_records(spec, skip_bad)
        if not records:
            raise DataError(
                f"dataset '{spec.name}': {spec.path} holds no records"
                + (f" ({len(unreadable)} unreadable lines skipped)" if unreadable else "")
            )
        if cfg.max_samples:
            records = records[: cfg.max_samples]
        pending.append(_Pending(i, spec, records, unreadable, placeholders, cache_file))
    if not pending:
        return results

    encoded = _encode_pending(
        pending, str(tokenizer_path), options, skip_bad, max(1, int(cfg.preprocessing_num_workers or 1))
    )
    for job, part in zip(pending, encoded):
        skipped = [(bad.reason, bad.where) for bad in job.unreadable] + part.skipped
        counts = {
            "records": len(job.records) + len(job.unreadable),
            "truncated": int(part.truncated),
            "split": int(part.split),
            "dropped": len(part.dropped),
            "skipped": len(skipped),
            "skip_reasons": dict(Counter(reason for reason, _ in skipped)),
            "dropped_at": part.dropped[:EXAMPLES_SHOWN],
            "skipped_at": [w for _, w in skipped[:EXAMPLES_SHOWN]],
        }
        if not len(part.kept):
            raise DataError(
                f"dataset '{job.spec.name}': none of its {counts['records']} records is left to train on "
                f"({counts['dropped']} without a trainable reply within data.cutoff_len={cfg.cutoff_len}"
                f", {counts['skipped']} skipped as bad records)"
            )
        offsets = np.concatenate([[0], np.cumsum(part.lengths)]).astype(np.int64)
        record_index = np.array([job.records[k][1] for k in part.kept], dtype=np.int64)
        source = np.stack([np.zeros_like(record_index), record_index], axis=1)
        dataset = EncodedDataset(
            part.tokens, part.labels, offsets, None, source, [job.spec.name], ROWS[job.spec.kind], part.fields
        )
        _save_cache(job.cache_file, dataset, counts)
        results[job.position] = (dataset, {**counts, "files": hashes[job.position]})
    return results


def _encode_pending(
    pending: list[_Pending], tokenizer_path: str, options: TemplateOptions, skip_bad: bool, workers: int
) -> list[EncodedPart]:
    total = sum(len(p.records) for p in pending)
    progress = _Progress(total, f"encoding {', '.join(p.spec.name for p in pending)}")
    if workers == 1 or total < 32 * workers:
        encoder = get_encoder(Path(tokenizer_path), options)
        parts = []
        for p in pending:
            pieces = []
            for start in range(0, len(p.records), BATCH):
                pieces.append(
                    (start, encode_records(encoder, p.spec, p.records[start : start + BATCH], p.placeholders, skip_bad))
                )
                progress.advance(pieces[-1][1].records)
            parts.append(EncodedPart.join(pieces))
        progress.close()
        return parts
    chunk = min(BATCH, -(-total // (2 * workers)))  # two shares a worker at least, evening out uneven records
    fork = sys.platform == "linux"
    jobs, owners = [], []
    for n, p in enumerate(pending):
        for start in range(0, len(p.records), chunk):
            # forked workers read the records from the parent's memory: only (dataset, range) travels
            share = (n, start, start + chunk) if fork else p.records[start : start + chunk]
            jobs.append(EncodeJob(tokenizer_path, options, p.spec, share, p.placeholders, skip_bad))
            owners.append((n, start))
    _SHARED_RECORDS[:] = [p.records for p in pending] if fork else []
    outputs = []
    try:
        with mp.get_context("fork" if fork else "spawn").Pool(min(workers, len(jobs))) as pool:
            for part in pool.imap(_encode_job, jobs):
                outputs.append(part)
                progress.advance(part.records)
    finally:
        _SHARED_RECORDS.clear()
        progress.close()
    by_dataset: list[list] = [[] for _ in pending]
    for (n, start), part in zip(owners, outputs):
        by_dataset[n].append((start, part))
    return [EncodedPart.join(parts) for parts in by_dataset]


class _Progress:
    """A progress bar on a terminal; on a log (no terminal), a line at the start and at the end."""

    def __init__(self, total: int, description: str):
        self.total, self.done, self.bar = total, 0, None
        if total < 2 * BATCH:  # a second's work: nothing to show
            return
        if sys.stderr.isatty():
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.bar.start()
            self.task = self.bar.add_task(description, total=total)
        else:
            print(f"{description}: {total:,} records ...", file=sys.stderr, flush=True)

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _cache_file(
    root: Path,
    spec: DatasetSpec,
    cfg: DataConfig,
    tokenizer_path: Path,
    options: TemplateOptions,
    placeholders: dict,
    hashes: dict[str, str],
) -> Path:
    key = json.dumps(
        {
            "version": TEMPLATE_VERSION,
            "files": hashes,
            "tokenizer": tokenizer_hash(tokenizer_path),
            "spec": [spec.formatting, spec.columns, spec.tags],
            "kind": spec.kind,
            "sample_by": spec.sample_by if spec.kind == "pt" else None,
            "options": asdict(options),
            "placeholders": placeholders,
            "max_samples": cfg.max_samples,
            "on_bad_record": cfg.on_bad_record,
        },
        sort_keys=True,
        default=str,
    )
    return root / "datasets" / f"{spec.name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def _save_cache(path: Path, ds: EncodedDataset, counts: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                tokens=ds.tokens,
                labels=ds.labels,
                offsets=ds.offsets,
                source=ds.source,
                rows=np.asarray(ds.rows, dtype=np.int64),
                counts=np.frombuffer(json.dumps(counts).encode(), dtype=np.uint8),
                **{f"field_{key}": values for key, values in ds.fields.items()},
            )

    write_cache_file(path, write)


def _load_cache(path: Path, name: str) -> tuple[EncodedDataset, dict]:
    with np.load(path) as f:
        counts = json.loads(f["counts"].tobytes().decode())
        rows = int(f["rows"]) if "rows" in f else 1
        if rows not in (1, 2):
            raise ValueError(f"its examples have {rows} rows")
        fields = {key.removeprefix("field_"): f[key] for key in f.files if key.startswith("field_")}
        ds = EncodedDataset(f["tokens"], f["labels"], f["offsets"], None, f["source"], [name], rows, fields)
    if not isinstance(counts, dict) or not isinstance(counts.get("records"), int):
        raise ValueError("its counts are not a record count")
    counts["cached"] = True
    return ds, counts


def _check_cached(ds: EncodedDataset, counts: dict, vocab_size: int, cutoff_len: int, kind: str = "sft") -> None:
    """ValueError saying what is wrong with a loaded cache's arrays (a truncated or altered file) for data of
    `kind`."""
    tokens, labels, offsets, source = ds.tokens, ds.labels, ds.offsets, ds.source
    if tokens.ndim != 1 or labels.shape != tokens.shape or tokens.dtype.kind != "i" or labels.dtype.kind != "i":
        raise ValueError("its tokens and labels are not two integer arrays of one length")
    sequences = len(offsets) - 1
    if offsets.ndim != 1 or sequences < 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
        raise ValueError(f"its offsets do not span its {len(tokens)} tokens")
    if ds.rows != ROWS[kind] or sequences % ds.rows:
        raise ValueError(f"its examples are not of {ROWS[kind]} sequence(s) each ({kind} data)")
    n = sequences // ds.rows
    lengths = np.diff(offsets)
    if lengths.min() < 1 or lengths.max() > cutoff_len:
        raise ValueError(f"an example's length is outside 1..{cutoff_len} (data.cutoff_len)")
    if source.shape != (n, 2):
        raise ValueError(f"its source does not name each of its {n} examples")
    if sorted(ds.fields) != sorted(FIELDS[kind]) or any(v.shape != (n,) for v in ds.fields.values()):
        raise ValueError(f"its per-example fields are not {list(FIELDS[kind])} of its {n} examples")
    if "kto_tag" in ds.fields and ds.fields["kto_tag"].dtype != bool:
        raise ValueError("its kto tags are not true / false")
    if "prompt_len" in ds.fields:
        _check_prompts(ds, lengths.reshape(n, ds.rows))
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"a token id is outside the tokenizer's vocabulary of {vocab_size}")
    trained = labels != IGNORE_INDEX
    if not np.array_equal(labels[trained], tokens[trained]):
        raise ValueError("a label is neither ignored nor its token")


def _check_prompts(ds: EncodedDataset, lengths: np.ndarray) -> None:
    """Each example's prompt is shorter than each of its rows, untrained, and the same in every row."""
    prompt_len = ds.fields["prompt_len"]
    if prompt_len.dtype.kind != "i" or (prompt_len < 0).any() or (prompt_len[:, None] >= lengths).any():
        raise ValueError("a prompt length is outside its example's rows")
    starts = ds.offsets[:-1].reshape(-1, ds.rows)

    def positions(k: int) -> np.ndarray:  # every prompt token of row k of every example, in example order
        before = np.cumsum(prompt_len) - prompt_len
        return np.arange(prompt_len.sum()) - np.repeat(before, prompt_len) + np.repeat(starts[:, k], prompt_len)

    first = positions(0)
    for k in range(ds.rows):
        at = positions(k) if k else first
        if (ds.labels[at] != IGNORE_INDEX).any() or (k and not np.array_equal(ds.tokens[at], ds.tokens[first])):
            raise ValueError("a prompt is trained or differs between the rows of its example")

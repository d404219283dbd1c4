"""Encoding datasets: records -> conversations -> ids and labels, in `data.preprocessing_num_workers`
processes sharing one pool over every dataset's records, with a progress bar, and cached on disk as arrays
keyed by the files' contents (data/content_hash.py), the tokenizer, the template version, the kind of data
(conversations, raw text, preference pairs, KTO examples: registry.py) and the options (a second run, or every job
of a sweep, re-uses it). Records are read streaming (registry.iter_records) and encoded a shard of
SHARD_RECORDS at a time, each shard's arrays appended to the cache's files as it is done (cache_files.py), so that
memory does not grow with the records; the dataset returned maps the files (no token is read until used). A cache
entry is checked when loaded (its files the size its meta.json says, its arrays consistent, every id inside the
vocabulary, the rows of a pair sharing their untrained prompt: read a chunk at a time) and rebuilt when it is not;
one that cannot be written is a warning, and the data are then kept in memory (data/cache_files.py)."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import mmap
import multiprocessing as mp
import signal
import sys
import threading
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import numpy as np

from telechat_lab import cache_root
from telechat_lab.config import DataConfig
from telechat_lab.errors import BadRecord, DataError
from telechat_lab.tokenizer import IGNORE_INDEX, tokenizer_hash

from .cache_files import (
    ArrayWriter,
    is_verified,
    mark_verified,
    read_arrays,
    remove_dead_temporaries,
    warn_unwritable,
)
from .content_hash import content_hashes
from .dataset import EncodedDataset, sequence_counts
from .encoder import TEMPLATE_VERSION, ChatEncoder, TemplateOptions
from .formats import Conversation, to_conversation, to_prompted, to_text
from .registry import DatasetSpec, JsonLine, index_unit, iter_records, json_record

log = logging.getLogger(__name__)
BATCH = 4096  # records per SentencePiece batch call
SHARD_RECORDS = 1024  # records read and encoded before their arrays are written out (bounds the memory)
JOB_RECORDS = 2048  # records a worker encodes at a time (data.preprocessing_num_workers > 1)
CHECK_TOKENS = 1 << 23  # tokens a loaded cache's check reads at a time
EXAMPLES_SHOWN = 3  # of the dropped / skipped records, how many the report names


class EncodeJob(NamedTuple):
    tokenizer_path: str
    options: TemplateOptions
    spec: DatasetSpec
    records: list  # (file, index, record) triples; a record may be a JSON line still to decode (JsonLine)
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
    counts: np.ndarray | None = None  # per sequence: trained labels, first label trained (dataset.sequence_counts)
    unreadable: tuple[tuple[str, str], ...] = ()  # (reason, where) of each JSON line given that holds no record


_ENCODERS: dict[tuple, ChatEncoder] = {}


def get_encoder(tokenizer_path: Path, options: TemplateOptions, num_threads: int = 1) -> ChatEncoder:
    """One encoder per (tokenizer, options, threads), shared by every dataset of a run."""
    key = (str(tokenizer_path), options, num_threads)
    if key not in _ENCODERS:
        _ENCODERS[key] = ChatEncoder(tokenizer_path, options, num_threads=num_threads)
    return _ENCODERS[key]


def _leave_ctrl_c_to_the_main_process() -> None:
    """A worker ignores SIGINT (Ctrl+C reaches the whole process group): the main process stops, removes what it
    wrote, shuts the pool down and reports it, once, where each worker would print a traceback of its own. A
    Ctrl+C while the worker started was held back (_ctrl_c_held): let through now, it is ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """SIGINT held back while this thread may start a worker (a submit): blocked here, so that the worker inherits
    the hold and a Ctrl+C before it ignores SIGINT cannot stop it half-started (a traceback of its own), and only
    noted by this process's handler meanwhile (another of its threads may take the signal, and Python would then
    interrupt this one mid-way through sending a worker its start-up data); delivered when the hold ends."""
    noted: list[int] = []
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set a handler
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: noted.append(signum)) if main_thread else None
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if main_thread:
            signal.signal(signal.SIGINT, previous)
            if noted:
                signal.raise_signal(signal.SIGINT)  # to the handler it had


def _check_workers_can_start(workers: int) -> None:
    """A DataError when the program's main script would run its calls again in every worker: spawned workers
    import it (as multiprocessing does, unless it is a package's __main__), so a script that calls this code must
    keep its calls under `if __name__ == "__main__":`. A notebook or `python -c` has no script to import."""
    main = sys.modules.get("__main__")
    path, name = getattr(main, "__file__", None), getattr(getattr(main, "__spec__", None), "name", "")
    if not path or name == "__main__" or name.endswith(".__main__"):
        return
    script = Path(mp.process.ORIGINAL_DIR or "", path)  # where spawn looks for it
    if not script.is_file():  # `python - < script.py`: '<stdin>'
        raise DataError(
            f"data.preprocessing_num_workers={workers} starts worker processes, and each imports the program's "
            f"script, which a program read from {path} does not have: save it as a file (its calls under "
            '`if __name__ == "__main__":`), or set data.preprocessing_num_workers=1'
        )
    try:
        tree = ast.parse(script.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return
    for node in tree.body:
        if isinstance(node, ast.If) and {"__name__", "__main__"} <= {
            getattr(n, "id", getattr(n, "value", None)) for n in ast.walk(node.test)
        }:
            return
    raise DataError(
        f"{path}: data.preprocessing_num_workers={workers} starts worker processes, and each imports this script "
        'and would run its calls again: put them under `if __name__ == "__main__":`, or set '
        "data.preprocessing_num_workers=1"
    )


def _encode_job(job: EncodeJob) -> EncodedPart:
    return encode_records(
        get_encoder(Path(job.tokenizer_path), job.options), job.spec, job.records, job.placeholders, job.skip_bad
    )


PARSERS = {"sft": to_conversation, "pt": to_text, "pairwise": to_prompted, "kto": to_prompted}
FIELDS = {"sft": (), "pt": (), "pairwise": ("prompt_len",), "kto": ("prompt_len", "kto_tag")}
ROWS = {"sft": 1, "pt": 1, "pairwise": 2, "kto": 1}  # sequences an example stores


def encode_records(
    encoder: ChatEncoder, spec: DatasetSpec, records: list, placeholders: dict, skip_bad: bool = False
) -> EncodedPart:
    """The records of one dataset of kind `spec.kind` encoded (registry.py; encoder.py for each kind)."""
    tokens: list[np.ndarray] = []  # int32 runs, joined once at the end
    labels: list[np.ndarray] = []
    lengths: list = []  # ints, or int64 arrays of a batch's lengths
    kept, truncated, dropped, skipped, unreadable, split = [], 0, [], [], [], 0
    fields: dict[str, list] = {key: [] for key in FIELDS[spec.kind]}
    parse = PARSERS[spec.kind]
    places: dict = {}  # file -> "dataset 'x': <file> line " (or "record ": what its record index counts)
    for start in range(0, len(records), BATCH):
        items, positions, wheres = [], [], []
        for pos, (path, index, record) in enumerate(records[start : start + BATCH], start):
            place = places.get(path) or places.setdefault(path, f"dataset '{spec.name}': {path} {index_unit(path)} ")
            where = place + str(index)
            if type(record) is JsonLine:
                try:
                    record = json_record(record, where)
                except BadRecord as bad:
                    if not skip_bad:
                        raise
                    unreadable.append((bad.reason, bad.where))
                    continue
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
        if spec.kind == "sft":
            batch = encoder.encode_arrays(items)
            tokens.append(batch.tokens)
            labels.append(batch.labels)
            lengths.append(batch.lengths)
            kept += [positions[k] for k in batch.kept]
            truncated += sum(batch.truncated)
            encoded = set(batch.kept)
            dropped += [where for k, where in enumerate(wheres) if k not in encoded]
            continue
        if spec.kind == "pt":
            for pos, (rows, was_split) in zip(positions, encoder.encode_texts(items)):
                split += was_split
                tokens += rows
                labels += rows
                lengths.append(np.array([len(row) for row in rows], dtype=np.int64))
                kept += [pos] * len(rows)
            continue
        for pos, where, item, enc in zip(positions, wheres, items, encoder.encode_prompted_batch(items)):
            if enc is None:
                dropped.append(where)
                continue
            truncated += enc.truncated
            for input_ids, row_labels in enc.rows:
                tokens.append(input_ids)
                labels.append(row_labels)
            lengths.append(np.array([len(input_ids) for input_ids, _ in enc.rows], dtype=np.int64))
            kept.append(pos)
            fields["prompt_len"].append(enc.prompt_len)
            if spec.kind == "kto":
                fields["kto_tag"].append(item.tag)
    token_array = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int32)
    label_array = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int32)
    length_array = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    return EncodedPart(
        token_array,
        label_array,
        length_array,
        np.asarray(kept, dtype=np.int64),
        truncated,
        dropped,
        skipped,
        {key: np.asarray(values, dtype=bool if key == "kto_tag" else np.int64) for key, values in fields.items()},
        split,
        len(records),
        sequence_counts(label_array, np.concatenate([[0], np.cumsum(length_array)]).astype(np.int64)),
        tuple(unreadable),
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


class _Tally:
    """What became of a dataset's records, counted as its shards are encoded (only the first few places kept)."""

    def __init__(self):
        self.records = self.unreadable = self.truncated = self.split = self.dropped = self.examples = 0
        self.reasons: Counter = Counter()
        self.dropped_at: list[str] = []
        self.unreadable_at: list[str] = []
        self.skipped_at: list[str] = []
        self.parse_skipped = 0

    def bad_line(self, reason: str, where: str) -> None:
        self.unreadable += 1
        self.reasons[reason] += 1
        if len(self.unreadable_at) < EXAMPLES_SHOWN:
            self.unreadable_at.append(where)

    def add(self, part: EncodedPart) -> None:
        for reason, where in part.unreadable:  # lines read as records, found to hold none where they were encoded
            self.records -= 1
            self.bad_line(reason, where)
        self.truncated += int(part.truncated)
        self.split += int(part.split)
        self.dropped += len(part.dropped)
        self.examples += len(part.kept)
        self.dropped_at += part.dropped[: EXAMPLES_SHOWN - len(self.dropped_at)]
        self.parse_skipped += len(part.skipped)
        for reason, where in part.skipped:
            self.reasons[reason] += 1
            if len(self.skipped_at) < EXAMPLES_SHOWN:
                self.skipped_at.append(where)

    def counts(self) -> dict:
        return {
            "records": self.records + self.unreadable,
            "truncated": self.truncated,
            "split": self.split,
            "dropped": self.dropped,
            "skipped": self.unreadable + self.parse_skipped,
            "skip_reasons": dict(self.reasons),
            "dropped_at": self.dropped_at[:EXAMPLES_SHOWN],
            "skipped_at": (self.unreadable_at + self.skipped_at)[:EXAMPLES_SHOWN],
        }


def _shards(spec: DatasetSpec, skip_bad: bool, max_samples: int | None, size: int, tally: _Tally):
    """The records of `spec` in lists of `size`, read streaming; at most `max_samples` records. JSON lines are
    left for the encoder to decode (in the workers, when there are: the decode and the pickling of its record were
    most of this process's time), unless `max_samples` must count the lines that hold a record."""
    shard: list = []
    for item in iter_records(spec, skip_bad, decode=bool(max_samples)):
        if isinstance(item, BadRecord):
            tally.bad_line(item.reason, item.where)
            continue
        shard.append(item)
        tally.records += 1
        if len(shard) == size:
            yield shard
            shard = []
        if max_samples and tally.records >= max_samples:  # the line after the last one taken is never read
            break
    if shard:
        yield shard


class _Encoders:
    """Encodes shards of records: in this process, or in a pool of `workers` processes shared by every dataset of
    the run (started at the first dataset with more than one shard), at most two jobs a worker in flight, in
    order. The workers are spawned, not forked: a fork copies whatever locks this process's threads (torch's,
    a logger's, a library's) hold at that moment, and a child that needs one waits forever; and the pool is
    concurrent.futures' because multiprocessing.Pool waits forever for the job of a worker that died, where it
    raises BrokenProcessPool (a clear error here)."""

    def __init__(self, tokenizer_path: str, options: TemplateOptions, skip_bad: bool, workers: int):
        self.tokenizer_path, self.options, self.skip_bad, self.workers = tokenizer_path, options, skip_bad, workers
        self.pool = None

    def encode(self, spec: DatasetSpec, shards, placeholders: dict):
        """(encoded part, its records) of each run of records, in order: a shard at a time here, or each shard
        cut into jobs of JOB_RECORDS (of fewer, two a worker at least, for a dataset of one shard) for the
        pool."""
        shards = iter(shards)
        first = next(shards, None)
        if first is None:
            return
        second = next(shards, None) if self.workers > 1 else None
        if self.workers == 1 or (second is None and len(first) < 32 * self.workers):  # a few records: here
            encoder = get_encoder(Path(self.tokenizer_path), self.options)
            for shard in chain([first], [second] if second is not None else [], shards):
                yield encode_records(encoder, spec, shard, placeholders, self.skip_bad), shard
            return
        size = JOB_RECORDS if second is not None else min(JOB_RECORDS, -(-len(first) // (2 * self.workers)))
        if self.pool is None:
            self.pool = ProcessPoolExecutor(
                self.workers, mp_context=mp.get_context("spawn"), initializer=_leave_ctrl_c_to_the_main_process
            )
        flight: deque = deque()
        try:
            for shard in chain([first], [second] if second is not None else [], shards):  # read as the window frees
                for start in range(0, len(shard), size):
                    records = shard[start : start + size]
                    job = EncodeJob(self.tokenizer_path, self.options, spec, records, placeholders, self.skip_bad)
                    with _ctrl_c_held():
                        flight.append((self.pool.submit(_encode_job, job), records))
                    while len(flight) >= 2 * self.workers:
                        done, records = flight.popleft()
                        yield done.result(), records
            while flight:
                done, records = flight.popleft()
                yield done.result(), records
        except BrokenProcessPool:
            raise DataError(
                f"dataset '{spec.name}': a process encoding it died (out of memory?); lower "
                f"data.preprocessing_num_workers={self.workers}, or set it to 1 to encode in this process"
            ) from None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _dtypes(kind: str) -> tuple[dict[str, str], dict[str, tuple]]:
    dtypes = {"tokens": "<i4", "labels": "<i4", "offsets": "<i8", "source": "<i8", "counts": "<i4"}
    dtypes.update({f"field_{key}": "|b1" if key == "kto_tag" else "<i8" for key in FIELDS[kind]})
    return dtypes, {"source": (2,), "counts": (2,)}


class _Output:
    """A dataset's arrays, appended shard by shard to its cache entry (cache_files.ArrayWriter); held in memory
    instead, with a warning naming the entry, when it cannot be written."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind, self.end, self.writer = path, kind, 0, None
        self.memory: dict[str, list] = {}
        dtypes, tails = _dtypes(kind)
        try:
            self.writer = ArrayWriter(path, dtypes, tails)
            self.writer.append(offsets=np.zeros(1, dtype=np.int64))
        except OSError as err:
            self._to_memory(err, {"offsets": np.zeros(1, dtype=np.int64)})

    def _to_memory(self, err: OSError, so_far: dict) -> None:
        warn_unwritable(self.path, err)
        if self.writer is not None:
            try:
                so_far = self.writer.read_back()
            except OSError:
                pass
            self.writer.abort()
            self.writer = None
        self.memory = {name: [values] for name, values in so_far.items()}

    def append(self, part: EncodedPart, records: list) -> None:
        record_index = np.array([records[k][1] for k in part.kept], dtype=np.int64)
        arrays = {
            "tokens": part.tokens,
            "labels": part.labels,
            "offsets": self.end + np.cumsum(part.lengths, dtype=np.int64),
            "source": np.stack([np.zeros_like(record_index), record_index], axis=1),
            "counts": part.counts,
            **{f"field_{key}": values for key, values in part.fields.items()},
        }
        self.end += int(part.lengths.sum())
        if self.writer is not None:
            try:
                self.writer.append(**arrays)
                return
            except OSError as err:
                self._to_memory(err, {})
        for name, values in arrays.items():
            self.memory.setdefault(name, []).append(values)

    def finish(self, counts: dict, name: str) -> EncodedDataset:
        if self.writer is not None:
            try:
                self.writer.commit({"counts": counts, "rows": ROWS[self.kind], "kind": self.kind})
                self.writer = None
                return _load_cache(self.path, name)[0]
            except OSError as err:
                self._to_memory(err, {})
        dtypes, tails = _dtypes(self.kind)
        arrays = {
            key: np.concatenate(self.memory[key]) if self.memory.get(key) else np.zeros((0, *tails.get(key, ())), t)
            for key, t in dtypes.items()
        }
        return _dataset(arrays, name, ROWS[self.kind])

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def encode_datasets(
    specs: list[DatasetSpec], cfg: DataConfig, tokenizer_path: Path, options: TemplateOptions
) -> list[tuple[EncodedDataset, dict]]:
    """[(dataset, counts)] for `specs`: cached ones loaded, the others encoded, with
    data.preprocessing_num_workers processes sharing one pool over all their records."""
    results: list = [None] * len(specs)
    todo = []
    skip_bad = cfg.on_bad_record == "skip"
    workers = max(1, int(cfg.preprocessing_num_workers or 1))
    if workers > 1:  # whether they start or not (a warm cache, a few records): the script fails the same every run
        _check_workers_can_start(workers)
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root()
    remove_dead_temporaries(root)
    remove_dead_temporaries(root / "datasets")
    hashes = {}
    for i, spec in enumerate(specs):
        placeholders = dict(cfg.placeholders) if spec.name in set(cfg.fill_placeholders) else {}
        hashes[i] = content_hashes(spec.files(), f"dataset '{spec.name}'", root, cfg.trust_file_stat)
        cache_file = _cache_file(root, spec, cfg, tokenizer_path, options, placeholders, hashes[i])
        if cache_file.exists() and not cfg.overwrite_cache:
            try:
                dataset, counts = _load_cache(cache_file, spec.name)
                scan = not (cfg.trust_file_stat and is_verified(cache_file))  # every token, or the small arrays
                _check_cached(
                    dataset,
                    counts,
                    get_encoder(tokenizer_path, options).sp.get_piece_size(),
                    options.cutoff_len,
                    spec.kind,
                    scan_tokens=scan,
                )
                if scan:
                    mark_verified(cache_file)
                results[i] = (dataset, {**counts, "files": hashes[i]})
                continue
            except Exception as err:  # a corrupt cache is rebuilt, never trusted
                log.warning("rebuilding the data cache %s: %s", cache_file, err)
        todo.append((i, spec, placeholders, cache_file))
    if not todo:
        return results
    encoders = _Encoders(str(tokenizer_path), options, skip_bad, workers)
    try:
        for i, spec, placeholders, cache_file in todo:
            dataset, counts = _encode_dataset(spec, cfg, encoders, placeholders, cache_file)
            results[i] = (dataset, {**counts, "files": hashes[i]})
    finally:
        encoders.close()
    return results


def _encode_dataset(
    spec: DatasetSpec, cfg: DataConfig, encoders: _Encoders, placeholders: dict, cache_file: Path
) -> tuple[EncodedDataset, dict]:
    """One dataset read, encoded and written a shard at a time (never all its records or arrays at once)."""
    tally = _Tally()
    output = _Output(cache_file, spec.kind)
    progress = _Progress(f"encoding {spec.name}")
    try:
        shards = _shards(spec, cfg.on_bad_record == "skip", cfg.max_samples, SHARD_RECORDS, tally)
        for part, records in encoders.encode(spec, shards, placeholders):
            output.append(part, records)
            tally.add(part)
            progress.advance(part.records)
        if not tally.records:
            raise DataError(
                f"dataset '{spec.name}': {spec.path} holds no records"
                + (f" ({tally.unreadable} unreadable lines skipped)" if tally.unreadable else "")
            )
        counts = tally.counts()
        if not tally.examples:
            raise DataError(
                f"dataset '{spec.name}': none of its {counts['records']} records is left to train on "
                f"({counts['dropped']} without a trainable reply within data.cutoff_len={cfg.cutoff_len}"
                f", {counts['skipped']} skipped as bad records)"
            )
        dataset = output.finish(counts, spec.name)
    except BaseException:
        output.abort()
        raise
    finally:
        progress.close()
    return dataset, counts


class _Progress:
    """Records encoded: a progress bar on a terminal; on a log (no terminal), a line when the work is longer than a
    second and one at its end. The records are read streaming: their number is not known before."""

    def __init__(self, description: str):
        self.description, self.done, self.bar, self.shown = description, 0, None, False

    def advance(self, n: int) -> None:
        self.done += n
        if not self.shown and self.done >= 2 * BATCH:  # more than a second's work: shown from here
            self.shown = True
            if sys.stderr.isatty():
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

                self.bar = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    TextColumn("{task.completed:,} records"),
                    TimeElapsedColumn(),
                    transient=True,
                )
                self.bar.start()
                self.task = self.bar.add_task(self.description, total=None)
            else:
                print(f"{self.description} ...", file=sys.stderr, flush=True)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.shown:
            print(f"{self.description}: {self.done:,} records", file=sys.stderr, flush=True)


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
    return (
        root / "datasets" / f"{spec.name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}"
    )  # a directory of arrays (cache_files.py)


def _dataset(arrays: dict[str, np.ndarray], name: str, rows: int) -> EncodedDataset:
    fields = {key.removeprefix("field_"): values for key, values in arrays.items() if key.startswith("field_")}
    return EncodedDataset(
        arrays["tokens"],
        arrays["labels"],
        arrays["offsets"],
        None,
        arrays["source"],
        [name],
        rows,
        fields,
        arrays["counts"],
    )


def _load_cache(path: Path, name: str) -> tuple[EncodedDataset, dict]:
    """A cache entry's dataset (its tokens and labels mapped, not read) and counts; ValueError saying what is
    wrong with an entry that is not whole."""
    if not path.is_dir():
        raise ValueError("it is not a directory of arrays")
    arrays, meta = read_arrays(path)
    counts, rows = meta.get("counts"), meta.get("rows")
    if rows not in (1, 2):
        raise ValueError(f"its examples have {rows} rows")
    missing = sorted({"tokens", "labels", "offsets", "source", "counts"} - set(arrays))
    if missing:
        raise ValueError(f"it has no {', '.join(missing)}")
    if not isinstance(counts, dict) or not isinstance(counts.get("records"), int):
        raise ValueError("its counts are not a record count")
    counts["cached"] = True
    return _dataset(arrays, name, rows), counts


def _check_cached(
    ds: EncodedDataset, counts: dict, vocab_size: int, cutoff_len: int, kind: str = "sft", scan_tokens: bool = True
) -> None:
    """ValueError saying what is wrong with a loaded cache's arrays (a truncated or altered file) for data of
    `kind`. With `scan_tokens` the tokens and labels are read too, CHECK_TOKENS at a time, each chunk's pages given
    back to the page cache once checked (the check does not grow the process by the dataset's size)."""
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
    if ds.counts.shape != (sequences, 2):
        raise ValueError(f"its trained-label counts are not of its {sequences} sequences")
    if sorted(ds.fields) != sorted(FIELDS[kind]) or any(v.shape != (n,) for v in ds.fields.values()):
        raise ValueError(f"its per-example fields are not {list(FIELDS[kind])} of its {n} examples")
    if "kto_tag" in ds.fields and ds.fields["kto_tag"].dtype != bool:
        raise ValueError("its kto tags are not true / false")
    prompt_len = ds.fields.get("prompt_len")
    if prompt_len is not None and (
        prompt_len.dtype.kind != "i"
        or (prompt_len < 0).any()
        or (prompt_len[:, None] >= lengths.reshape(n, ds.rows)).any()
    ):
        raise ValueError("a prompt length is outside its example's rows")
    first = 0 if scan_tokens else n  # the first example of the chunk
    while first < n:
        last = int(np.searchsorted(offsets, offsets[first * ds.rows] + CHECK_TOKENS, "right")) - 1
        last = min(n, max(first + 1, last // ds.rows))
        start, end = int(offsets[first * ds.rows]), int(offsets[last * ds.rows])
        chunk_tokens, chunk_labels = np.asarray(tokens[start:end]), np.asarray(labels[start:end])
        local = offsets[first * ds.rows : last * ds.rows] - start
        try:
            if chunk_tokens.min() < 0 or chunk_tokens.max() >= vocab_size:
                raise ValueError(f"a token id is outside the tokenizer's vocabulary of {vocab_size}")
            trained = chunk_labels != IGNORE_INDEX
            if not np.array_equal(chunk_labels[trained], chunk_tokens[trained]):
                raise ValueError("a label is neither ignored nor its token")
            expected = np.stack([np.add.reduceat(trained, local), trained[local]], axis=1)
            if not np.array_equal(expected, ds.counts[first * ds.rows : last * ds.rows]):
                raise ValueError("its trained-label counts are not its labels'")
            if prompt_len is not None:
                _check_prompts(chunk_tokens, chunk_labels, local.reshape(-1, ds.rows), prompt_len[first:last])
        finally:
            del chunk_tokens, chunk_labels
            _release(tokens, labels)
        first = last


def _release(*arrays: np.ndarray) -> None:
    """Give a memory map's pages back to the page cache (they stay cached; this process no longer counts them)."""
    for values in arrays:
        mapping = getattr(values, "_mmap", None)
        if mapping is not None and hasattr(mapping, "madvise"):
            try:
                mapping.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass


def _check_prompts(tokens: np.ndarray, labels: np.ndarray, starts: np.ndarray, prompt_len: np.ndarray) -> None:
    """Each example's prompt is untrained and the same in every row (`starts`: each example's rows' first token,
    [examples, rows], into `tokens`)."""
    before = np.cumsum(prompt_len) - prompt_len

    def positions(k: int) -> np.ndarray:  # every prompt token of row k of every example, in example order
        return np.arange(prompt_len.sum()) - np.repeat(before, prompt_len) + np.repeat(starts[:, k], prompt_len)

    first = positions(0)
    for k in range(starts.shape[1]):
        at = positions(k) if k else first
        if (labels[at] != IGNORE_INDEX).any() or (k and not np.array_equal(tokens[at], tokens[first])):
            raise ValueError("a prompt is trained or differs between the rows of its example")

"""data.streaming=true: the datasets read, encoded, shuffled, packed and batched on the fly in the dataloader
workers, for corpora larger than the disk cache or memory (stage pt's main use; sft conversations stream too).
Preference pairs and KTO examples do not stream (refused by name).

The stream: every record of the datasets of data.datasets in their order (each dataset's files sorted, at most
data.max_samples records of each), numbered g = 0, 1, ... The first data.val_size records (a whole number) are the
validation set, encoded once in the main process; the others are shared out, record g to shard (g - val_size) mod
S, S = world size x dataloader workers (at least one): shard rank x workers + worker. Every record is read by
exactly one (rank, worker); a worker skips the lines of other shards without parsing them.

Each shard reads its records in blocks of data.streaming_buffer records, encodes a block (as the map-style path
does: encoder.py), makes its rows (one example a row, or with data.packing several examples a row: packing.py's
best fit, the same packed-row format and collator), shuffles them with a generator seeded by (data.seed, epoch,
shard, the block's first record) and hands them out data.batch_size rows a batch. An epoch is one pass over the
files; the stream then starts the next epoch (another shuffle), without end: trainer.max_steps ends the run (the
config check requires it).

Resume: every batch carries its shard's position after it (epoch, file, byte offset or record index in it, the
block's first record and the rows of the block already handed out): a shard resumes by reading its block again and
skipping those rows (packing within a block leaves no carry-over to save). The DataLoader takes batches from its
workers in turn, so after k batches the next comes from shard k mod workers: a resumed loader's worker w serves
shard (w + k) mod workers. A resume with another world size or number of workers is refused (other shards)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from telechat_lab.errors import BadRecord, DataError

from .encoder import TemplateOptions
from .formats import to_conversation, to_text
from .packing import Collator, join_examples, pack_rows
from .registry import TEXT_ENCODING, DatasetSpec, _looks_like_jsonl, index_unit, json_record

STREAM_KINDS = ("sft", "pt")
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class StreamSource:
    """What a stream reads and how it encodes it (picklable: each dataloader worker gets a copy)."""

    specs: tuple[DatasetSpec, ...]
    kind: str
    tokenizer_path: str
    options: TemplateOptions
    max_samples: int | None
    val_size: int
    placeholders: dict
    fill: frozenset  # datasets whose {{placeholders}} are filled
    skip_bad: bool

    def files(self) -> list[tuple[int, Path]]:
        """(dataset position, file) of every file, in stream order."""
        return [(d, path) for d, spec in enumerate(self.specs) for path in spec.files()]


def check_streamable(specs: list[DatasetSpec], kind: str) -> None:
    """DataError naming what cannot stream: preference / KTO data, a JSON array file, num_samples."""
    problems = []
    if kind not in STREAM_KINDS:
        problems.append(
            f"data.streaming=true streams raw text (stage=pt) and conversations (stage=sft), not {kind} data: "
            "set data.streaming=false"
        )
    for spec in specs:
        if spec.num_samples:
            problems.append(
                f"dataset '{spec.name}' ({spec.info_path}): num_samples needs the dataset's size, which a stream does "
                "not know; remove it, or set data.streaming=false"
            )
        for path in spec.files():
            if path.suffix == ".json" and not _looks_like_jsonl(path):
                problems.append(
                    f"dataset '{spec.name}': {path} is one JSON array, which must be read whole and cannot stream: "
                    "convert it to JSON lines (one record a line, .jsonl), or set data.streaming=false"
                )
    if problems:
        raise DataError("\n".join(problems))


# ------------------------------------------------------------------------------------------ reading


def _line_records(path: Path, start: int, first_line: int, paragraphs: bool, where: str = ""):
    """(line number, byte offset, text) of each non-blank line (or paragraph) of a line-based file from byte
    `start`; the offset is where reading again yields that record first."""
    with open(path, "rb") as f:
        f.seek(start)
        offset, lineno = start, first_line
        para: list[str] = []
        para_at = (0, 0)
        for raw in f:
            at = offset
            offset += len(raw)
            if at == 0 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{where}: line {lineno}, byte offset {at + err.start} (0x{raw[err.start]:02x}) is not UTF-8 "
                    "text: save the file as UTF-8 (from Latin-1, e.g. iconv -f latin1 -t utf-8)"
                ) from None
            if paragraphs:
                if line.strip():
                    if not para:
                        para_at = (lineno, at)
                    para.append(line)
                elif para:
                    yield para_at[0], para_at[1], "\n".join(para)
                    para = []
            elif line.strip():
                yield lineno, at, line
            lineno += 1
        if para:
            yield para_at[0], para_at[1], "\n".join(para)


def _file_records(spec: DatasetSpec, path: Path, point: tuple[int, int]):
    """(index for messages, resume point, record or raw line) of a file's records from `point` (offset, line) for
    line-based files, (record index, 0) for the others. Raw lines (JSON lines) are parsed only by their shard."""
    where = f"dataset '{spec.name}': {path}"
    suffix = path.suffix
    try:
        if suffix in (".jsonl", ".json"):
            for lineno, at, line in _line_records(path, point[0], point[1] or 1, False, where):
                yield lineno, (at, lineno), line
        elif suffix == ".txt" and spec.sample_by != "document":
            for lineno, at, text in _line_records(path, point[0], point[1] or 1, spec.sample_by == "paragraph", where):
                yield lineno, (at, lineno), {"text": text}
        elif suffix == ".txt":
            text = path.read_text(encoding=TEXT_ENCODING)
            if text.strip():
                yield 1, (0, 0), {"text": text}
        elif suffix == ".parquet":
            yield from _parquet_records(path, point[0], where)
        elif suffix == ".csv":
            with open(path, encoding=TEXT_ENCODING, newline="") as f:
                reader = csv.DictReader(f)
                lineno = 2  # the line a record starts on (a quoted field may span several lines)
                for index, rec in enumerate(reader):
                    if index >= point[0]:
                        if None in rec or None in rec.values():
                            rec = BadRecord(f"{where} line {lineno}", "fields do not match the header")
                        yield lineno, (index, 0), rec
                    lineno = reader.line_num + 1
        else:
            raise DataError(f"{where}: unsupported file type '{suffix}' for data.streaming")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: byte {err.start} of a line is not UTF-8 text: save the file as UTF-8") from None
    except OSError as err:
        raise DataError(f"{where}: cannot read it ({err.strerror or err})") from err


def _parquet_records(path: Path, start: int, where: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"{where}: reading parquet needs pyarrow (pip install pyarrow)") from err
    try:
        file = pq.ParquetFile(path)
        index, groups = 0, []
        for g in range(file.num_row_groups):  # start at the row group holding record `start`
            rows = file.metadata.row_group(g).num_rows
            if index + rows > start or groups:
                groups.append(g)
            else:
                index += rows
        batches = file.iter_batches(row_groups=groups, batch_size=1024) if groups else []
        for batch in batches:
            for rec in batch.to_pylist():
                if index >= start:
                    yield index, (index, 0), rec
                index += 1
    except DataError:
        raise
    except Exception as err:  # pyarrow's own errors name neither the dataset nor the file
        raise DataError(f"{where}: unreadable parquet file ({err})") from err


def _parse(spec: DatasetSpec, raw, where: str) -> dict:
    if isinstance(raw, BadRecord):
        raise raw
    return json_record(raw, where) if isinstance(raw, str) else raw


# ------------------------------------------------------------------------------------------ the stream


def _fresh(epoch: int) -> dict:
    """The position at the start of an epoch: file 0, its start; g (stream record) and d (its dataset's) 0."""
    return {"epoch": epoch, "file": 0, "at": [0, 0], "g": 0, "d": 0, "row": 0}


class RecordStream:
    """One shard's records, from a position: yields (position of the record, where, record or raw line)."""

    def __init__(self, source: StreamSource, shard: int, shards: int):
        self.source, self.shard, self.shards = source, shard, shards
        self.files = source.files()

    def owns(self, g: int) -> bool:
        return g >= self.source.val_size and (g - self.source.val_size) % self.shards == self.shard

    def records(self, pos: dict, every: bool = False):
        """(position, where, raw) of the records from `pos` to the epoch's end: this shard's (or `every` one)."""
        src = self.source
        g, d = pos["g"], pos["d"]
        for n in range(pos["file"], len(self.files)):
            dataset, path = self.files[n]
            spec = src.specs[dataset]
            if n > pos["file"] and dataset != self.files[n - 1][0]:
                d = 0
            point = tuple(pos["at"]) if n == pos["file"] else (0, 0)
            unit = index_unit(path) if path.suffix != ".json" else "line"
            for index, at, raw in _file_records(spec, path, point):
                if src.max_samples is not None and d >= src.max_samples:
                    break
                here = {"epoch": pos["epoch"], "file": n, "at": list(at), "g": g, "d": d, "row": 0}
                if every or self.owns(g):
                    yield here, f"dataset '{spec.name}': {path} {unit} {index}", raw
                g, d = g + 1, d + 1


class ShardRows:
    """The rows of one shard (the module docstring), from a saved position, for ever."""

    def __init__(self, source: StreamSource, shard: int, shards: int, seed: int, buffer: int, packing: bool):
        self.stream = RecordStream(source, shard, shards)
        self.source, self.seed, self.buffer, self.packing = source, seed, buffer, packing
        self._encoder = None

    def encoder(self):
        if self._encoder is None:
            from .preprocess import get_encoder

            self._encoder = get_encoder(Path(self.source.tokenizer_path), self.source.options)
        return self._encoder

    def encode(self, items: list[tuple[str, object]]) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) of each example of `items` ((where, record or raw line)), in order."""
        src = self.source
        parse = to_text if src.kind == "pt" else to_conversation
        parsed = []
        for where, raw, spec in items:
            try:
                item = parse(spec, _parse(spec, raw, where), where)
            except BadRecord:
                if not src.skip_bad:
                    raise
                continue
            if spec.name in src.fill and src.placeholders:
                from .preprocess import _filled

                item = _filled(item, src.placeholders)
            parsed.append(item)
        if not parsed:
            return []
        encoder = self.encoder()
        if src.kind == "pt":
            return [(row, row) for rows, _ in encoder.encode_texts(parsed) for row in rows]
        return encoder.encode_arrays(parsed).examples()

    def block_rows(self, examples: list[tuple[list[int], list[int]]], epoch: int, first: int) -> list[dict]:
        rows: list[dict]
        if self.packing and examples:
            lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
            rows = [
                join_examples([{"input_ids": examples[j][0], "labels": examples[j][1]} for j in row])
                for row in pack_rows(lengths, self.source.options.cutoff_len)
            ]
        else:
            rows = [
                {"input_ids": np.asarray(ids, dtype=np.int64), "labels": np.asarray(lab, dtype=np.int64)}
                for ids, lab in examples
            ]
        order = np.random.default_rng([self.seed, epoch, self.stream.shard, first]).permutation(len(rows))
        return [rows[i] for i in order]

    def rows(self, pos: dict | None) -> Iterator[tuple[dict, dict]]:
        """(row, the shard's position after it) for ever, from `pos` (None: the start)."""
        pos = dict(pos) if pos is not None else _fresh(0)
        while True:
            records, skip, made = self.stream.records(pos), pos["row"], False
            from_start = pos == _fresh(pos["epoch"])
            while True:
                block = list(islice(records, self.buffer))
                if not block:
                    break
                start = block[0][0]
                specs = [self.source.specs[self.stream.files[here["file"]][0]] for here, _, _ in block]
                rows = self.block_rows(
                    self.encode([(where, raw, spec) for (_, where, raw), spec in zip(block, specs)]),
                    start["epoch"],
                    start["g"],
                )
                made = made or bool(rows)
                for i in range(skip, len(rows)):
                    yield rows[i], {**start, "row": i + 1}
                skip = 0
                if len(block) < self.buffer:
                    break
            if from_start and not made:
                raise DataError(
                    f"data.streaming=true: shard {self.stream.shard} of {self.stream.shards} (world size x "
                    f"dataloader workers) gets no training example from datasets "
                    f"{[s.name for s in self.source.specs]}: too few records (after data.val_size) for that many "
                    "shards, or none of its records gives an example within data.cutoff_len; use fewer dataloader "
                    "workers or more data"
                )
            pos = _fresh(pos["epoch"] + 1)


class StreamingDataset(torch.utils.data.IterableDataset):
    """Training batches of the stream (the module docstring) for rank `rank` of `world`: each item is a collated
    batch with its `stream_state` (shard, position after it); `positions`: per shard the position to resume from;
    `rotate`: batches already taken (the first worker then serves shard rotate mod workers)."""

    def __init__(self, source: StreamSource, cfg, rank: int = 0, world: int = 1):
        self.source, self.cfg, self.rank, self.world = source, cfg, rank, world
        self.workers = max(1, cfg.dataloader_num_workers)
        self.positions: dict[int, dict] = {}
        self.rotate = 0
        self.collator = Collator(padding_free=cfg.padding_free, kind=source.kind, cutoff_len=cfg.cutoff_len)

    @property
    def shards(self) -> int:
        return self.world * self.workers

    def shard_of(self, worker: int) -> int:
        return self.rank * self.workers + (worker + self.rotate) % self.workers

    def batches(self, worker: int) -> Iterator[dict]:
        shard = self.shard_of(worker)
        rows = ShardRows(
            self.source, shard, self.shards, self.cfg.seed, self.cfg.streaming_buffer, self.cfg.packing
        ).rows(self.positions.get(shard))
        size = self.cfg.batch_size
        while True:
            items, state = [], None
            while len(items) < size:
                row, state = next(rows)
                items.append(row)
            batch = self.collator(items)
            batch["stream_state"] = (shard, state)
            yield batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        try:
            yield from self.batches(worker)
        except DataError as err:  # raised again in the main process (a worker's traceback is no message)
            yield {"stream_error": str(err)}


def validation_examples(source: StreamSource) -> list[tuple[list[int], list[int]]]:
    """The encoded examples of the stream's first val_size records (main process)."""
    if not source.val_size:
        return []
    reader = ShardRows(source, 0, 1, 0, source.val_size, False)
    head = []
    for here, where, raw in reader.stream.records(_fresh(0), every=True):
        if here["g"] >= source.val_size:
            break
        head.append((where, raw, source.specs[reader.stream.files[here["file"]][0]]))
    if len(head) < source.val_size:
        raise DataError(
            f"data.val_size={source.val_size}: the datasets hold only {len(head)} records, none left to train on"
        )
    return reader.encode(head)


class ExampleList(torch.utils.data.Dataset):
    """Validation rows (packed with data.packing, as the training rows are)."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], packing: bool, cutoff_len: int):
        rows = [{"input_ids": np.asarray(i, np.int64), "labels": np.asarray(lab, np.int64)} for i, lab in examples]
        if packing and rows:
            lengths = np.array([len(r["input_ids"]) for r in rows], dtype=np.int64)
            rows = [join_examples([rows[j] for j in row]) for row in pack_rows(lengths, cutoff_len)]
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def stream_fingerprint(source: StreamSource) -> dict:
    """The files (size and modification time: a stream is not hashed whole at every start) and the settings that
    decide which records are validation and which shard reads which."""
    datasets: dict = {}
    for dataset, path in source.files():
        spec = source.specs[dataset]
        base = spec.path if spec.path.is_dir() else spec.path.parent
        stat = path.stat()
        entry = datasets.setdefault(spec.name, {"files": {}, "examples": None})
        entry["files"][os.path.relpath(path, base)] = f"{stat.st_size}:{stat.st_mtime_ns}"
    split = {"examples": source.val_size, "order": f"head of the stream, max_samples={source.max_samples}"}
    return {"datasets": datasets, "train": {"examples": None, "order": "stream"}, "validation": split}


def format_stream_report(report: dict) -> str:
    out = io.StringIO()
    out.write(
        f"data.streaming: {', '.join(report['datasets'])} ({report['files']} file(s)) read and encoded on the fly, "
        f"in {report['shards']} shard(s) (world size x dataloader workers)"
    )
    val = report.get("val")
    out.write(f"; validation: the first {val['records']} record(s), {val['examples']} example(s)" if val else "")
    return out.getvalue()


def stream_source(cfg, tokenizer_path: str | Path, kind: str) -> StreamSource:
    """The stream of data.datasets (checked: their kind is the stage's, and every file can stream)."""
    from .pipeline import dataset_names, resolved_dataset_dir, template_options
    from .registry import check_kinds, load_dataset_info

    names = dataset_names(cfg)
    specs = load_dataset_info(resolved_dataset_dir(cfg.dataset_dir), names)
    check_kinds([specs[n] for n in names], kind)
    check_streamable([specs[n] for n in names], kind)
    return StreamSource(
        specs=tuple(specs[n] for n in names),
        kind=kind,
        tokenizer_path=str(tokenizer_path),
        options=template_options(cfg),
        max_samples=cfg.max_samples,
        val_size=int(cfg.val_size or 0),
        placeholders=dict(cfg.placeholders or {}),
        fill=frozenset(cfg.fill_placeholders or []),
        skip_bad=cfg.on_bad_record == "skip",
    )

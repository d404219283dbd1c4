"""Encoded examples, stored flat so that datasets of millions of examples cost a few arrays."""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from telechat_lab.tokenizer import IGNORE_INDEX as IGNORE

PAIR_KEYS = ("chosen", "rejected")  # the two sequences of a preference pair, in storage order


def sequence_counts(labels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """[sequences, 2] int32: each sequence's labels other than IGNORE, and whether its first label is one (what
    `stats` and `targets` need, kept so that neither reads the labels again)."""
    counts = np.zeros((len(offsets) - 1, 2), dtype=np.int32)
    lengths = np.diff(offsets)
    full = lengths > 0
    if len(labels) and full.any():
        trained = labels != IGNORE
        counts[full, 0] = np.add.reduceat(trained, offsets[:-1][full])
        counts[full, 1] = trained[offsets[:-1][full]]
    return counts


class _MappedFile(NamedTuple):
    """A read-only memory map by its file, to pickle."""

    filename: str
    dtype: str
    shape: tuple
    offset: int

    @staticmethod
    def of(array: np.ndarray):
        if isinstance(array, np.memmap) and array.filename and isinstance(array.base, mmap.mmap) and array.mode == "r":
            return _MappedFile(array.filename, array.dtype.str, array.shape, array.offset)
        return array

    def open(self) -> np.memmap:
        return np.memmap(self.filename, dtype=np.dtype(self.dtype), mode="r", shape=self.shape, offset=self.offset)


class EncodedDataset:
    """Encoded examples stored flat: sequence s is tokens[offsets[s]:offsets[s+1]]; an example is `rows`
    consecutive sequences (1, or 2 for a preference pair: its chosen then its rejected sequence), example j's
    being sequences rows*j .. rows*j+rows-1; `index` selects (and may repeat) examples, so that subsets, mixing
    and the validation split never separate a pair; `source` gives each example's (dataset, record) for
    inspection; `fields` holds per-example arrays (`prompt_len`: the prompt's tokens, shared by the rows;
    `kto_tag`: desirable) that items carry; `counts` each sequence's trained labels and whether its first is
    (sequence_counts).

    `tokens` and `labels` may be memory maps of the cache's files (cache_files.py) and a list of such arrays
    (the parts `concat` joins, end to end: `offsets` index them as one): nothing here reads every token. Only
    the small arrays (offsets, index, source, fields, counts: a few bytes an example) are in memory."""

    def __init__(
        self,
        tokens: np.ndarray | Sequence[np.ndarray],
        labels: np.ndarray | Sequence[np.ndarray],
        offsets: np.ndarray,
        index: np.ndarray | None = None,
        source: np.ndarray | None = None,
        names: Sequence[str] = (),
        rows: int = 1,
        fields: dict[str, np.ndarray] | None = None,
        counts: np.ndarray | None = None,
    ):
        self.segments = [tokens] if isinstance(tokens, np.ndarray) else list(tokens)
        self.label_segments = [labels] if isinstance(labels, np.ndarray) else list(labels)
        self.starts = np.cumsum([0] + [len(t) for t in self.segments])  # each segment's first token
        self.offsets, self.rows = offsets, rows
        n = (len(offsets) - 1) // rows
        self.index = np.arange(n) if index is None else index
        self.source = source if source is not None else np.zeros((n, 2), dtype=np.int64)
        self.names = list(names)
        self.fields = dict(fields or {})
        self.counts = counts if counts is not None else sequence_counts(self.labels, offsets)

    def __getstate__(self) -> dict:
        """Memory maps travel as their file (a spawned dataloader worker maps it again), never as their data."""
        state = dict(self.__dict__)
        for key in ("segments", "label_segments"):
            state[key] = [_MappedFile.of(seg) for seg in state[key]]
        return state

    def __setstate__(self, state: dict) -> None:
        for key in ("segments", "label_segments"):
            state[key] = [seg.open() if isinstance(seg, _MappedFile) else seg for seg in state[key]]
        self.__dict__.update(state)

    @property
    def tokens(self) -> np.ndarray:
        """Every token (read whole when there are several segments: checks and tests only)."""
        return self.segments[0] if len(self.segments) == 1 else np.concatenate(self.segments)

    @property
    def labels(self) -> np.ndarray:
        return self.label_segments[0] if len(self.label_segments) == 1 else np.concatenate(self.label_segments)

    def __len__(self) -> int:
        return len(self.index)

    def stored(self) -> int:
        """Examples stored (whatever `index` selects)."""
        return (len(self.offsets) - 1) // self.rows

    def _sequence(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = int(self.offsets[s]), int(self.offsets[s + 1])
        k = 0 if len(self.segments) == 1 else int(np.searchsorted(self.starts, start, "right")) - 1
        base = int(self.starts[k])
        return (
            np.array(self.segments[k][start - base : end - base]),
            np.array(self.label_segments[k][start - base : end - base]),
        )

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        j = self.index[i]
        item: dict = {key: values[j] for key, values in self.fields.items()}
        if self.rows == 1:
            item["input_ids"], item["labels"] = self._sequence(j)
            return item
        for k, key in enumerate(PAIR_KEYS):
            item[f"{key}_input_ids"], item[f"{key}_labels"] = self._sequence(self.rows * j + k)
        return item

    def _per_example(self, per_sequence: np.ndarray) -> np.ndarray:
        """Per-sequence values summed over each stored example's rows."""
        return per_sequence.reshape(-1, self.rows).sum(axis=1) if self.rows > 1 else per_sequence

    def lengths(self) -> np.ndarray:
        """Tokens of each example (all its rows)."""
        return self._per_example(np.diff(self.offsets))[self.index]

    def targets(self) -> np.ndarray:
        """Tokens each example trains on: labels other than IGNORE after the shift (its first label predicts
        nothing), as the loss counts them (over all its rows)."""
        per_sequence = self.counts[:, 0].astype(np.int64) - self.counts[:, 1]
        return self._per_example(per_sequence)[self.index].astype(np.int64)

    def _rebuilt(self, index: np.ndarray) -> EncodedDataset:
        return EncodedDataset(
            self.segments,
            self.label_segments,
            self.offsets,
            index,
            self.source,
            self.names,
            self.rows,
            self.fields,
            self.counts,
        )

    def subset(self, positions: np.ndarray) -> EncodedDataset:
        return self._rebuilt(self.index[positions])

    def with_index(self, index: np.ndarray) -> EncodedDataset:
        return self._rebuilt(index)

    def stats(self) -> dict[str, int]:
        trained = self._per_example(self.counts[:, 0].astype(np.int64))[self.index]
        return {"examples": len(self), "tokens": int(self.lengths().sum()), "trained_tokens": int(trained.sum())}

    @staticmethod
    def concat(parts: Sequence[EncodedDataset]) -> EncodedDataset:
        """The parts end to end, their tokens and labels not copied (their segments are listed)."""
        rows = {part.rows for part in parts}
        keys = {tuple(sorted(part.fields)) for part in parts}
        if len(rows) > 1 or len(keys) > 1:
            raise ValueError("datasets of different kinds cannot be concatenated")
        offsets, index, source, base, end = [np.zeros(1, dtype=np.int64)], [], [], 0, 0
        names: list[str] = []
        for part in parts:
            offsets.append(part.offsets[1:] + end)
            end += int(part.offsets[-1])
            index.append(part.index + base)
            src = np.array(part.source, dtype=np.int64)
            src[:, 0] += len(names)
            source.append(src)
            names += part.names
            base += (len(part.offsets) - 1) // part.rows
        return EncodedDataset(
            [seg for part in parts for seg in part.segments],
            [seg for part in parts for seg in part.label_segments],
            np.concatenate(offsets),
            np.concatenate(index) if index else np.zeros(0, dtype=np.int64),
            np.concatenate(source) if source else np.zeros((0, 2), dtype=np.int64),
            names,
            rows.pop() if rows else 1,
            {key: np.concatenate([part.fields[key] for part in parts]) for key in (keys.pop() if keys else ())},
            np.concatenate([part.counts for part in parts]) if parts else np.zeros((0, 2), dtype=np.int32),
        )

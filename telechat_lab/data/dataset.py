"""Encoded examples, stored flat so that datasets of millions of examples cost a few arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from telechat_lab.tokenizer import IGNORE_INDEX as IGNORE

PAIR_KEYS = ("chosen", "rejected")  # the two sequences of a preference pair, in storage order


class EncodedDataset:
    """Encoded examples stored flat: sequence s is tokens[offsets[s]:offsets[s+1]]; an example is `rows`
    consecutive sequences (1, or 2 for a preference pair: its chosen then its rejected sequence), example j's
    being sequences rows*j .. rows*j+rows-1; `index` selects (and may repeat) examples, so that subsets, mixing
    and the validation split never separate a pair; `source` gives each example's (dataset, record) for
    inspection; `fields` holds per-example arrays (`prompt_len`: the prompt's tokens, shared by the rows;
    `kto_tag`: desirable) that items carry."""

    def __init__(
        self,
        tokens: np.ndarray,
        labels: np.ndarray,
        offsets: np.ndarray,
        index: np.ndarray | None = None,
        source: np.ndarray | None = None,
        names: Sequence[str] = (),
        rows: int = 1,
        fields: dict[str, np.ndarray] | None = None,
    ):
        self.tokens, self.labels, self.offsets, self.rows = tokens, labels, offsets, rows
        n = (len(offsets) - 1) // rows
        self.index = np.arange(n) if index is None else index
        self.source = source if source is not None else np.zeros((n, 2), dtype=np.int64)
        self.names = list(names)
        self.fields = dict(fields or {})

    def __len__(self) -> int:
        return len(self.index)

    def stored(self) -> int:
        """Examples stored (whatever `index` selects)."""
        return (len(self.offsets) - 1) // self.rows

    def _sequence(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[s], self.offsets[s + 1]
        return self.tokens[start:end], self.labels[start:end]

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
        trained = self.labels != IGNORE
        trained[self.offsets[:-1][np.diff(self.offsets) > 0]] = False
        counts = np.add.reduceat(trained, self.offsets[:-1]) if len(self.offsets) > 1 else np.zeros(0, dtype=np.int64)
        counts[np.diff(self.offsets) == 0] = 0  # reduceat gives an empty slice the element at its start
        return self._per_example(counts)[self.index].astype(np.int64)

    def subset(self, positions: np.ndarray) -> EncodedDataset:
        return EncodedDataset(
            self.tokens,
            self.labels,
            self.offsets,
            self.index[positions],
            self.source,
            self.names,
            self.rows,
            self.fields,
        )

    def with_index(self, index: np.ndarray) -> EncodedDataset:
        return EncodedDataset(
            self.tokens, self.labels, self.offsets, index, self.source, self.names, self.rows, self.fields
        )

    def stats(self) -> dict[str, int]:
        lengths = self.lengths()
        trained = np.add.reduceat(self.labels != IGNORE, self.offsets[:-1]) if len(self.offsets) > 1 else np.zeros(0)
        trained = self._per_example(np.asarray(trained, dtype=np.int64)) if len(self.offsets) > 1 else trained
        return {"examples": len(self), "tokens": int(lengths.sum()), "trained_tokens": int(trained[self.index].sum())}

    @staticmethod
    def concat(parts: Sequence[EncodedDataset]) -> EncodedDataset:
        rows = {part.rows for part in parts}
        keys = {tuple(sorted(part.fields)) for part in parts}
        if len(rows) > 1 or len(keys) > 1:
            raise ValueError("datasets of different kinds cannot be concatenated")
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
            base += (len(part.offsets) - 1) // part.rows
        return EncodedDataset(
            np.concatenate(tokens),
            np.concatenate(labels),
            np.concatenate(offsets),
            np.concatenate(index),
            np.concatenate(source),
            names,
            rows.pop() if rows else 1,
            {key: np.concatenate([part.fields[key] for part in parts]) for key in (keys.pop() if keys else ())},
        )

"""Encoded examples, stored flat so that datasets of millions of examples cost a few arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from telechat_lab.tokenizer import IGNORE_INDEX as IGNORE


class EncodedDataset:
    """Encoded examples stored flat: example i is tokens[offsets[i]:offsets[i+1]]; `index` selects
    (and may repeat) examples; `source` gives each example's (dataset, record) for inspection."""

    def __init__(
        self,
        tokens: np.ndarray,
        labels: np.ndarray,
        offsets: np.ndarray,
        index: np.ndarray | None = None,
        source: np.ndarray | None = None,
        names: Sequence[str] = (),
    ):
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

    def targets(self) -> np.ndarray:
        """Tokens each example trains on: labels other than IGNORE after the shift (its first label predicts
        nothing), as the loss counts them."""
        trained = self.labels != IGNORE
        trained[self.offsets[:-1][np.diff(self.offsets) > 0]] = False
        counts = np.add.reduceat(trained, self.offsets[:-1]) if len(self.offsets) > 1 else np.zeros(0, dtype=np.int64)
        counts[np.diff(self.offsets) == 0] = 0  # reduceat gives an empty slice the element at its start
        return counts[self.index].astype(np.int64)

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
        return EncodedDataset(
            np.concatenate(tokens),
            np.concatenate(labels),
            np.concatenate(offsets),
            np.concatenate(index),
            np.concatenate(source),
            names,
        )

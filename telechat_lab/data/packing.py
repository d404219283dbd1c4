"""Batches: padded, packed (several examples per row, `position_ids` restarting per example, so the
model never attends across them), or padding-free (a whole batch as one row, for flash attention); raw-text
documents (stage pt) pack the same way, never attending across documents.

Preference pairs (kind "pairwise") and KTO examples ("kto") are padded only (packing them is refused by the config
check): a pair batch of B pairs is [2B, L], its chosen sequences in rows 0..B-1 and its rejected ones in B..2B-1,
in the same order; a KTO batch carries `kto_desirable` [B] and the KL rows `kl_input_ids` / `kl_attention_mask` /
`kl_labels` [B, L] (one L for both): row i is the prompt of example i followed by the completion of example
(i - 1) mod B (the completions rotated by one within the batch, as TRL's KTOTrainer builds its mismatched pairs),
cut to cutoff_len; a batch of one example has only its own completion to use."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from telechat_lab.tokenizer import IGNORE_INDEX as IGNORE
from telechat_lab.tokenizer import PAD_ID

from .dataset import EncodedDataset


def pack_rows(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: positions of examples grouped into rows of at most `capacity` tokens."""
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row id)
    for pos in order.tolist():
        size = int(lengths[pos])
        if size > capacity:
            raise ValueError(f"example of {size} tokens exceeds the packing capacity {capacity}")
        k = bisect.bisect_left(free, (size, -1))
        if k < len(free):
            room, row = free.pop(k)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(pos)
        if room - size > 0:
            bisect.insort(free, (room - size, row))
    return rows


class PackedDataset(torch.utils.data.Dataset):
    """Rows of several examples, up to `capacity` tokens each."""

    def __init__(self, dataset: EncodedDataset, capacity: int):
        self.dataset = dataset
        self.rows = pack_rows(dataset.lengths(), capacity)
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return join_examples([self.dataset[j] for j in self.rows[i]])

    def targets(self) -> np.ndarray:
        """Tokens each row trains on (join_examples ignores each example's first label, which predicts nothing)."""
        per_example = self.dataset.targets()
        return np.array([per_example[row].sum() for row in self.rows], dtype=np.int64)

    def efficiency(self) -> float:
        """Real tokens / (rows x capacity)."""
        return float(self.dataset.lengths().sum()) / max(1, len(self.rows) * self.capacity)


def join_examples(examples: Sequence[dict]) -> dict[str, np.ndarray]:
    """One row from several examples; the first label of each is ignored so that no example is
    trained to predict the start of the next."""
    labels = []
    for ex in examples:
        lab = np.array(ex["labels"], dtype=np.int64)
        lab[0] = IGNORE
        labels.append(lab)
    return {
        "input_ids": np.concatenate([np.asarray(ex["input_ids"], dtype=np.int64) for ex in examples]),
        "labels": np.concatenate(labels),
        # a packed row (padding_free over packed rows) keeps its own restarting positions
        "position_ids": np.concatenate(
            [
                np.asarray(ex["position_ids"], dtype=np.int64)
                if "position_ids" in ex
                else np.arange(len(ex["input_ids"]))
                for ex in examples
            ]
        ),
    }


def padded(rows: Sequence[tuple], prefix: str = "", longest: int = 0) -> dict[str, torch.Tensor]:
    """(input_ids, labels) rows padded to the longest (or to `longest`): `{prefix}input_ids`,
    `{prefix}attention_mask`, `{prefix}labels`."""
    longest = max(longest, *(len(ids) for ids, _ in rows))
    input_ids = torch.full((len(rows), longest), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for row, (ids, lab) in enumerate(rows):
        n = len(ids)
        input_ids[row, :n] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        labels[row, :n] = torch.as_tensor(np.asarray(lab, dtype=np.int64))
        mask[row, :n] = 1
    return {f"{prefix}input_ids": input_ids, f"{prefix}attention_mask": mask, f"{prefix}labels": labels}


def kl_rows(items: Sequence[dict], cutoff_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Row i: the prompt of items[i] and the completion of items[(i - 1) mod B], cut to cutoff_len."""
    rows = []
    for i, item in enumerate(items):
        other = items[i - 1]
        prompt, start = item["input_ids"][: item["prompt_len"]], int(other["prompt_len"])
        ids = np.concatenate([prompt, other["input_ids"][start:]])[:cutoff_len]
        labels = np.concatenate([np.full(len(prompt), IGNORE), other["labels"][start:]])[:cutoff_len]
        rows.append((ids, labels))
    return rows


class Collator:
    """Padded batches with an attention mask; packed rows (items with `position_ids`) padded with a
    separate dummy document; `padding_free` joins the batch into one row with no padding at all; pairs and KTO
    examples (`kind`) as the module docstring says."""

    def __init__(self, padding_free: bool = False, kind: str = "sft", cutoff_len: int | None = None):
        self.padding_free, self.kind, self.cutoff_len = padding_free, kind, cutoff_len

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        if self.kind == "pairwise":
            rows = [(it[f"{key}_input_ids"], it[f"{key}_labels"]) for key in ("chosen", "rejected") for it in items]
            return padded(rows)
        if self.kind == "kto":
            rows = [(it["input_ids"], it["labels"]) for it in items]
            kl = kl_rows(items, self.cutoff_len or sum(len(ids) for ids, _ in rows))
            longest = max(len(ids) for ids, _ in rows + kl)  # one length L for both
            batch = {**padded(rows, longest=longest), **padded(kl, "kl_", longest)}
            batch["kto_desirable"] = torch.tensor([bool(it["kto_tag"]) for it in items], dtype=torch.bool)
            return batch
        if self.padding_free:
            items = [join_examples(items)]
        packed = "position_ids" in items[0]
        longest = max(len(it["input_ids"]) for it in items)
        batch = {
            "input_ids": torch.full((len(items), longest), PAD_ID, dtype=torch.long),
            "labels": torch.full((len(items), longest), IGNORE, dtype=torch.long),
        }
        if packed:
            batch["position_ids"] = torch.zeros((len(items), longest), dtype=torch.long)
        else:
            batch["attention_mask"] = torch.zeros((len(items), longest), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            batch["input_ids"][row, :n] = torch.as_tensor(np.asarray(it["input_ids"], dtype=np.int64))
            batch["labels"][row, :n] = torch.as_tensor(np.asarray(it["labels"], dtype=np.int64))
            if packed:
                batch["position_ids"][row, :n] = torch.as_tensor(it["position_ids"])
                batch["position_ids"][row, n:] = torch.arange(longest - n)  # padding: its own document
            else:
                batch["attention_mask"][row, :n] = 1
        return batch

"""The LightningDataModule: the data pipeline's datasets as seeded, resumable DataLoaders, for the data a stage
reads (`kind`: stages.py; sft and pt batches of token rows, pairwise batches of chosen-then-rejected rows, kto
batches with their KL rows: data/packing.py). Its state (in every checkpoint) holds the data's fingerprint: a
resume on data that changed since is refused, naming what changed, unless data.allow_changed_on_resume=true
(then a warning says so)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from telechat_lab.config import DataConfig
from telechat_lab.console import print_once_per_sweep
from telechat_lab.data import build_datasets, format_report
from telechat_lab.data.fingerprint import fingerprint_changes
from telechat_lab.data.packing import Collator, PackedDataset
from telechat_lab.errors import ConfigError, DataError
from telechat_lab.tokenizer import IGNORE_INDEX as IGNORE

log = logging.getLogger(__name__)


class ResumableRandomSampler(Sampler[int]):
    """A seeded permutation per epoch, split across `world` ranks (padded by repetition to a multiple
    of it, as DistributedSampler does), that can start part-way: a resumed run sees exactly the
    batches an uninterrupted one would have seen, on one device or many."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch = 0
        self.resume: tuple[int, int] | None = None  # (epoch, samples already consumed in it)
        self.per_rank = -(-n // world)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every rank's samples of `epoch`, [per_rank, world]: rank r's i-th sample is [i, r]."""
        order = np.random.default_rng(self.seed + epoch).permutation(self.n)
        return np.resize(order, self.per_rank * self.world).reshape(self.per_rank, self.world)

    def __iter__(self):
        order = self.epoch_order(self.epoch)[:, self.rank]
        start = 0
        if self.resume is not None:  # only the interrupted epoch starts part-way
            epoch, consumed = self.resume
            self.resume = None
            if epoch == self.epoch:
                start = consumed
        yield from order[start:].tolist()

    def __len__(self) -> int:  # the full epoch: Lightning counts a resumed epoch's batches from its progress
        return self.per_rank

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at every epoch start
        self.epoch = epoch


class EvenShards(torch.utils.data.Dataset):
    """The validation set filled up to a multiple of `world` with copies that train nothing (labels all ignored):
    every rank runs as many batches (sharded models must), and no example is counted twice in val/loss."""

    def __init__(self, dataset, world: int):
        self.dataset, self.size = dataset, -(-len(dataset) // world) * world

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        if i < len(self.dataset):
            return self.dataset[i]
        item = dict(self.dataset[i % len(self.dataset)])
        for key in [k for k in item if k.endswith("labels")]:  # labels, or chosen_labels and rejected_labels
            item[key] = np.full(len(item[key]), IGNORE, dtype=np.int64)
        return item


PER_EXAMPLE_KINDS = ("pairwise", "kto")  # a step's loss is the mean over its examples (step_examples), not tokens


class TelechatDataModule(L.LightningDataModule):
    """`kind`: the data the stage reads (stages.py: "sft", "pt", "pairwise", "kto")."""

    def __init__(self, data: DataConfig, model_dir: str | Path, kind: str = "sft"):
        super().__init__()
        self.cfg, self.model_dir, self.kind = data, Path(model_dir), kind
        self.train_set = self.val_set = None
        self.report: dict = {}
        self.sampler: ResumableRandomSampler | None = None
        self.resume: tuple[int, int] | None = None  # (epoch, batches done in it) from a checkpoint
        self._targets: tuple[int, np.ndarray] | None = None  # (epoch, cumulative trained tokens per sample slot)
        # data.streaming: the stream's source, per shard its position after the last batch trained, batches trained
        self.stream = None
        self.stream_positions: dict[int, dict] = {}
        self.stream_batches = 0
        self.stream_epoch = 0
        self.stream_resume: dict | None = None

    def prepare_data(self) -> None:
        if self.cfg.streaming:
            return  # nothing is cached: the workers read the files
        build_datasets(self.cfg, self.model_dir, kind=self.kind)  # fills the on-disk cache once, on rank 0

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.kind in PER_EXAMPLE_KINDS and (self.cfg.packing or self.cfg.padding_free):  # the config check says so
            raise ConfigError(f"data.packing / data.padding_free: {self.kind} data are padded batches; set them false")
        if self.cfg.streaming:
            return self._setup_stream()
        train, val, self.report = build_datasets(self.cfg, self.model_dir, kind=self.kind)
        if self.cfg.packing:
            train = PackedDataset(train, self.cfg.cutoff_len)
            val = PackedDataset(val, self.cfg.cutoff_len) if val is not None else None
            self.report["packing_efficiency"] = round(train.efficiency(), 4)
        self.train_set, self.val_set = train, val
        if self.trainer is None or self.trainer.is_global_zero:
            print_once_per_sweep(format_report(self.report))

    def _setup_stream(self) -> None:
        from telechat_lab.data.streaming import (
            ExampleList,
            format_stream_report,
            stream_fingerprint,
            stream_source,
            validation_examples,
        )

        self.stream = stream_source(self.cfg, self.model_dir, self.kind)
        val = validation_examples(self.stream)
        self.val_set = ExampleList(val, self.cfg.packing, self.cfg.cutoff_len) if self.stream.val_size else None
        world = self.trainer.world_size if self.trainer is not None else 1
        self.report = {
            "streaming": True,
            "datasets": {spec.name: {} for spec in self.stream.specs},
            "files": len(self.stream.files()),
            "shards": world * max(1, self.cfg.dataloader_num_workers),
            "train": {"examples": "streamed"},
            "val": {"records": self.stream.val_size, "examples": len(val)} if self.stream.val_size else None,
            "fingerprint": stream_fingerprint(self.stream),
        }
        self.train_set = self.stream  # set up
        if self.trainer is None or self.trainer.is_global_zero:
            print_once_per_sweep(format_stream_report(self.report))

    def stream_dataset(self, rank: int = 0, world: int = 1):
        """The training stream of `rank`, resuming where the restored state says."""
        from telechat_lab.data.streaming import StreamingDataset

        dataset = StreamingDataset(self.stream, self.cfg, rank, world)
        resume = self.stream_resume
        if resume is not None:
            if resume["shards"] != dataset.shards:
                raise DataError(
                    f"resume=true with data.streaming: the checkpoint's stream has {resume['shards']} shard(s) (world "
                    f"size x dataloader workers), this run {dataset.shards}: each shard reads other records, so the "
                    "run cannot continue where it stopped; resume with the same devices and data.dataloader_num_workers"
                )
            ranks = resume["ranks"]
            dataset.positions = {int(k): v for k, v in ranks[rank if len(ranks) > 1 else 0].items()}
            dataset.rotate = resume["batches"] % dataset.workers
            self.stream_positions, self.stream_batches = dict(dataset.positions), resume["batches"]
        return dataset

    def collator(self) -> Collator:
        return Collator(padding_free=self.cfg.padding_free, kind=self.kind, cutoff_len=self.cfg.cutoff_len)

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        if self.cfg.streaming:  # batches made in the dataset (its workers): one (shard, position) each
            return DataLoader(
                self.stream_dataset(rank, world),
                batch_size=None,
                num_workers=self.cfg.dataloader_num_workers,
                collate_fn=_as_is,
            )
        self.sampler = ResumableRandomSampler(len(self.train_set), self.cfg.seed, rank, world)
        self._targets = None
        self._apply_resume()
        return DataLoader(
            self.train_set,
            batch_size=self.cfg.batch_size,
            collate_fn=self.collator(),
            sampler=self.sampler,
            num_workers=self.cfg.dataloader_num_workers,
            generator=torch.Generator().manual_seed(0),
        )

    def val_dataloader(self):
        if self.val_set is None:
            return []
        val_set, sampler = self.val_set, None
        if self.trainer is not None and self.trainer.world_size > 1:
            from torch.utils.data import DistributedSampler

            val_set = EvenShards(self.val_set, self.trainer.world_size)
            sampler = DistributedSampler(
                val_set, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
            )
        return DataLoader(
            val_set,
            batch_size=self.cfg.eval_batch_size,
            collate_fn=self.collator(),
            sampler=sampler,
            num_workers=self.cfg.dataloader_num_workers,
        )

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """A training batch carries `step_targets`: the tokens its optimizer step trains on (its accumulated
        batches, over every rank), what the step's loss is divided by (the LightningModule reads it); for pairs
        and KTO examples `step_examples` instead: the pairs (examples) of its optimizer step, every rank's and
        accumulated batch's."""
        if "stream_error" in batch:  # a worker's DataError, raised here with its own message
            raise DataError(batch["stream_error"])
        if "stream_state" in batch:  # the batch about to be trained: its shard's position after it
            shard, position = batch.pop("stream_state")
            self.stream_positions[shard] = position
            self.stream_epoch = position["epoch"]  # of the batch about to be trained (the stream repeats)
            self.stream_batches += 1
            return batch
        trainer = self.trainer
        if trainer is not None and trainer.training and self.sampler is not None:
            batch_idx = trainer.fit_loop.epoch_loop.batch_idx + 1  # this batch's (Lightning counts it next)
            accumulate = trainer.accumulate_grad_batches
            first = batch_idx - batch_idx % accumulate
            stop = min(first + accumulate, trainer.num_training_batches)
            count = self.targets_in_batches(trainer.current_epoch, first, stop)
            key = "step_examples" if self.kind in PER_EXAMPLE_KINDS else "step_targets"
            batch[key] = torch.tensor(max(count, 1), dtype=torch.float32)
        return batch

    def targets_in_batches(self, epoch: int, first: int, stop: int) -> int:
        """Tokens trained on (pairs or KTO examples: examples) in batches first..stop-1 of `epoch`, over every
        rank: the number an optimizer step's loss is divided by, so that it is the mean over the step's tokens
        (examples) however they are split into accumulated batches and ranks. The sampler's order is the same on
        every rank: nothing is communicated."""
        if self._targets is None or self._targets[0] != epoch:
            order = self.sampler.epoch_order(epoch)
            weights = np.ones(len(self.train_set), np.int64) if self.kind in PER_EXAMPLE_KINDS else None
            per_sample = (self.train_set.targets() if weights is None else weights)[order].sum(axis=1)
            self._targets = (epoch, np.concatenate([[0], np.cumsum(per_sample)]))
        per_rank, size = self.sampler.per_rank, self.cfg.batch_size
        cumulative = self._targets[1]
        return int(cumulative[min(stop * size, per_rank)] - cumulative[min(first * size, per_rank)])

    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        if self.cfg.streaming:
            return {"stream": self._stream_state(), "data_fingerprint": self.report.get("fingerprint")}
        # saved from on_train_batch_end: the current batch is processed, not yet "completed"
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {
            "epoch_batches_done": progress.processed,
            "epoch": self.trainer.current_epoch,
            "data_fingerprint": self.report.get("fingerprint"),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restored before training resumes (the loader may already exist): the interrupted epoch
        continues after the batches it had consumed; a checkpoint from an epoch's end starts the
        next epoch from its beginning. The data must be those the checkpoint was trained on."""
        self._check_same_data(state.get("data_fingerprint"))
        if self.cfg.streaming or "stream" in state:
            if not (self.cfg.streaming and "stream" in state):
                raise DataError(
                    "resume=true: the checkpoint was trained with data.streaming="
                    f"{str('stream' in state).lower()}; resume with the same setting"
                )
            self.stream_resume = state["stream"]
            return
        self.resume = (int(state.get("epoch", 0)), int(state.get("epoch_batches_done", 0)))
        self._apply_resume()

    def _stream_state(self) -> dict:
        """Every rank's shard positions (gathered: the checkpoint is written by rank 0) and the batches trained."""
        import torch.distributed as dist

        world = self.trainer.world_size
        mine = {str(k): v for k, v in self.stream_positions.items()}
        ranks = [mine]
        if world > 1 and dist.is_available() and dist.is_initialized():
            ranks = [None] * world
            dist.all_gather_object(ranks, mine)
        return {
            "shards": world * max(1, self.cfg.dataloader_num_workers),
            "batches": self.stream_batches,
            "ranks": ranks,
        }

    def _check_same_data(self, recorded: dict | None) -> None:
        changes = fingerprint_changes(recorded, self.report["fingerprint"]) if recorded else []
        if not changes:  # the same data (or a checkpoint from before fingerprints were recorded)
            return
        what = "; ".join(changes)
        checkpoint = getattr(self.trainer, "ckpt_path", None) if self.trainer is not None else None
        if self.cfg.allow_changed_on_resume:
            log.warning(
                "data.allow_changed_on_resume=true: resuming on data that changed since the checkpoint: %s", what
            )
            return
        raise DataError(
            f"resume=true: the data changed since the checkpoint{f' {checkpoint}' if checkpoint else ''}: {what}. "
            "Resuming would train on another training set and validate on another split: restore the data, or "
            "start a new run (another output_dir), or continue anyway with data.allow_changed_on_resume=true"
        )

    def _apply_resume(self) -> None:
        if self.sampler is not None and self.resume is not None:
            epoch, batches = self.resume
            self.sampler.resume = (epoch, batches * self.cfg.batch_size)


def _as_is(batch):
    """The stream's batches are collated in the dataset."""
    return batch

"""Callbacks: throughput / MFU / memory logging, and the loss history and plots."""

from __future__ import annotations

import csv
import io
import math
import resource
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from rich.progress import ProgressColumn
from rich.text import Text

from telechat_lab.files import atomic_write_text
from telechat_lab.training.run_dir_owner import RunDir
from telechat_lab.training.rundir import has_checkpoint


class SpeedAndMemory(L.Callback):
    """Every `logging_steps` optimizer steps, with the step's other metrics: train/tokens_seen and
    train/tokens_per_s (real tokens of every rank, summed: exact when ranks' batches differ in length),
    train/mfu and train/hfu (model and hardware FLOPs over the GPU's dense peak, see training/flops.py; GPU only)
    and train/peak_mem_gb (the most GPU memory allocated, or the process's peak RSS on CPU).

    The peak comes from Lightning's `get_available_flops` (it tells H100 SXM from PCIe), or hardware.peak_tflops.
    Lightning's ThroughputMonitor is not used: it logs through a path of its own (a second CSV row per step) and
    scales one device's rate by the number of devices."""

    def __init__(self, logging_steps: int = 1, peak_tflops: float | None = None, gradient_checkpointing: bool = False):
        self.logging_steps, self.peak_tflops, self.gradient_checkpointing = (
            logging_steps,
            peak_tflops,
            gradient_checkpointing,
        )
        self.tokens_seen = 0.0  # of every rank, as of the last logged step
        self._tokens = self._pairs = None  # this rank's, since the last logged step (device tensors: no sync)
        self._window_start, self._last_step = None, -1
        self.peak = self.counts = None

    def state_dict(self):
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state):
        self.tokens_seen = float(state.get("tokens_seen", 0))

    def on_train_start(self, trainer, pl_module):
        from lightning.fabric.utilities.throughput import get_available_flops

        from telechat_lab.private_apis import compute_dtype

        from .flops import count_flops

        device = trainer.strategy.root_device
        if self.peak_tflops:
            self.peak = self.peak_tflops * 1e12
        elif device.type == "cuda":
            self.peak = get_available_flops(device, compute_dtype(trainer.precision_plugin))
        self.counts = count_flops(pl_module.model, pl_module.model.config, self.gradient_checkpointing)
        self._window_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from .flops import batch_tokens_and_pairs

        tokens, pairs = batch_tokens_and_pairs(batch)
        self._tokens = tokens if self._tokens is None else self._tokens + tokens
        self._pairs = pairs if self._pairs is None else self._pairs + pairs
        step = trainer.global_step
        if step == self._last_step or step % self.logging_steps:
            return
        self._last_step = step
        window = torch.stack([self._tokens, self._pairs]).float()
        if trainer.world_size > 1:
            window = trainer.strategy.reduce(window, reduce_op="sum")
        tokens, pairs = (float(v) for v in window.tolist())
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        self.tokens_seen += tokens
        rate = tokens / elapsed
        metrics = {"train/tokens_seen": self.tokens_seen, "train/tokens_per_s": rate}
        if self.peak:
            peak = self.peak * trainer.world_size
            metrics["train/mfu"] = self.counts.model(tokens) / elapsed / peak
            metrics["train/hfu"] = self.counts.hardware(tokens, pairs) / elapsed / peak
        if torch.cuda.is_available():
            metrics["train/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            metrics["train/peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._tokens = self._pairs = None
        self._window_start = now


def csv_log_dir(loggers: list) -> Path | None:
    """Where the run's CSV metrics are, if a CSV logger writes them."""
    from lightning.pytorch.loggers import CSVLogger

    return next((Path(logger.log_dir) for logger in loggers if isinstance(logger, CSVLogger)), None)


class LossPlot(L.Callback):
    """Records the training and validation losses (kept in resumable checkpoints) and writes them:
    loss_history.csv, training_loss.png (raw and smoothed) and validation_loss.png in output_dir."""

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.output_dir, self.enabled = Path(output_dir), enabled
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def state_dict(self):
        return {"train": self.train, "val": self.val}

    def load_state_dict(self, state):
        self.train, self.val = [tuple(x) for x in state["train"]], [tuple(x) for x in state["val"]]

    def on_train_start(self, trainer, pl_module):
        """Resumed: the validations the earlier process ran after its checkpoint was written (the end of a run
        that is now extended, the one before a signal) are kept from its loss_history.csv; they measured the
        weights this run continues from."""
        path = self.output_dir / "loss_history.csv"
        if not trainer.global_step or not path.is_file():
            return
        with open(path, newline="") as f:
            earlier = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r["split"] == "val"]
        known = {step for step, _ in self.val}
        self.val = sorted(self.val + [(s, v) for s, v in earlier if s <= trainer.global_step and s not in known])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.callback_metrics.get("train/loss")
        # only a step whose loss was logged (not a skipped one, nor the middle of gradient accumulation)
        if loss is not None and pl_module.loss_logged_at == trainer.global_step:
            if not self.train or self.train[-1][0] != trainer.global_step:
                self.train.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer, pl_module):  # after the module's epoch end logged val/loss
        loss = trainer.callback_metrics.get("val/loss")
        if (
            loss is not None
            and not trainer.sanity_checking
            and (not self.val or self.val[-1][0] != trainer.global_step)
        ):
            self.val.append((trainer.global_step, float(loss)))

    def write(self) -> None:
        rows = io.StringIO()
        writer = csv.writer(rows)
        writer.writerow(["step", "split", "loss"])
        writer.writerows([(s, "train", v) for s, v in self.train] + [(s, "val", v) for s, v in self.val])
        atomic_write_text(self.output_dir / "loss_history.csv", rows.getvalue())
        if self.enabled and self.train:
            from .plots import plot_losses

            plot_losses(self.output_dir, self.train, self.val)


class RateColumn(ProgressColumn):
    """A bar's batches per second, once it has timed one (Rich's estimate: the batches after the first over the time
    since it, the last 30 s); until then `--it/s`. Lightning's column shows `0.00it/s` there: on every bar's first
    batch, and for the whole of a one-batch validation."""

    def __init__(self, style):
        self.style = style
        super().__init__()

    def render(self, task) -> Text:
        return Text("--it/s" if task.speed is None else f"{task.speed:>.2f}it/s", style=self.style)


class StepsProgressBar(RichProgressBar):
    """Lightning's progress bar, except where trainer.max_steps ends the run before the epochs do: Lightning's bar
    counts the whole epoch (and its ETA with it) and names the last epoch of max_epochs; this one ends where the
    run will stop and names the epoch max_steps reaches; epochs are counted from 1 ("Epoch 2/2": the last of two).
    Its rate is shown only once known (RateColumn)."""

    def configure_columns(self, trainer) -> list:
        from lightning.pytorch.callbacks.progress.rich_progress import ProcessingSpeedColumn

        columns = super().configure_columns(trainer)
        return [RateColumn(self.theme.processing_speed) if isinstance(c, ProcessingSpeedColumn) else c for c in columns]

    def _mark_start(self, trainer) -> None:
        self._steps_at_start = trainer.global_step
        # batches this epoch already ran (> 0 when resumed); a checkpoint taken at a batch's end counts it processed
        # but not yet completed
        self._done_at_start = trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def on_train_start(self, trainer, pl_module) -> None:  # a run resumed mid-epoch may draw before its epoch hook
        self._mark_start(trainer)
        super().on_train_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._mark_start(trainer)
        super().on_train_epoch_start(trainer, pl_module)

    def _batches_left(self) -> int | None:
        """Batches until max_steps, counted from this epoch's start; None without a step limit."""
        trainer = self.trainer
        if not trainer.max_steps or trainer.max_steps < 0:
            return None
        return (trainer.max_steps - self._steps_at_start) * trainer.accumulate_grad_batches

    @property
    def total_train_batches(self) -> int | float:
        left = self._batches_left()
        per_epoch = self.trainer.num_training_batches
        return per_epoch if left is None else min(per_epoch, self._done_at_start + left)

    def _get_train_description(self, current_epoch: int) -> str:
        left, per_epoch = self._batches_left(), self.trainer.num_training_batches
        last = None if self.trainer.max_epochs in (None, -1) else self.trainer.max_epochs - 1
        if left is not None and per_epoch not in (0, float("inf")):
            beyond = left - (per_epoch - self._done_at_start)
            reached = current_epoch + max(0, math.ceil(beyond / per_epoch))
            last = reached if last is None else min(last, reached)
        # counted from 1, as a user counts (Lightning's bar says "Epoch 1/1" in the second of two epochs)
        description = f"Epoch {current_epoch + 1}" + (f"/{last + 1}" if last is not None else "")
        if per_epoch == float("inf"):  # data.streaming: one endless Lightning epoch (the stream's: logged as epoch)
            description = "Training"
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer, pl_module) -> dict:
        """The bar's metrics without Lightning's `v_num` (a logger's version: a wandb id's tail, noise on the bar)."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class DiscardReplacedRun(L.Callback):
    """overwrite=true: the earlier run, set aside, is deleted (`RunDir.commit`) once the new run has trained a step
    and written a resumable checkpoint (until then an interruption puts the earlier run back), at the latest when
    training ends."""

    def __init__(self, output_dir: Path):
        self.output_dir, self.done = output_dir, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.done and trainer.global_step >= 1 and has_checkpoint(self.output_dir):
            self._discard(trainer)

    def on_train_end(self, trainer, pl_module):
        if not self.done and has_checkpoint(self.output_dir):
            self._discard(trainer)

    def _discard(self, trainer) -> None:
        if trainer.is_global_zero:
            RunDir.commit(self.output_dir)
        self.done = True

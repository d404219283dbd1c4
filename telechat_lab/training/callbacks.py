"""Callbacks: throughput / MFU / memory logging, and the loss history and plots."""

from __future__ import annotations

import csv
import io
import os
import resource
import time
from pathlib import Path

import lightning as L
import torch

from telechat_lab.data.packing import PAD_ID
from telechat_lab.files import atomic_write_text

# Dense bf16 peak of common GPUs (TFLOP/s), for MFU; hardware.peak_tflops overrides.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "V100": 125.0,
    "4090": 165.0,
}


def peak_flops(override: float | None) -> float | None:
    if override:
        return float(override) * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


class ThroughputMonitor(L.Callback):
    """Logs tokens_seen, tokens_per_s, mfu and peak_mem_gb every `logging_steps` optimizer steps.

    MFU = tokens/s x 6 x N / peak FLOP/s, with N the model's parameter count (2N FLOPs per token
    forward, 4N backward; attention's sequence-quadratic term is left out, and so is the saving of
    frozen weights' gradients under LoRA, so adapter runs read slightly high). Only logged where the
    peak is known (a listed GPU, or hardware.peak_tflops)."""

    def __init__(self, logging_steps: int = 1, peak_tflops: float | None = None):
        self.logging_steps, self.peak_tflops = logging_steps, peak_tflops
        self.tokens_seen = 0
        self._window_tokens, self._window_start, self._last_step = 0, None, -1

    def state_dict(self):
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state):
        self.tokens_seen = state.get("tokens_seen", 0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._window_start is None:
            self._window_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mask = batch.get("attention_mask")
        # packed / padding-free rows have no mask: their padding is <_pad>, which text never produces
        tokens = int(mask.sum()) if mask is not None else int((batch["input_ids"] != PAD_ID).sum())
        tokens *= trainer.world_size
        self.tokens_seen += tokens
        self._window_tokens += tokens
        step = trainer.global_step
        if step == self._last_step or step % self.logging_steps:
            return
        self._last_step = step
        elapsed = time.perf_counter() - self._window_start
        rate = self._window_tokens / max(elapsed, 1e-9)
        metrics = {"tokens_seen": float(self.tokens_seen), "tokens_per_s": rate}
        peak = peak_flops(self.peak_tflops)
        if peak:
            metrics["mfu"] = rate * 6 * pl_module.n_params / (peak * trainer.world_size)
        if torch.cuda.is_available():
            metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            metrics["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # RSS, Linux KiB
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._window_tokens, self._window_start = 0, time.perf_counter()


def csv_log_dir(loggers: list, output_dir: Path) -> Path:
    for logger in loggers:
        if type(logger).__name__ == "CSVLogger":
            return Path(logger.log_dir)
    return output_dir / "logs"


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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None and (not self.train or self.train[-1][0] != trainer.global_step):
            self.train.append((trainer.global_step, float(loss)))

    def on_validation_epoch_end(self, trainer, pl_module):
        loss = trainer.callback_metrics.get("val_loss")
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
            plot_losses(self.output_dir, self.train, self.val)


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average; the weight grows with the series' length (as TensorBoard's)."""
    if weight is None:
        weight = 1.8 * (1 / (1 + 2.718281828 ** (-0.05 * len(values))) - 0.5)
    out, last = [], values[0] if values else 0.0
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def plot_losses(output_dir: Path, train: list, val: list) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*train)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="#9ecae1", alpha=0.6, label="raw")
    ax.plot(steps, smooth(list(losses)), color="#08519c", label="smoothed")
    ax.set(xlabel="step", ylabel="loss", title=f"training loss of {output_dir.name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "training_loss.png", dpi=100)
    plt.close(fig)
    if val:
        steps, losses = zip(*val)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, losses, marker="o", color="#d94801", label="validation")
        ax.set(xlabel="step", ylabel="loss", title=f"validation loss of {output_dir.name}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(output_dir / "validation_loss.png", dpi=100)
        plt.close(fig)

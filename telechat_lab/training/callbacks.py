"""Callbacks: HF-format checkpoints (adapter or full model), throughput / MFU / memory logging, and
the loss plots."""

from __future__ import annotations

import csv
import json
import os
import resource
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from telechat_lab.data.packing import PAD_ID

# Dense bf16 peak of common GPUs (TFLOP/s), for MFU; hardware.peak_tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "A10": 125.0, "V100": 125.0, "4090": 165.0}


def peak_flops(override: float | None) -> float | None:
    if override:
        return float(override) * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


class HFCheckpoint(L.Callback):
    """Every `save_steps` optimizer steps to output_dir/checkpoint-STEP, and at the end to output_dir:
    a PEFT adapter (adapter_config.json + adapter_model.safetensors, `base_model_name_or_path` the
    absolute base directory) or, for full / freeze fine-tuning, a HF checkpoint directory with
    TeleChat2's own parameter names; the tokenizer and the resolved config (config.yaml) beside it."""

    def __init__(self, output_dir: str | Path, base_dir: str | Path, save_steps: int, resolved_config: str):
        self.output_dir, self.base_dir = Path(output_dir), Path(base_dir).resolve()
        self.save_steps, self.resolved_config = save_steps, resolved_config
        self._last_saved = -1
        self._tokenizer = None

    def save(self, pl_module, directory: Path) -> None:
        from telechat_lab.tokenizer import load_tokenizer, save_tokenizer

        model = pl_module.model
        directory.mkdir(parents=True, exist_ok=True)
        if hasattr(model, "peft_config"):
            for config in model.peft_config.values():
                config.base_model_name_or_path = str(self.base_dir)
            model.save_pretrained(directory)
        else:
            model.save_pretrained(directory)
            model.generation_config.save_pretrained(directory)
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.base_dir)
        save_tokenizer(self._tokenizer, directory)
        (directory / "config.yaml").write_text(self.resolved_config)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step and step % self.save_steps == 0 and step != self._last_saved and trainer.is_global_zero:
            self.save(pl_module, self.output_dir / f"checkpoint-{step}")
            self._last_saved = step

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.save(pl_module, self.output_dir)


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


class LossPlot(L.Callback):
    """training_loss.png (raw and smoothed) and validation_loss.png in output_dir, from the logged
    metrics, plus metrics.json with the final values."""

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
        if loss is not None and not trainer.sanity_checking:
            self.val.append((trainer.global_step, float(loss)))

    @rank_zero_only
    def on_train_end(self, trainer, pl_module):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        final = {"train_loss": self.train[-1][1] if self.train else None,
                 "val_loss": self.val[-1][1] if self.val else None, "steps": trainer.global_step}
        (self.output_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
        with open(self.output_dir / "loss_history.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "split", "loss"])
            writer.writerows([(s, "train", v) for s, v in self.train] + [(s, "val", v) for s, v in self.val])
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

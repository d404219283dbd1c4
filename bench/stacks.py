"""The two training stacks bench/train_throughput.py runs side by side, each timed the same way:

- `run_ours`: this project's path, exactly as train.py builds it (config composed with the command's overrides,
  `telechat_lab.training.run.prepare` and `build`: the data module, the LightningModule, the strategy and the
  Trainer), minus the checkpoints (a benchmark writes none).
- `run_hf`: what a user would otherwise run, Hugging Face's `Trainer` with PEFT, on the same model directory
  and the very batches our padded run trained on (same examples, same order, same padding), sdpa attention, the
  whole [tokens, vocab] logits (as the release's own modeling code computes them), bf16 autocast.

Timing: wall time of each optimizer step after `warmup` steps, the GPU synchronised at step boundaries."""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field

import torch

from telechat_lab.tokenizer import IGNORE_INDEX


@dataclass
class Settings:
    adapter: str  # lora | dora | qlora | full
    rank: int
    cutoff: int
    batch_rows: int  # rows per micro-batch (padded examples, or packed rows)
    accumulate: int
    steps: int
    warmup: int
    precision: str  # bf16-mixed on a GPU, 32-true on a CPU
    gradient_checkpointing: bool
    lr: float = 1e-4
    seed: int = 0
    compile: bool = False
    hardware: str = "auto"  # a hardware group of train.py (deepspeed_zero3_offload, ...)


@dataclass
class Measured:
    """What a probe records: per optimizer step its wall time, real (non-pad) tokens, trained tokens, the
    (query, key) pairs attended, and its loss."""

    times: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)
    trained: list[float] = field(default_factory=list)
    pairs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peak_mem_gib: float | None = None
    peak_rss_gib: float | None = None  # on a CPU: resident memory above the run's start (ResidentPeak)
    attention: str = ""
    flops = None  # telechat_lab.training.flops.FlopCounts of the model as trained

    def add_batch(self, batch: dict, into_last: bool) -> None:
        from telechat_lab.training.flops import batch_tokens_and_pairs

        tokens, pairs = (float(v) for v in batch_tokens_and_pairs(batch))
        trained = float((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
        if into_last and self.tokens:
            self.tokens[-1] += tokens
            self.pairs[-1] += pairs
            self.trained[-1] += trained
        else:
            self.tokens.append(tokens)
            self.pairs.append(pairs)
            self.trained.append(trained)

    def summary(self, warmup: int, peak_flops: float | None, n_params: int) -> dict:
        """Rates over the steps after `warmup`."""
        timed = slice(warmup, len(self.times))
        seconds = sum(self.times[timed])
        tokens, trained, pairs = (sum(x[timed]) for x in (self.tokens, self.trained, self.pairs))
        out = {
            "steps_timed": len(self.times[timed]),
            "step_time_s": round(seconds / max(1, len(self.times[timed])), 4),
            "tokens_per_step": round(tokens / max(1, len(self.times[timed])), 1),
            "tokens_per_s": round(tokens / seconds, 1),
            "trained_tokens_per_s": round(trained / seconds, 1),
            "peak_mem_gib": None if self.peak_mem_gib is None else round(self.peak_mem_gib, 3),
            "peak_rss_gib": self.peak_rss_gib,
            "attention": self.attention,
            "losses": [round(x, 6) for x in self.losses],
        }
        if peak_flops:
            out["mfu"] = round(6 * n_params * tokens / seconds / peak_flops, 4)
            out["hfu"] = round(self.flops.hardware(tokens, pairs) / seconds / peak_flops, 4)
        return out


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


class ResidentPeak:
    """On a CPU: the most resident memory the process held above what it held when the run began, sampled every few
    milliseconds in a thread (both stacks run in one process, so the process's own peak RSS would be the larger
    run's). Conservative for the run that goes second: memory the first one freed but the allocator kept counts
    towards its baseline."""

    def __init__(self, every_s: float = 0.005):
        import threading

        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.resident())
            self._stop.wait(self.every_s)

    def __enter__(self):
        gc.collect()
        self.start = self.resident()
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def gib(self) -> float:
        return (self.peak - self.start) / 2**30


def ours_overrides(s: Settings, model_dir, data_dir, datasets, packed: bool, out_dir, cache_dir) -> list[str]:
    """train.py's overrides for this run: every setting both stacks share is explicit."""
    overrides = [
        "model=telechat2_7b",  # any release group: not the tiny model's demo preset (experiment/tiny.yaml)
        f"model.path={model_dir}",
        "model.name=bench",
        "model.dtype=auto",
        "model.attn_implementation=auto",
        f"model.gradient_checkpointing={str(s.gradient_checkpointing).lower()}",
        f"model.compile={str(s.compile).lower()}",
        f"adapter={'lora' if s.adapter == 'dora' else s.adapter}",
        f"data.dataset_dir={data_dir}",
        f"data.datasets=[{','.join(datasets)}]",
        f"data.cutoff_len={s.cutoff}",
        f"data.packing={str(packed).lower()}",
        f"data.batch_size={s.batch_rows}",
        "data.val_size=0",
        f"data.cache_dir={cache_dir}",
        f"hardware={s.hardware}",
        f"hardware.precision={s.precision}",
        f"trainer.max_steps={s.steps}",
        f"trainer.accumulate_grad_batches={s.accumulate}",
        "trainer.gradient_clip_val=1.0",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"optim.lr={s.lr}",
        "optim.weight_decay=0",
        "optim.warmup_steps=0",
        "optim.scheduler=constant",
        "logger=none",
        f"output_dir={out_dir}",
        "overwrite=true",
        "plot_loss=false",
        f"seed={s.seed}",
    ]
    if s.adapter != "full":
        overrides += [
            f"adapter.rank={s.rank}",
            f"adapter.alpha={2 * s.rank}",
            "adapter.dropout=0",
            "adapter.target=all",
        ]
    if s.adapter == "dora":
        overrides.append("adapter.use_dora=true")
    return overrides


def run_ours(s: Settings, overrides: list[str]) -> tuple[Measured, dict, list[dict]]:
    """Train with this project's path; (measurements, the adapter's initial weights, the first batches it saw)."""
    import lightning as L

    from telechat_lab import api
    from telechat_lab.training.checkpoints import RunCheckpoints
    from telechat_lab.training.flops import count_flops
    from telechat_lab.training.run import build, prepare

    measured, start = Measured(), {}
    batches: list[dict] = []

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            model = pl_module.model
            measured.attention = model.config._attn_implementation
            measured.flops = count_flops(model, model.config, s.gradient_checkpointing)
            start.update({n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad})
            synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            first_of_step = batch_idx % s.accumulate == 0
            measured.add_batch(batch, into_last=not first_of_step)
            if len(batches) < s.steps * s.accumulate:
                batches.append({k: v.detach().cpu() for k, v in batch.items()})
            if pl_module.loss_logged_at == trainer.global_step and len(measured.losses) < trainer.global_step:
                synchronize()
                now = time.perf_counter()
                measured.times.append(now - self.t0)
                measured.losses.append(float(trainer.callback_metrics["train/loss"]))
                self.t0 = now

    release_memory()
    run = prepare(api.compose("train", overrides), overrides)
    built = build(run)
    trainer = built.trainer
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, RunCheckpoints)] + [Probe()]
    with ResidentPeak() as resident:
        trainer.fit(built.module, datamodule=built.datamodule)
    measured.peak_mem_gib = peak_memory_gib()
    measured.peak_rss_gib = None if torch.cuda.is_available() else round(resident.gib(), 3)
    del run, built, trainer
    release_memory()
    return measured, start, batches


def run_hf(s: Settings, model_dir, batches: list[dict], start: dict) -> Measured:
    """Hugging Face Trainer + PEFT on `batches` (padded), starting from the same adapter weights `start`."""
    import tempfile

    from torch.utils.data import DataLoader, Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from telechat_lab.model import Telechat2ForCausalLM
    from telechat_lab.training.adapters import ALL_TARGETS
    from telechat_lab.training.flops import count_flops

    on_gpu = torch.cuda.is_available()
    measured = Measured()
    release_memory()
    kwargs = {}
    if s.adapter == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    dtype = torch.bfloat16 if on_gpu else torch.float32  # how HF users load a model for LoRA
    model = Telechat2ForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa", **kwargs)
    if s.adapter != "full":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if s.adapter == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.gradient_checkpointing)
        lora = LoraConfig(
            r=s.rank,
            lora_alpha=2 * s.rank,
            lora_dropout=0.0,
            target_modules=list(ALL_TARGETS),
            use_dora=s.adapter == "dora",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    with torch.no_grad():  # the same starting point as our run (PEFT's random lora_A)
        for name, param in model.named_parameters():
            if name in start and param.requires_grad:
                param.copy_(start[name].to(param.dtype))
    measured.attention = model.config._attn_implementation
    measured.flops = count_flops(model, model.config, s.gradient_checkpointing, chunked_loss=False)

    class Batches(Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return {**batches[i], "return_logits": True}  # the whole logits, as the release's own code

    class FixedBatches(Trainer):
        def get_train_dataloader(self):
            loader = DataLoader(Batches(), batch_size=1, collate_fn=lambda items: items[0], shuffle=False)
            return self.accelerator.prepare(loader)

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            synchronize()
            measured.times.append(time.perf_counter() - self.t0)
            step = len(measured.times) - 1
            for batch in batches[step * s.accumulate : (step + 1) * s.accumulate]:
                measured.add_batch(batch, into_last=batch is not batches[step * s.accumulate])

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                measured.losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=s.batch_rows,
            gradient_accumulation_steps=s.accumulate,
            max_steps=s.steps,
            learning_rate=s.lr,
            weight_decay=0.0,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=1.0,
            bf16=s.precision.startswith("bf16"),
            gradient_checkpointing=s.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=s.seed,
            use_cpu=not on_gpu,
        )
        trainer = FixedBatches(model=model, args=args, callbacks=[Probe()])
        with ResidentPeak() as resident:
            trainer.train()
    measured.peak_mem_gib = peak_memory_gib()
    measured.peak_rss_gib = None if torch.cuda.is_available() else round(resident.gib(), 3)
    del trainer, model
    release_memory()
    return measured

#!/usr/bin/env python
"""Where a training step's time goes on this project's path: the wall time of every hook of ours around the
model's own work, per optimizer step, from timers wrapped around them in one run of train.py's path
(bench/stacks.py's `run_ours`, the model and data of bench/train_throughput.py):

- the callbacks (SpeedAndMemory, LossPlot, StepsProgressBar when the bar is on, RunCheckpoints is left out as in
  the throughput bench: it writes nothing between its save steps);
- the module's NaN / infinity check of the loss (`_finite_everywhere`), the gradient norm and its check
  (`on_before_optimizer_step`), its `self.log` calls and Lightning's logger connector (the step's metrics);
- the datamodule's batch transfer (`step_targets` travel with the batch);
- the rest: forward, backward and the optimizer (the model's own work), what the overhead is compared with.

    python bench/step_profile.py --cutoff 1024 --batch-size 4 --steps 6           # tiny shape, CPU
    python bench/step_profile.py --cutoff 1024 --torch-profile 12                 # also torch.profiler's top ops

Prints a table (ms per optimizer step, share of the step) and writes it with the command to --out (JSON)."""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import train_throughput as tt  # noqa: E402
from random_model import shape_config, write_random_model  # noqa: E402
from stacks import Settings, ours_overrides  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--cutoff", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the timing")
    p.add_argument("--packed", action="store_true")
    p.add_argument("--logging-steps", type=int, default=1)
    p.add_argument("--progress-bar", action="store_true", help="with the progress bar (the bench runs without)")
    p.add_argument("--torch-profile", type=int, default=0, help="print torch.profiler's N costliest ops")
    p.add_argument("--tokenizer", type=Path, default=tt.SHARED / "telechat2" / "tokenizer.model")
    p.add_argument("--data", type=Path, default=tt.SHARED / "data" / "telechat2_sft_demo")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / ".work")
    p.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    return p.parse_args(argv)


class Timers:
    """Seconds spent in each wrapped callable, exclusive of the wrapped callables it calls (a self.log inside the
    grad-norm hook counts as self.log), counted only while `on` (the timed steps)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.on = False
        self._inner = [0.0]  # per open call: time spent in the wrapped calls it made

    def wrap(self, owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            if not self.on:
                return inner(*args, **kwargs)
            self._inner.append(0.0)
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                nested = self._inner.pop()
                self.seconds[label] += spent - nested
                self._inner[-1] += spent

        setattr(owner, name, timed)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import lightning as L
    import torch

    from telechat_lab import api
    from telechat_lab.tokenizer import TINY_TOKENIZER_PATH, load_tokenizer
    from telechat_lab.training.checkpoints import RunCheckpoints
    from telechat_lab.training.run import build, prepare

    if not args.tokenizer.is_file():
        args.tokenizer = TINY_TOKENIZER_PATH
    if not args.data.exists():
        args.data = ROOT / "telechat_lab" / "demo_data"
    vocab = len(load_tokenizer(args.tokenizer))
    values = shape_config(args.shape, args.layers, vocab)
    work = args.work.resolve()
    model_dir = work / f"{args.shape}-L{values['n_layer']}-v{vocab}"
    write_random_model(model_dir, values, args.tokenizer, "cuda" if torch.cuda.is_available() else "cpu")
    data_dir, datasets = tt.dataset_dir(args.data.resolve(), work)
    s = Settings(
        adapter="lora",
        rank=8,
        cutoff=args.cutoff,
        batch_rows=args.batch_size,
        accumulate=1,
        steps=args.steps,
        warmup=args.warmup,
        precision="bf16-mixed" if torch.cuda.is_available() else "32-true",
        gradient_checkpointing=True,
        hardware="auto" if torch.cuda.is_available() else "cpu",
    )
    overrides = ours_overrides(s, model_dir, data_dir, datasets, args.packed, work / "runs" / "profile", work / "cache")
    overrides += [f"logging_steps={args.logging_steps}"]
    if args.progress_bar:
        overrides = [o for o in overrides if not o.startswith("trainer.enable_progress_bar")]
    run = prepare(api.compose("train", overrides), overrides)
    built = build(run)
    trainer, module = built.trainer, built.module
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, RunCheckpoints)]
    timers, steps = Timers(), []

    for callback in trainer.callbacks:
        for hook in ("on_train_batch_start", "on_train_batch_end", "on_before_optimizer_step", "on_after_backward"):
            if getattr(type(callback), hook) is not getattr(L.Callback, hook):  # overridden
                timers.wrap(callback, hook, f"callback {type(callback).__name__}")
    timers.wrap(module, "_finite_everywhere", "module: loss finite check")
    timers.wrap(module, "on_before_optimizer_step", "module: grad norm + its check")
    timers.wrap(module, "log", "module: self.log")
    timers.wrap(module, "_step_targets", "module: step_targets")
    timers.wrap(trainer._logger_connector, "update_train_step_metrics", "Lightning: logger connector")
    timers.wrap(trainer._logger_connector, "on_batch_end", "Lightning: logger connector")
    timers.wrap(trainer.strategy, "batch_to_device", "Lightning: batch to device")

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            timers.on = batch_idx >= args.warmup
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if timers.on:
                steps.append(time.perf_counter() - self.t0)

    trainer.callbacks.insert(0, Clock())
    profiler = None
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] * torch.cuda.is_available()))
        profiler.__enter__()
    trainer.fit(module, datamodule=built.datamodule)
    if profiler is not None:
        profiler.__exit__(None, None, None)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.torch_profile))
    # the batch hooks of the Clock bracket everything but the batch transfer and the other callbacks' hooks that
    # run before it; a step's total is the Clock's span plus those
    n = max(1, len(steps))
    outside = sum(v for k, v in timers.seconds.items() if k.startswith("Lightning: batch"))
    total = (sum(steps) + outside) / n
    rows = {k: v / n for k, v in sorted(timers.seconds.items(), key=lambda kv: -kv[1])}
    overhead = sum(rows.values())
    rows["forward, backward, optimizer (the rest)"] = total - overhead
    command = "python bench/step_profile.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = ["| part | ms a step | share |", "|---|---|---|"]
    lines += [f"| {k} | {v * 1e3:.2f} | {v / total:.2%} |" for k, v in rows.items()]
    lines.append(f"| **step** | {total * 1e3:.1f} | 100% |")
    print("\n".join(lines))
    print(f"\nours, {'packed' if args.packed else 'padded'}, {n} steps timed; `{command}`")
    report = {"command": command, "steps_timed": n, "step_s": total, "seconds_a_step": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()

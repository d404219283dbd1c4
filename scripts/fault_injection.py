"""Kill -9 a training run at random moments, again and again, and check that resuming it always ends with the
adapter the uninterrupted run ends with.

    python scripts/fault_injection.py --tries 20 [--steps 12] [--seed 0] [--work DIR] [--json FILE]
    python scripts/fault_injection.py --target overwrite --tries 10 [...]

A baseline run trains the tiny model for `--steps` optimizer steps with a checkpoint at every step
(save_steps=1). Each try starts the same run in a directory of its own and kills it (SIGKILL, nothing can be
saved) at a random moment of the baseline's duration: while the process starts, loads, trains, or writes a
checkpoint (mostly during training and checkpoint writes). It is then continued with `resume=true` (started
again with `overwrite=true` if it was killed before its first checkpoint), and each continuation may itself be
killed at random, until one finishes. Its final adapter is compared with the baseline's, tensor by tensor, for
exact equality. Figures: tries, survived (finished with the baseline's adapter), mismatches, kills, restarts.

`--target overwrite`: a finished run is started again with `overwrite=true` (another seed) and killed at a random
moment of it (while the earlier run is set aside, while the new one starts or trains, while the earlier one is
deleted). What the next command finds first (`recover_interrupted_overwrite`) must then be either the earlier run,
intact byte for byte, or a new run that `resume=true` continues to its end; the next command (`overwrite=true`
again, or `resume=true`) must succeed. Figures: tries, old_intact, new_resumable, broken, next_failed, survived.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = [
    "data.datasets=[identity]",
    "data.max_samples=16",
    "data.val_size=0",
    "data.batch_size=4",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "save_steps=1",
    "save_total_limit=2",
]


def launch(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def run_to_end(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = launch(args, cwd)
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"the run failed:\n{err[-3000:]}")
    return time.perf_counter() - start


def kill_time(rng: random.Random, duration: float) -> float:
    """A random moment of a run: mostly in its last 40% (training and checkpoint writes; start-up and model
    loading take the rest), sometimes anywhere."""
    return duration * (rng.uniform(0.6, 1.0) if rng.random() < 0.7 else rng.uniform(0.05, 1.0))


def run_with_kill(args: list[str], cwd: Path, kill_after: float | None) -> tuple[int | None, str]:
    """(exit code, None when killed; stderr)."""
    proc = launch(args, cwd)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return None, ""
    _, err = proc.communicate()
    return proc.returncode, err


def same_adapter(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    if not (a / "adapter_model.safetensors").is_file():
        return False  # finished without its adapter: a failure too
    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def run_snapshot(directory: Path) -> dict[str, bytes]:
    """A run's own files (not Hydra's logs and .hydra of the command that ran last, not the lock file)."""
    sys.path.insert(0, str(REPO))
    from telechat_lab.training.rundir import run_files

    files = {}
    for name in run_files(directory):
        top = directory / name
        for path in [top, *sorted(top.rglob("*"))] if top.is_dir() else [top]:
            if path.is_file():
                files[str(path.relative_to(directory))] = path.read_bytes()
    return files


def wait_for_set_aside(proc: subprocess.Popen, directory: Path) -> float:
    """The moment the overwrite=true run in `directory` has set the earlier run aside (or ended)."""
    from telechat_lab.training.rundir import REPLACED, REPLACING

    while proc.poll() is None and not any((directory / name).exists() for name in (REPLACING, REPLACED)):
        time.sleep(0.01)
    return time.perf_counter()


def kill_at(proc: subprocess.Popen, delay: float) -> tuple[int | None, str]:
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None, ""
    _, err = proc.communicate()
    return proc.returncode, err


def overwrite_faults(args, rng: random.Random, work: Path, common: list[str]) -> dict:
    sys.path.insert(0, str(REPO))
    from telechat_lab.training.rundir import has_checkpoint, interrupted_overwrite, recover_interrupted_overwrite

    old = work / "old-run"
    shutil.rmtree(old, ignore_errors=True)
    run_to_end([*common, f"output_dir={old}"], work)
    old_files = run_snapshot(old)
    again = [*common, "seed=1", "overwrite=true"]
    shutil.rmtree(work / "timing", ignore_errors=True)
    shutil.copytree(old, work / "timing", symlinks=True)
    start, proc = time.perf_counter(), launch([*again, f"output_dir={work / 'timing'}"], work)
    aside = wait_for_set_aside(proc, work / "timing") - start  # how long it starts, and then trains
    proc.communicate()
    duration = time.perf_counter() - start
    print(f"an overwrite=true run: {duration:.1f} s, the earlier run set aside after {aside:.1f} s", flush=True)
    figures = {"tries": args.tries, "old_intact": 0, "new_resumable": 0, "broken": 0, "next_failed": 0, "survived": 0}
    for n in range(args.tries):
        out = work / f"try-{n}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(old, out, symlinks=True)
        # mostly after the earlier run was set aside (the new run starts, trains, deletes it), sometimes before
        before = rng.random() < 0.25
        delay = rng.uniform(0.2, 1.0) * aside if before else rng.uniform(0.0, 1.1) * (duration - aside)
        proc, start = launch([*again, f"output_dir={out}"], work), time.perf_counter()
        if not before:
            wait_for_set_aside(proc, out)
        code, err = kill_at(proc, delay)
        kill_after = time.perf_counter() - start
        how = "killed" if code is None else "it had ended"
        if code not in (None, 0):
            print(f"try {n}: the overwrite=true run failed ({code}):\n{err[-2000:]}", flush=True)
            figures["broken"] += 1
            continue
        probe = work / "probe"  # what the next command finds, once it has done what it does first (on a copy:
        shutil.rmtree(probe, ignore_errors=True)  # the next command itself recovers `out`)
        shutil.copytree(out, probe, symlinks=True)
        recover_interrupted_overwrite(probe)
        intact = run_snapshot(probe) == old_files
        resumable = not intact and not interrupted_overwrite(probe) and has_checkpoint(probe)
        state = "old run intact" if intact else "new run resumable" if resumable else "BROKEN"
        figures["old_intact" if intact else "new_resumable" if resumable else "broken"] += int(True)
        if not (intact or resumable):
            print(f"try {n}: killed after {kill_after:.1f} s: {state}: {sorted(run_snapshot(probe))}", flush=True)
            continue
        nxt = [*again, f"output_dir={out}"] if intact else [f"output_dir={out}", "resume=true"]
        code, err = run_with_kill(nxt, work, None)
        ok = code == 0 and (out / "final_metrics.json").is_file() and not interrupted_overwrite(out)
        if ok and intact:  # the earlier run was what it found: the new run replaced it
            ok = (out / "config.yaml").read_bytes() != old_files["config.yaml"]
        figures["next_failed" if not ok else "survived"] += 1
        print(
            f"try {n}: killed after {kill_after:.1f} s ({how}): {state}; "
            f"the next command ({nxt[-1]}) {'succeeded' if ok else f'FAILED ({code}): ' + err[-1500:]}",
            flush=True,
        )
        if ok:
            shutil.rmtree(out, ignore_errors=True)
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--target", choices=("checkpoints", "overwrite"), default="checkpoints")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="fault-injection-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    common = [*RUN, f"trainer.max_steps={args.steps}", f"data.cache_dir={work / 'cache'}"]
    if args.target == "overwrite":
        return report(overwrite_faults(args, rng, work, common), args, argv)

    baseline = work / "baseline"
    shutil.rmtree(baseline, ignore_errors=True)
    duration = run_to_end([*common, f"output_dir={baseline}"], work)
    print(f"baseline: {args.steps} steps in {duration:.1f} s", flush=True)

    figures = {"tries": args.tries, "survived": 0, "mismatches": 0, "kills": 0, "restarts": 0, "failed": 0}
    for n in range(args.tries):
        out = work / f"try-{n}"
        shutil.rmtree(out, ignore_errors=True)
        kill_after = kill_time(rng, duration)
        code, err = run_with_kill([*common, f"output_dir={out}"], work, kill_after)
        kills = int(code is None)
        for _ in range(20):  # continue until a continuation finishes (each may be killed again)
            if code == 0:
                break
            if code not in (None, 2) or (
                code == 2 and "no readable checkpoint" not in err and "holds no run to continue" not in err
            ):
                print(f"try {n}: unexpected exit {code}:\n{err[-2000:]}", flush=True)
                break
            started = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*.ckpt"))
            more = ["resume=true"] if started else [*common, "overwrite=true"]
            figures["restarts"] += 0 if started else 1
            again = kill_time(rng, duration) if rng.random() < 0.5 else None
            code, err = run_with_kill([*(common if not started else []), f"output_dir={out}", *more], work, again)
            kills += int(code is None)
        figures["kills"] += kills
        if code != 0:
            figures["failed"] += 1
            continue
        ok = same_adapter(out, baseline)
        figures["survived" if ok else "mismatches"] += 1
        print(f"try {n}: {kills} kill(s), {'same adapter' if ok else 'DIFFERENT adapter'}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return report(figures, args, argv)


def report(figures: dict, args, argv: list[str] | None) -> dict:
    figures["command"] = "python scripts/fault_injection.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["survived"] == result["tries"] else 1)

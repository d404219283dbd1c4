"""Kill batch chat at random moments (SIGKILL or SIGTERM), again and again, and check that rerunning the same
command always ends with the output an uninterrupted run writes.

    python scripts/fault_injection_chat.py --tries 10 [--prompts 12] [--max-new-tokens 24] [--seed 0]
        [--work DIR] [--json FILE]

A baseline answers `--prompts` prompts with the tiny model (greedy decoding, so every run answers alike). Each
try starts the same command with an output of its own and stops it at a random moment (mostly a moment into a
random answer, sometimes while it starts and loads the model): with SIGKILL (nothing can be saved) or SIGTERM
(chat stops after the answer it is writing, exit 143). It is then rerun, each rerun perhaps stopped again, until
one ends with 0; its output is compared with the baseline's, byte for byte. Figures: tries, survived (the baseline's
output), mismatches, failed (an unexpected exit code), sigkills, sigterms, reruns, resumed (reruns that found
answers to continue after), half_lines (reruns that found a half-written last line).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_injection import REPO  # noqa: E402

STOPPED = {143, -signal.SIGTERM}  # SIGTERM in the batch loop, or before it (while the model loads)


class Stop(NamedTuple):
    """When to stop a run: `after` seconds after its `answers`-th answer (0: after it starts)."""

    answers: int
    after: float


def stop_time(rng: random.Random, prompts: int, starting: float, answer: float) -> Stop:
    """A random moment: mostly while the run answers (after a random number of answers, a moment into the next
    one: `answer` is the baseline's seconds per answer), sometimes while it starts and loads the model
    (`starting`: the baseline's seconds before its first answer)."""
    if rng.random() < 0.7:
        return Stop(rng.randint(1, prompts - 1), rng.uniform(0.0, answer))
    return Stop(0, rng.uniform(0.05, 1.0) * starting)


def chat(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "chat.py"), *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )


def run_stopped(args: list[str], cwd: Path, stop: Stop | None, signum: int) -> tuple[int, str, float, float]:
    """(exit code, negative for a signal; stderr; seconds to its first answer; seconds per answer after it) of
    one run, sent `signum` at `stop`."""
    start = time.perf_counter()
    proc = chat(args, cwd)
    first, answered, err = None, 0, ""
    for line in proc.stderr:  # until the stop's answer, or the end
        err += line
        if line.startswith("answered"):
            first, answered = first or time.perf_counter(), answered + 1
        if stop is not None and answered >= stop.answers:
            break
    if stop is not None:
        try:
            proc.wait(timeout=stop.after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signum)
    err += proc.communicate()[1]
    end = time.perf_counter()
    first = first or end
    return proc.returncode, err, first - start, (end - first) / max(1, answered - 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="fault-injection-chat-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TELECHAT_LAB_CACHE"] = str(work / "cache")  # the tiny model: not in the user's cache

    from telechat_lab.console import quiet_libraries
    from telechat_lab.tiny import write_tiny_checkpoint

    quiet_libraries()

    model = write_tiny_checkpoint(work / "model", hidden_size=64)
    prompts = work / "prompts.txt"
    prompts.write_text("".join(f"question {n}: what comes after {n}?\n" for n in range(1, args.prompts + 1)))
    common = [f"model.path={model}", f"input={prompts}", "device=cpu", "generation.do_sample=false"]
    common.append(f"generation.max_new_tokens={args.max_new_tokens}")

    baseline = work / "baseline.jsonl"
    baseline.unlink(missing_ok=True)
    code, err, starting, answer = run_stopped([*common, f"output={baseline}"], work, None, signal.SIGKILL)
    if code:
        raise SystemExit(f"the baseline failed:\n{err[-3000:]}")
    print(f"baseline: first answer after {starting:.1f} s, then {answer:.2f} s per answer", flush=True)

    figures = {"tries": args.tries, "survived": 0, "mismatches": 0, "failed": 0}
    figures.update(sigkills=0, sigterms=0, reruns=0, resumed=0, half_lines=0)
    for n in range(args.tries):
        out = work / f"try-{n}.jsonl"
        out.unlink(missing_ok=True)
        stop, code, stops = stop_time(rng, args.prompts, starting, answer), None, []
        for _ in range(20):  # rerun until a run ends by itself (each may be stopped again)
            signum = rng.choice([signal.SIGKILL, signal.SIGTERM])
            code, err, *_ = run_stopped([*common, f"output={out}"], work, stop, signum)
            if code == 0:
                break
            if code not in STOPPED and code != -signal.SIGKILL:
                print(f"try {n}: unexpected exit {code}:\n{err[-2000:]}", flush=True)
                break
            stops.append(signal.Signals(-code if code < 0 else code - 128).name)
            figures["reruns"] += 1
            kept = out.read_bytes() if out.exists() else b""
            figures["resumed"] += kept.count(b"\n") > 0  # the rerun continues after these answers
            figures["half_lines"] += bool(kept) and not kept.endswith(b"\n")  # cut while written: dropped
            stop = stop_time(rng, args.prompts, starting, answer) if rng.random() < 0.5 else None
        figures["sigkills"] += stops.count("SIGKILL")
        figures["sigterms"] += stops.count("SIGTERM")
        if code != 0:
            figures["failed"] += 1
            continue
        same = out.read_bytes() == baseline.read_bytes()
        figures["survived" if same else "mismatches"] += 1
        print(f"try {n}: stopped by {stops or 'nothing'}, {'same output' if same else 'DIFFERENT output'}", flush=True)
        out.unlink()
    command = " ".join(argv if argv is not None else sys.argv[1:])
    figures["command"] = f"python scripts/fault_injection_chat.py {command}".strip()
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["survived"] == result["tries"] else 1)

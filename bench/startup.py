#!/usr/bin/env python
"""Start-up time of what a Tab, a --help, `--cfg job`, `-sc install=bash` (Hydra's shell-completion script) and a
config error's report run, against `python -c "import torch"` (what a training run must import anyway) and
`python -c "import hydra"` (the floor: every command starts Hydra), each timed as a new process, best of --repeat
runs (the least disturbed by other work on the machine), with the CPU time of that run; and the time from
`python train.py` (the demo: a tiny random TeleChat2 on the bundled data, CPU) to the end of its first training
step, cold (a new data cache) and warm (best of the later runs). Prints a table and writes
bench/results/startup.json (the command, versions, every figure). Whether these import torch is checked by
tests/test_command_line.py, not timed there.

    python bench/startup.py [--repeat 5]
    python bench/startup.py --root /tmp/old-checkout --out /tmp/before.json     # another checkout's commands
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
COMPLETE = "import sys; sys.argv[0] = 'telechat-lab'; from telechat_lab.cli import main; main()"
REFERENCE = 'python -c "import torch"'


def cases(root: Path) -> dict:
    """name -> (arguments after python, COMP_LINE or None, the exit status expected)."""
    train, merge, chat = (str(root / f"{c}.py") for c in ("train", "merge", "chat"))
    return {
        REFERENCE: (["-c", "import torch"], None, 0),
        'python -c "import hydra"': (["-c", "import hydra"], None, 0),
        "python train.py --help": ([train, "--help"], None, 0),
        "python train.py --cfg job": ([train, "--cfg", "job"], None, 0),
        "python train.py -sc install=bash": ([train, "-sc", "install=bash"], None, 0),
        "python train.py optim.lr=fast (a config error)": ([train, "optim.lr=fast"], None, 2),
        "python merge.py --help": ([merge, "--help"], None, 0),
        "python chat.py --help": ([chat, "--help"], None, 0),
        "python train.py <Tab>": ([train, "-sc", "query=bash"], "python train.py ", 0),
        "python train.py adapter=<Tab>": ([train, "-sc", "query=bash"], "python train.py adapter=", 0),
        "python merge.py <Tab>": ([merge, "-sc", "query=bash"], "python merge.py ", 0),
        "telechat-lab merge <Tab>": (["-c", COMPLETE, "-sc", "query=bash"], "telechat-lab merge ", 0),
    }


def timed(args: list[str], comp_line: str | None, status: int, root: Path, env: dict | None = None):
    """(wall seconds, CPU seconds) of one new process, which must exit with `status`."""
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{BENCH}", **(env or {})}
    if comp_line is not None:
        env["COMP_LINE"] = comp_line
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != status:
        raise SystemExit(f"{' '.join(args)}: exit status {proc.returncode}, not {status}\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def to_first_step(root: Path, repeat: int) -> dict:
    """Seconds from starting `python train.py` (the demo, one step) to the end of its first step: the first run
    with a new data cache (cold), the best of the others (warm)."""
    import tempfile

    from train_first_step import to_first_step as run

    seconds = []
    with tempfile.TemporaryDirectory() as work:
        for i in range(repeat):
            args = ["trainer.max_steps=1", f"output_dir={work}/run{i}", f"data.cache_dir={work}/cache"]
            seconds.append(run(root, args, cwd=root, log=Path(work) / f"run{i}.log")["first_step_s"])
    return {"cold_s": round(seconds[0], 3), "warm_s": round(min(seconds[1:] or seconds), 3), "runs": len(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--root", type=Path, default=BENCH.parent, help="the checkout whose commands are timed")
    parser.add_argument("--first-step-runs", type=int, default=3, help="runs of `python train.py` to its first step")
    parser.add_argument("--out", default=str(BENCH / "results" / "startup.json"))
    args = parser.parse_args()
    root = args.root.resolve()
    figures = {}
    for name, (argv, comp_line, status) in cases(root).items():
        runs = [timed(argv, comp_line, status, root) for _ in range(args.repeat)]
        wall, cpu = min(runs)
        figures[name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}
    torch_, hydra_ = figures[REFERENCE], figures['python -c "import hydra"']
    print("| command | wall s | CPU s | wall vs import torch | CPU vs import hydra |\n|---|---|---|---|---|")
    for name, fig in figures.items():
        fig["wall_vs_import_torch"] = round(fig["wall_s"] / torch_["wall_s"], 2)
        fig["cpu_vs_import_hydra"] = round(fig["cpu_s"] / hydra_["cpu_s"], 2)
        print(
            f"| `{name}` | {fig['wall_s']:.2f} | {fig['cpu_s']:.2f} | {fig['wall_vs_import_torch']:.2f}x "
            f"| {fig['cpu_vs_import_hydra']:.1f}x |"
        )
    first = to_first_step(root, args.first_step_runs) if args.first_step_runs else None
    if first:
        print(
            f"\n`python train.py` (the demo) to the end of its first step: {first['cold_s']:.1f} s with a new data "
            f"cache, {first['warm_s']:.1f} s warm (best of {first['runs'] - 1})"
        )
    import hydra

    record = {
        "command": " ".join(["python", "bench/startup.py", *sys.argv[1:]]),
        "python": platform.python_version(),
        "hydra": hydra.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "root": str(root),
        "figures": figures,
        "to_first_step": first,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Start-up time of what a Tab or a --help runs, against `python -c "import hydra"` (the floor: every command
starts Hydra): each command's --help and shell completion, timed as new processes, best of --repeat runs (the
least disturbed by other work on the machine), with the CPU time of that run. Prints a table and writes
bench/results/startup.json (the command, versions, every figure). Whether these import torch is checked by
tests/test_command_line.py, not timed there.

    python bench/startup.py [--repeat 5]
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

ROOT = Path(__file__).resolve().parents[1]
COMPLETE = "import sys; sys.argv[0] = 'telechat-lab'; from telechat_lab.cli import main; main()"
CASES = {  # name -> (arguments after python, COMP_LINE or None)
    'python -c "import hydra"': (["-c", "import hydra"], None),
    "python train.py --help": ([str(ROOT / "train.py"), "--help"], None),
    "python merge.py --help": ([str(ROOT / "merge.py"), "--help"], None),
    "python chat.py --help": ([str(ROOT / "chat.py"), "--help"], None),
    "python train.py <Tab>": ([str(ROOT / "train.py"), "-sc", "query=bash"], "python train.py "),
    "python train.py adapter=<Tab>": ([str(ROOT / "train.py"), "-sc", "query=bash"], "python train.py adapter="),
    "python merge.py <Tab>": ([str(ROOT / "merge.py"), "-sc", "query=bash"], "python merge.py "),
    "telechat-lab merge <Tab>": (["-c", COMPLETE, "-sc", "query=bash"], "telechat-lab merge "),
}


def timed(args: list[str], comp_line: str | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one new process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if comp_line is not None:
        env["COMP_LINE"] = comp_line
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, check=True, timeout=120)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "startup.json"))
    args = parser.parse_args()
    figures = {}
    for name, (argv, comp_line) in CASES.items():
        runs = [timed(argv, comp_line) for _ in range(args.repeat)]
        wall, cpu = min(runs)
        figures[name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}
    floor = figures['python -c "import hydra"']
    print("| command | wall s | CPU s | CPU vs import hydra |\n|---|---|---|---|")
    for name, fig in figures.items():
        fig["cpu_vs_import_hydra"] = round(fig["cpu_s"] / floor["cpu_s"], 2)
        print(f"| `{name}` | {fig['wall_s']:.2f} | {fig['cpu_s']:.2f} | {fig['cpu_vs_import_hydra']:.1f}x |")
    import hydra

    record = {
        "command": " ".join(["python", "bench/startup.py", *sys.argv[1:]]),
        "python": platform.python_version(),
        "hydra": hydra.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "figures": figures,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()

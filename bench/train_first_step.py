"""`python train.py ...` run to the end of its first training step, as a new process: the wall seconds from just
before the process is started to the end of that step (first_step.py's FirstStep callback writes the time), and the
process's peak RSS. Used by startup.py and data_scale.py; imports neither torch nor lightning.

The peak RSS is the ru_maxrss `os.wait4` returns for that one process (not the RUSAGE_CHILDREN maximum over every
child this process ever had): the largest of train.py's own peak, the peak of any single process it started and
waited for (DataLoader workers, with data.dataloader_num_workers > 0, are processes of their own: their memory is
not added to it) and this launcher's RSS when it started the process (Linux carries the forking process's
memory over to the exec'd one; these scripts import no torch, tens of MB).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CALLBACK = "+callbacks.first_step._target_=first_step.FirstStep"  # first_step.py, on PYTHONPATH from BENCH


def to_first_step(root: Path, overrides: list[str], cwd: Path, log: Path, timeout: float = 600) -> dict:
    """`python <root>/train.py <overrides>` with the FirstStep callback, its stdout and stderr written to `log`:
    {"first_step_s", "wall_s" (to the process's end), "peak_rss_gb"}. Exits with the log's end when the run fails
    or never ends a first step."""
    marker = log.with_name(log.name + ".first_step")
    marker.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": f"{root}{os.pathsep}{BENCH}",
        "STARTUP_FIRST_STEP": str(marker),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, str(root / "train.py"), *overrides, CALLBACK]
    with open(log, "w") as out:
        start = time.time()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        timed_out = threading.Event()
        killer = threading.Timer(timeout, lambda: (timed_out.set(), proc.kill()))
        killer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - start
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if proc.returncode or not marker.is_file():
        why = f"stopped after {timeout:.0f} s" if timed_out.is_set() else f"exit status {proc.returncode}"
        sys.exit(f"{' '.join(command)}: {why}, first step ended: {marker.is_file()}\n{log.read_text()[-4000:]}")
    first = float(marker.read_text()) - start
    marker.unlink()
    return {
        "first_step_s": round(first, 3),
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),
    }

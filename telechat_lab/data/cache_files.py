"""Writing the data cache (encoded datasets, remembered file hashes), which is only an optimisation: a write that
fails (a full disk, a read-only or missing directory, a cache_dir that is a file) is a warning and the run goes
on without it. Each write goes through a temporary file named by host and process, renamed into place when
complete; the temporaries of processes that died before renaming theirs are removed by the next run."""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
TEMP_MARK = ".partial-"  # <name>.partial-<host>-<pid>.<suffix>
STALE_AFTER_S = 24 * 3600  # another host's temporary this old is a dead process's (its pid cannot be checked here)
_WARNED: set[str] = set()  # the files whose failed write was reported (once a process: the data are built twice)
LEGACY_TEMP = re.compile(r".+\.(\d+)\.tmp\.npz")  # <name>.<pid>.tmp.npz, what earlier versions wrote (no host)


def temporary_name(path: Path) -> Path:
    return path.with_name(f"{path.stem}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}{path.suffix}")


def write_cache_file(path: Path, data: bytes | Callable[[Path], None]) -> bool:
    """Write `data` (bytes, or a function writing the file it is given) to `path` atomically; False, with a
    warning naming the file, when that fails (nothing of the attempt is left)."""
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
        return True
    except OSError as err:
        if str(path) not in _WARNED:
            _WARNED.add(str(path))
            log.warning("could not write the data cache %s (%s); going on without it", path, err.strerror or err)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False


def remove_dead_temporaries(directory: Path) -> None:
    """Remove the temporaries in `directory` of writers that are gone: a process of this host that no longer
    runs, or one of another host older than STALE_AFTER_S."""
    try:
        candidates = [
            p
            for p in directory.iterdir()
            if (TEMP_MARK in p.name[1:] or LEGACY_TEMP.fullmatch(p.name)) and p.is_file() and not p.is_symlink()
        ]
    except OSError:  # no cache yet, or none that can be listed
        return
    host = socket.gethostname()
    for tmp in candidates:
        legacy = LEGACY_TEMP.fullmatch(tmp.name)
        if legacy:
            owner_host, pid = host, legacy.group(1)
        else:
            owner_host, _, pid = tmp.name.split(TEMP_MARK, 1)[1].removesuffix(tmp.suffix).rpartition("-")
        try:
            if owner_host == host and pid.isdigit():
                if _alive(int(pid)):
                    continue
            elif time.time() - tmp.stat().st_mtime < STALE_AFTER_S:
                continue
            tmp.unlink()
            log.info("removed %s, left by a write that did not finish", tmp)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

"""Writing the data cache (encoded datasets, remembered file hashes), which is only an optimisation: a write that
fails (a full disk, a read-only or missing directory, a cache_dir that is a file) is a warning and the run goes
on without it. Each write goes through a temporary file (or directory) named by host and process, renamed into
place when complete; the temporaries of processes that died before renaming theirs are removed by the next run.

An encoded dataset is a directory of arrays (`ArrayWriter`, `read_arrays`): one raw little-endian file per array
(`tokens.bin`, `labels.bin`: every sequence's ids and labels end to end; `offsets.bin`; the small per-sequence and
per-example arrays) and `meta.json` (each array's dtype and shape, the format version, the encoding's counts).
Why numpy memory maps of raw files rather than Arrow through HF `datasets`: the tokens and labels are opened with
`np.memmap`, so a warm start reads only the small arrays (offsets, sources, per-sequence counts) and no token is
copied into the process; the pages read while training live in the kernel's page cache, shared by every DDP rank
and dataloader worker on the host instead of one copy each; encoding appends each shard's arrays to the files, so
nothing holds the whole dataset; the layout is the one EncodedDataset already has (one flat token array plus
offsets), so nothing is converted on load; and it needs no dependency beyond numpy. Arrow would give the same
mapping with a record-per-row layout the training path does not use. A directory is written whole under a
temporary name (each file fsynced, then the directory renamed: the rename is atomic), so a reader sees a complete
entry or none; one whose files are shorter or longer than its meta.json says is refused (and rebuilt). Reading every
token to check an entry (preprocess._check_cached) costs seconds per GB, so an entry remembers its files' inode,
size, mtime and ctime as they were when written, or when last read whole and found right (`verified.json`); a load
whose files are unchanged by those (with data.trust_file_stat, as for the source files' hashes) checks the small
arrays only."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
TEMP_MARK = ".partial-"  # <name>.partial-<host>-<pid>.<suffix>
STALE_AFTER_S = 24 * 3600  # another host's temporary this old is a dead process's (its pid cannot be checked here)
_WARNED: set[str] = set()  # the files whose failed write was reported (once a process: the data are built twice)
LEGACY_TEMP = re.compile(r".+\.(\d+)\.tmp\.npz")  # <name>.<pid>.tmp.npz, what earlier versions wrote (no host)


def temporary_name(path: Path) -> Path:
    return path.with_name(f"{path.stem}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}{path.suffix}")


def write_cache_file(path: Path, data: bytes | Callable[[Path], None], warn: bool = True) -> bool:
    """Write `data` (bytes, or a function writing the file it is given) to `path` atomically; False, with a
    warning naming the file (unless not `warn`), when that fails (nothing of the attempt is left)."""
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
        if warn:
            warn_unwritable(path, err)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False


def warn_unwritable(path: Path, err: OSError) -> None:
    """The warning for a cache file that could not be written, once a process for each file."""
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        log.warning("could not write the data cache %s (%s); going on without it", path, err.strerror or err)


def remove_dead_temporaries(directory: Path) -> None:
    """Remove the temporaries in `directory` of writers that are gone: a process of this host that no longer
    runs, or one of another host older than STALE_AFTER_S."""
    try:
        candidates = [
            p
            for p in directory.iterdir()
            if (TEMP_MARK in p.name[1:] or LEGACY_TEMP.fullmatch(p.name))
            and (p.is_file() or p.is_dir())
            and not p.is_symlink()
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
            pid = pid.split(".", 1)[0]  # a directory's own suffix
        try:
            if owner_host == host and pid.isdigit():
                if _alive(int(pid)):
                    continue
            elif time.time() - tmp.stat().st_mtime < STALE_AFTER_S:
                continue
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
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


# ------------------------------------------------------------------------------------------ arrays on disk

META = "meta.json"
FORMAT = 2  # the version of the layout (1: one .npz file, read whole)
VERIFIED = "verified.json"  # an entry's files (inode, size, mtime, ctime) as they were when last known whole


def _file_stats(path: Path) -> dict[str, list[int]]:
    stats = {}
    for file in sorted(path.iterdir()):
        if file.name != VERIFIED and TEMP_MARK not in file.name:
            st = file.stat()
            stats[file.name] = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return stats


def mark_verified(path: Path) -> None:
    """Remember the files of the entry at `path` as they are now, known whole (just written, or just read whole and
    checked); silently nothing when that cannot be written (the next load checks every token again)."""
    try:
        stats = _file_stats(path)
    except OSError:
        return
    write_cache_file(path / VERIFIED, json.dumps(stats).encode("utf-8"), warn=False)


def is_verified(path: Path) -> bool:
    """Whether every file of the entry at `path` is the one `mark_verified` saw: same inode, size, mtime and ctime
    (a file written since, even with its size and mtime put back, has another ctime)."""
    try:
        return json.loads((path / VERIFIED).read_text(encoding="utf-8")) == _file_stats(path)
    except (OSError, ValueError, RecursionError):
        return False


class ArrayWriter:
    """A cache directory written array by array: `append` adds rows to an array's file (a shard at a time),
    `commit` fsyncs them, writes meta.json and renames the directory into place. OSError from any of them is the
    caller's (preprocess.py falls back to memory); `abort` removes the temporary."""

    def __init__(self, path: Path, dtypes: dict[str, str], tails: dict[str, tuple] | None = None):
        self.path, self.tmp = path, temporary_name(path)
        self.dtypes = {name: np.dtype(dtype).newbyteorder("<") for name, dtype in dtypes.items()}
        self.tails = {name: tuple((tails or {}).get(name, ())) for name in dtypes}
        self.rows = dict.fromkeys(dtypes, 0)  # rows written
        self.files: dict = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        try:
            for name in dtypes:
                self.files[name] = open(self.tmp / f"{name}.bin", "wb")
        except OSError:
            self.abort()
            raise

    def append(self, **arrays: np.ndarray) -> None:
        for name, values in arrays.items():
            values = np.ascontiguousarray(values, dtype=self.dtypes[name])
            if values.shape[1:] != self.tails[name]:
                raise ValueError(f"{name}: rows of shape {values.shape[1:]}, not {self.tails[name]}")
            if values.size:
                self.files[name].write(values.reshape(-1).view(np.uint8).data)
        for name, values in arrays.items():
            self.rows[name] += len(values)

    def read_back(self) -> dict[str, np.ndarray]:
        """What was appended so far (completed appends), read into memory."""
        for f in self.files.values():
            if not f.closed:
                f.flush()
        out = {}
        for name, dtype in self.dtypes.items():
            count = self.rows[name] * int(np.prod(self.tails[name], dtype=np.int64))
            out[name] = np.fromfile(self.tmp / f"{name}.bin", dtype=dtype, count=count).reshape(
                (self.rows[name], *self.tails[name])
            )
        return out

    def commit(self, meta: dict) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        arrays = {name: [self.dtypes[name].str, [self.rows[name], *self.tails[name]]] for name in self.dtypes}
        with open(self.tmp / META, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "arrays": arrays, **meta}, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.tmp)
        if self.path.exists() or self.path.is_symlink():  # a stale entry being rebuilt: moved aside, then removed
            aside = self.path.with_name(f"{self.path.name}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}.old")
            os.replace(self.path, aside)
            shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink(missing_ok=True)
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        mark_verified(self.path)

    def abort(self) -> None:
        for f in self.files.values():
            try:
                f.close()
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a filesystem whose directories cannot be opened: the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_arrays(path: Path, mapped: tuple[str, ...] = ("tokens", "labels")) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) of a cache directory: the `mapped` arrays memory-mapped read-only (nothing read until
    used), the others read into memory. ValueError saying what is wrong when meta.json is unreadable or an
    array's file is not the size it says (a truncated or altered entry)."""
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ValueError(f"its {META} is unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("arrays"), dict):
        raise ValueError(f"its {META} is not of format {FORMAT}")
    arrays = {}
    for name, spec in meta["arrays"].items():
        try:
            dtype, shape = np.dtype(spec[0]), tuple(int(n) for n in spec[1])
        except (TypeError, ValueError, IndexError):
            raise ValueError(f"its {META} gives array {name!r} no dtype and shape") from None
        file = path / f"{name}.bin"
        want = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        try:
            size = file.stat().st_size
        except OSError as err:
            raise ValueError(f"its {file.name} is unreadable ({err.strerror or err})") from None
        if size != want:
            raise ValueError(f"its {file.name} holds {size} bytes, not the {want} of {shape} {dtype} (truncated?)")
        if not want:
            arrays[name] = np.zeros(shape, dtype=dtype)
        elif name in mapped:
            arrays[name] = np.memmap(file, dtype=dtype, mode="r", shape=shape)
        else:
            arrays[name] = np.fromfile(file, dtype=dtype).reshape(shape)
    return arrays, meta

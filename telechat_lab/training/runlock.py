"""Who owns a run directory (or a sweep directory): one live process at a time, and what that process made.

`claim(directory)` takes an OS lock, `fcntl.flock` on `directory/.lock`, before the command writes anything and
holds it until the process ends (or `release`); the lock file records the holder (pid, host, command, time) so
that a second command is refused with who holds it. A lock whose process died is released by the OS, so the next
claim simply takes it over.

The claim also records what the directory held when it was taken (under the lock, so no other telechat-lab
command changes it meanwhile): `undo` removes only what appeared since, i.e. what this process created, and a
directory (and parents) it made.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from telechat_lab.errors import OutputDirError
from telechat_lab.files import remove_entry

LOCK_FILE = ".lock"
LONGEST_SUFFIX = len(".tmp-") + len("-old-4194304") + 8  # files.staged_dir's names beside the directory
_held: dict[Path, Claim] = {}


@dataclass(eq=False)
class Claim:
    """A directory this process holds the lock of."""

    directory: Path
    fd: int
    made: list[Path]  # directories this claim created, innermost first
    found: set[str] = field(default_factory=set)  # its entries when the lock was taken
    previous: bytes = b""  # the lock file's record of its earlier holder

    def undo(self) -> None:
        """Remove what this process created in the directory (all of it, when it made the directory)."""
        if self.made:
            remove_entry(self.directory) if self.directory.exists() else None
            for parent in self.made[1:]:
                try:
                    parent.rmdir()  # only while empty: another command may have written beside it meanwhile
                except OSError:
                    break
            return
        for item in self.directory.iterdir() if self.directory.is_dir() else []:
            if item.name not in self.found and item.name != LOCK_FILE:
                remove_entry(item)
        if LOCK_FILE not in self.found:
            (self.directory / LOCK_FILE).unlink(missing_ok=True)
        else:  # as it was: a refused command changes nothing
            self.restore_record()

    def restore_record(self) -> None:
        """The lock file's record of its earlier holder back (a command that changed nothing leaves no trace)."""
        if LOCK_FILE in self.found:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, self.previous, 0)

    def release(self) -> None:
        _held.pop(self.directory, None)
        os.close(self.fd)  # closing the descriptor releases the flock


def held() -> list[Claim]:
    """The claims this process holds."""
    return list(_held.values())


def claim(directory: Path, key: str = "output_dir") -> Claim:
    """Lock `directory` (made if missing) for this process; OutputDirError naming `key`, the path and the holder
    when another live process holds it, or when it cannot be a directory this command writes. Taking a claim this
    process already holds returns it."""
    directory = Path(directory)
    if directory in _held:
        return _held[directory]
    _check_location(directory, key)
    made = _make_dir(directory, key)
    try:
        fd, created = _lock(directory, key)
    except BaseException:
        for path in made:  # only while empty: another command's lock file may be in it by now
            try:
                path.rmdir()
            except OSError:
                break
        raise
    found = {p.name for p in directory.iterdir()} - ({LOCK_FILE} if created else set())
    _held[directory] = Claim(directory, fd, made, found, previous=os.pread(fd, 1 << 16, 0))
    _record_holder(fd)
    return _held[directory]


def check_free(directory: Path, key: str = "output_dir") -> None:
    """OutputDirError naming the holder when another live process holds `directory`; takes nothing, writes nothing.
    A directory this process holds is free to it (an earlier command of the same process, the Python API)."""
    if Path(directory) in _held:
        return
    try:
        fd = os.open(Path(directory) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return  # no lock file (or none readable): nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(directory, key, fd) from None
    finally:
        os.close(fd)


def _in_use(directory: Path, key: str, fd: int) -> OutputDirError:
    return OutputDirError(
        f"{key}={directory} is in use by another command ({_describe(fd)}): wait until it ends, or choose another "
        f"{key}; nothing was changed"
    )


def _check_location(directory: Path, key: str) -> None:
    if directory.exists() and not directory.is_dir():
        raise OutputDirError(f"{key}={directory} is a file, not a directory: choose another {key}; nothing was written")
    limit = _name_max(directory)
    if len(directory.name.encode()) + LONGEST_SUFFIX > limit:
        raise OutputDirError(
            f"{key}={directory}: the name is too long ({len(directory.name.encode())} bytes; at most "
            f"{limit - LONGEST_SUFFIX}, the files written beside it add a suffix); choose a shorter {key}; "
            "nothing was written"
        )
    if directory.is_dir() and not os.access(directory, os.W_OK | os.X_OK):
        raise OutputDirError(f"{key}={directory} is not writable: choose another {key}; nothing was written")


def _name_max(directory: Path) -> int:
    for parent in [directory, *directory.parents]:
        if parent.is_dir():
            try:
                return os.pathconf(parent, "PC_NAME_MAX")
            except (OSError, ValueError):
                return 255
    return 255


def _make_dir(directory: Path, key: str) -> list[Path]:
    """Create `directory` and missing parents; returns those it created, innermost first."""
    missing = [p for p in [directory, *directory.parents] if not p.exists()]
    made = []
    try:
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                if not path.is_dir():
                    raise
                continue  # another command made it meanwhile: not ours
            made.insert(0, path)
    except OSError as err:
        for path in made:  # just made, so still empty
            path.rmdir()
        raise OutputDirError(
            f"{key}={directory} cannot be created ({err.strerror or err}: {err.filename or directory}); "
            f"choose another {key}; nothing was written"
        ) from err
    return made if made and made[0] == directory else []


def _lock(directory: Path, key: str) -> tuple[int, bool]:
    """The locked lock file's descriptor, and whether this call created the file."""
    path = directory / LOCK_FILE
    while True:
        try:
            try:
                fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
            except FileExistsError:
                fd, created = os.open(path, os.O_RDWR), False
        except OSError as err:
            raise OutputDirError(
                f"{key}={directory} is not writable ({err.strerror}): choose another {key}; nothing was written"
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _in_use(directory, key, fd)
            os.close(fd)
            raise error from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, created
        os.close(fd)  # its last holder removed the file meanwhile (an undo): lock the one there now


def _record_holder(fd: int) -> None:
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "since": datetime.now().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)


def _describe(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "a process that is starting"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}: {holder.get('command')}"

"""The errors a user can cause or meet, and how the command-line entry points report them: one message that
names the key, file or line at fault, no traceback, and an exit code per kind."""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn


class UserError(ValueError):
    """Something the user can fix; the message says what and where."""

    exit_code = 2


class ConfigError(UserError):
    """Bad settings. Given a list of problems (one line each, by key: what config validation finds), it carries
    them as `problems` and reads "invalid configuration:" with one line per problem; given one message (a setting
    that a command finds wrong later, such as an output file that exists), it reads that message."""

    HEADER = "invalid configuration:"

    def __init__(self, problems: list[str] | str):
        self.given = problems
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        text = problems if isinstance(problems, str) else "\n  - ".join([self.HEADER, *self.problems])
        super().__init__(text)

    def __reduce__(self):  # each class rebuilt from its own arguments: an encoding worker's error crosses a pipe
        return type(self), (self.given,)


class DataError(UserError):
    """A bad dataset entry or record; the message names the dataset, the file and the line or record."""


class BadRecord(DataError):
    """One record that cannot be trained on; `reason` is its short kind (counted per dataset when
    data.on_bad_record=skip), the message says where and what exactly."""

    def __init__(self, where: str, reason: str, detail: str = ""):
        super().__init__(f"{where}: {reason}{detail}")
        self.where, self.reason, self.detail = where, reason, detail

    def __reduce__(self):
        return type(self), (self.where, self.reason, self.detail)


class CheckpointError(UserError):
    """A model, adapter or checkpoint on disk that is missing, incomplete or corrupt; the message names the file."""


class OutputDirError(UserError):
    """An output directory whose contents a command would destroy; nothing was written."""


class TrainingStopped(Exception):
    """Training stopped before its end: the message says why and what was kept."""

    exit_code = 1


class NonFiniteLoss(TrainingStopped):
    """The loss or the gradient norm became NaN or infinite (nan_policy=stop, or too many skipped steps)."""

    exit_code = 3


class Interrupted(TrainingStopped):
    """SIGINT / SIGTERM / SIGUSR1: the step finished and a resumable checkpoint was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention: SIGINT 130, SIGTERM 143

    def __reduce__(self):
        return type(self), (self.args[0], self.signum)


class FileSystemError(UserError):
    """A file or directory that cannot be read or written (missing, a file where a directory should be, no
    permission, a full disk, a name too long): the message names the path and what to do."""


# what to do, by errno; the rest say only what the system said
_ADVICE = {
    errno.ENOSPC: "free space on that disk, then run the command again",
    errno.EDQUOT: "free space (your disk quota is full), then run the command again",
    errno.EACCES: "choose a location you can write to, or change its permissions",
    errno.EPERM: "choose a location you can write to, or change its permissions",
    errno.EROFS: "the file system is read-only: choose another location",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.ENOTDIR: "a file is where a directory is needed: move it or choose another path",
    errno.EISDIR: "a directory is where a file is needed: choose a file",
    errno.ENOENT: "check the path",
}


def file_system_error(err: OSError) -> FileSystemError:
    """An OSError as one message naming its path(s) and what to do."""
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    what = err.strerror or type(err).__name__
    advice = _ADVICE.get(err.errno or -1)
    return FileSystemError(f"{paths}: {what}" + (f" ({advice})" if advice else "") if paths else f"{what}: {err}")


@contextmanager
def reported(multirun: bool = False) -> Iterator[None]:
    """Run a command: a UserError or TrainingStopped becomes its message on stderr and its exit code. In a sweep
    (`multirun`) the job fails with the message instead, so that the sweeper records it and goes on. An OSError
    that names a file (a full disk, no permission, ...) is a user's error too: its path and what to do. Ctrl+C
    is one line and exit code 130 (a sweep stops with it)."""
    try:
        try:
            yield
        except OSError as err:
            if err.filename is None:
                raise
            raise file_system_error(err) from err
    except (UserError, TrainingStopped) as err:
        print(f"error: {err}" if isinstance(err, UserError) else str(err), file=sys.stderr, flush=True)
        if multirun:
            raise
        sys.exit(err.exit_code)
    except KeyboardInterrupt:  # Ctrl+C where the command has no handler of its own (training and chat have theirs)
        stopped_by_ctrl_c()


def stopped_by_ctrl_c() -> NoReturn:
    """What a Ctrl+C that no handler took ends a command with: one line and the shell's exit code, 130."""
    print("stopped by Ctrl+C (SIGINT)", file=sys.stderr, flush=True)
    sys.exit(130)

"""Writing files so that a crash never leaves half of one, and reading them so that a broken one is named.

Every output of this project (checkpoints, exports, adapters, answers, reports) is written through these: into a
temporary sibling first, then moved into place with an atomic rename, so a reader (or a resumed run) sees the old
version or the new one, never a mix. Readers raise `CheckpointError` naming the file that is missing, incomplete
or corrupt.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from telechat_lab.errors import CheckpointError, ConfigError

TEMP_PREFIX = ".tmp-"  # staged files and directories: never read as results, removed by the next writer


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[Any]:
    """A text file to write `path` through: a temporary file beside it, fsync'ed and renamed over `path` when the
    block ends without an error; on an error `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}-", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a result gets the usual permissions
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_new_output(key: str, path: str | os.PathLike, overwrite: bool) -> None:
    """Before the work starts: an output file `key`=path that would replace the user's file needs overwrite=true
    (its folder is made when it is written)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"{key}={path} is a directory: name a file")
    if target.exists() and not overwrite:
        raise ConfigError(f"{key}={path} exists: add overwrite=true to replace it, or choose another file")


def path_relation(a: Path, b: Path) -> str | None:
    """How resolved path `a` stands to `b`: "is", "lies inside", "contains", or None (neither holds the other)."""
    if a == b:
        return "is"
    if a.is_relative_to(b):
        return "lies inside"
    if b.is_relative_to(a):
        return "contains"
    return None


def check_input_file(key: str, path: str | os.PathLike) -> None:
    target = Path(path).expanduser()
    if not target.is_file():
        raise ConfigError(f"{key}={path}: {'is a directory' if target.is_dir() else 'no such file'}")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (see atomic_open)."""
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def usual_modes(written: Path) -> None:
    """Give a file, or a directory and everything in it, that a library wrote the usual permissions (0666 less the
    umask; executables and directories 0777 less it): some write through private temporary files (results would
    be 0600), some apply the umask they saw first in the process."""
    mask = _umask()
    for path in [written, *written.rglob("*")] if written.is_dir() else [written]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        executable = path.is_dir() or mode & 0o111
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside `final` to write into; on success it replaces `final` whole (an earlier
    `final` is removed only once the new one is complete). On an error nothing of it is left."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        yield staging
        usual_modes(staging)
        if final.exists():
            old = final.with_name(f"{TEMP_PREFIX}{final.name}-old-{os.getpid()}")
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def staged_files(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory inside `target` to write into; on success each file is moved into `target` by an
    atomic rename (each file is whole, old or new). On an error nothing of it is left."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=target))
    try:
        yield staging
        usual_modes(staging)
        for item in staging.iterdir():
            destination = target / item.name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(item, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_entry(path: Path) -> None:
    """A file, a link or a whole directory."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def remove_stale_temporaries(directory: Path) -> None:
    """Leftovers of writes that a crash interrupted (they were never results)."""
    if directory.is_dir():
        for item in directory.glob(f"{TEMP_PREFIX}*"):
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)


def read_json(path: str | os.PathLike, what: str = "") -> Any:
    """The JSON at `path`; CheckpointError naming it when it is missing, empty or not valid JSON."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise CheckpointError(f"{label} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CheckpointError(f"{label} is empty: an interrupted write? (written again by the run that made it)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{label} is not valid JSON (line {err.lineno}: {err.msg}): incomplete or corrupt"
        ) from err


def check_safetensors(path: Path) -> None:
    """CheckpointError naming `path` when it is not a complete safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):  # checks the header and that the data covers the file
            pass
    except Exception as err:
        raise CheckpointError(f"{path} is not a complete safetensors file ({err}): truncated or corrupt") from err


def find_broken_weights(directory: Path) -> None:
    """Name the first weight file of a checkpoint directory that is missing, truncated or corrupt (called when
    loading it failed, to turn a library's anonymous error into one that names the file)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "the shard index").get("weight_map", {})
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise CheckpointError(f"{directory / shard} is missing (named by {index})")
    for file in sorted(directory.glob("*.safetensors")):
        check_safetensors(file)
    config = directory / "config.json"
    if config.is_file():
        read_json(config, "the model config")

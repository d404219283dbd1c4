"""Content hashes of data files: the key of the encoded-data cache (data/preprocess.py) and what a run's data
fingerprint records (a resume compares it).

A file is read whole and hashed (blake2b). With `data.trust_file_stat=true` (the default) a hash is remembered in
the cache directory (`file_hashes.json`) with the file's device, inode, size, modification and change times
(ctime: set by the kernel on every write and on every `touch`/`os.utime`, so a file edited in place and given
back its old mtime is hashed again); a file whose stat is unchanged is not read again. `false` hashes every
file on every run (filesystems whose timestamps are coarse or unreliable, e.g. some network mounts)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path

from telechat_lab.errors import DataError

from .cache_files import write_cache_file

log = logging.getLogger(__name__)
HASHES_FILE = "file_hashes.json"
CHUNK = 1 << 20
ANNOUNCED_BYTES = 1 << 30  # hashing more than this (seconds of reading) is announced on stderr


def _stat_key(path: Path) -> tuple[str, int]:
    """(what the remembered hash of `path` is valid for, its size)."""
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}", st.st_size


def hash_file(path: Path, where: str) -> str:
    """blake2b of the bytes of `path`; a DataError naming it (`where`: the dataset) when it cannot be read."""
    digest = hashlib.blake2b(digest_size=20)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except OSError as err:
        raise DataError(
            f"{where}: cannot read {path} ({err.strerror or err}): check that it is a readable file"
        ) from err
    return digest.hexdigest()


def content_hashes(paths: list[Path], where: str, cache_dir: Path, trust_file_stat: bool) -> dict[str, str]:
    """{path: content hash} of `paths` (the files of one dataset, `where` names it in errors)."""
    remembered = _read_remembered(cache_dir) if trust_file_stat else {}
    hashes, changed, keys = {}, False, {}
    for path in paths:
        name = str(path)
        try:
            keys[name] = _stat_key(path)
        except OSError as err:
            raise DataError(f"{where}: cannot read {path} ({err.strerror or err})") from err
        entry = remembered.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == keys[name][0] and isinstance(entry[1], str):
            hashes[name] = entry[1]
    todo = [path for path in paths if str(path) not in hashes]
    size = sum(keys[str(path)][1] for path in todo)
    if size > ANNOUNCED_BYTES:
        print(f"hashing {where}: {len(todo)} file(s), {size / 1e9:.1f} GB ...", file=sys.stderr, flush=True)
    for path in todo:
        name, key = str(path), keys[str(path)][0]
        hashes[name] = hash_file(path, where)
        if key == _stat_key(path)[0]:  # not remembered while it is being written
            remembered[name], changed = [key, hashes[name]], True
    if trust_file_stat and changed:  # files that are gone are forgotten
        remembered = {name: entry for name, entry in remembered.items() if os.path.exists(name)}
        write_cache_file(cache_dir / HASHES_FILE, json.dumps(remembered, sort_keys=True).encode())
    return {str(path): hashes[str(path)] for path in paths}


def _read_remembered(cache_dir: Path) -> dict:
    path = cache_dir / HASHES_FILE
    try:
        remembered = json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):  # none remembered yet
        return {}
    except (OSError, ValueError, RecursionError) as err:  # only a shortcut: hashed again, and written anew
        log.warning("ignoring unreadable %s (%s): the data files are hashed again", path, err)
        return {}
    return remembered if isinstance(remembered, dict) else {}

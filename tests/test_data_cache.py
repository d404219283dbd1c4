"""The encoded-data cache: keyed by the files' contents, checked when loaded, never fatal when it cannot be written,
and cleaned of dead writers' temporaries; a resumed run's data compared with its checkpoint's."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data import alpaca, build, examples, write_datasets

from telechat_lab.data import content_hash
from telechat_lab.data import preprocess as preprocess_mod
from telechat_lab.data.cache_files import META, TEMP_MARK, read_arrays, temporary_name


def _cache_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "cache" / "datasets").glob("d-*") if TEMP_MARK not in p.name)


def cache_arrays(path: Path) -> dict[str, np.ndarray]:
    """A cache entry's arrays, read into memory."""
    return {name: np.array(values) for name, values in read_arrays(path, mapped=())[0].items()}


def rewrite_cache(path: Path, **changes: np.ndarray) -> None:
    """Replace arrays of a cache entry, its meta.json saying their new shapes (a consistent but altered entry)."""
    meta = json.loads((path / META).read_text())
    for name, values in changes.items():
        values = np.ascontiguousarray(values)
        (path / f"{name}.bin").write_bytes(values.tobytes())
        meta["arrays"][name] = [values.dtype.str, list(values.shape)]
    (path / META).write_text(json.dumps(meta))


def _edit_keeping_size_and_mtime(path: Path, old: str, new: str) -> None:
    assert len(old) == len(new)
    st = path.stat()
    path.write_text(path.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("trust_file_stat", [True, False])
def test_a_record_edited_with_the_same_size_and_mtime_is_encoded_again(tmp_path, trust_file_stat):
    root = write_datasets(tmp_path, {"d": ({"file_name": "d.jsonl"}, [alpaca(i) for i in range(4)])})
    first, _, report = build(root, ["d"], trust_file_stat=trust_file_stat)
    assert _cache_files(root) and not report["datasets"]["d"].get("cached")
    _edit_keeping_size_and_mtime(root / "d.jsonl", "It is 4.", "It is 5.")
    second, _, report = build(root, ["d"], trust_file_stat=trust_file_stat)
    assert not report["datasets"]["d"].get("cached")
    assert examples(second) != examples(first)
    fresh = build(root, ["d"], trust_file_stat=trust_file_stat, overwrite_cache=True)[0]
    assert examples(second) == examples(fresh)


def test_trust_file_stat_false_never_uses_the_remembered_hashes(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("one\n")
    real = content_hash.hash_file(data, "x")
    assert content_hash.content_hashes([data], "x", tmp_path, True) == {str(data): real}
    remembered = json.loads((tmp_path / content_hash.HASHES_FILE).read_text())
    remembered[str(data)][1] = "0" * 40  # as if the file had changed without its stat changing
    (tmp_path / content_hash.HASHES_FILE).write_text(json.dumps(remembered))
    assert content_hash.content_hashes([data], "x", tmp_path, True) == {str(data): "0" * 40}  # the shortcut
    assert content_hash.content_hashes([data], "x", tmp_path, False) == {str(data): real}
    other = tmp_path / "e.jsonl"
    other.write_text("two\n")
    data.unlink()
    content_hash.content_hashes([other], "x", tmp_path, True)
    assert set(json.loads((tmp_path / content_hash.HASHES_FILE).read_text())) == {str(other)}  # the gone forgotten


def test_hashing_much_data_is_announced(tmp_path, monkeypatch, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("one\n")
    monkeypatch.setattr(content_hash, "ANNOUNCED_BYTES", 2)
    content_hash.content_hashes([data], "dataset 'd'", tmp_path, True)
    assert "hashing dataset 'd': 1 file(s)" in capsys.readouterr().err
    content_hash.content_hashes([data], "dataset 'd'", tmp_path, True)  # remembered: nothing to say
    assert capsys.readouterr().err == ""


CORRUPTIONS = {
    "id_outside_the_vocabulary": lambda p, a: rewrite_cache(
        p, tokens=np.where(np.arange(len(a["tokens"])) == 1, 10**6, a["tokens"]).astype(np.int32)
    ),
    "labels_of_another_length": lambda p, a: rewrite_cache(p, labels=a["labels"][:-3]),
    "offsets_past_the_tokens": lambda p, a: rewrite_cache(p, offsets=a["offsets"] + 5),
    "a_label_not_its_token": lambda p, a: rewrite_cache(p, labels=np.where(a["labels"] >= 0, 7, a["labels"])),
    "counts_not_the_labels": lambda p, a: rewrite_cache(p, counts=a["counts"] + 1),
    "truncated_file": lambda p, a: (p / "tokens.bin").write_bytes((p / "tokens.bin").read_bytes()[:-6]),
    "a_longer_file": lambda p, a: (p / "labels.bin").write_bytes((p / "labels.bin").read_bytes() + b"\0" * 8),
    "missing_file": lambda p, a: (p / "offsets.bin").unlink(),
    "meta_not_json": lambda p, a: (p / META).write_text("{nope"),
    "counts_not_a_record_count": lambda p, a: (p / META).write_text(
        json.dumps({**json.loads((p / META).read_text()), "counts": [1]})
    ),
    "a_file_not_a_directory": lambda p, a: (shutil.rmtree(p), p.write_bytes(b"PK\x03\x04 an old npz")),
    "an_id_changed_keeping_size_and_mtime": lambda p, a: _keeping_size_and_mtime(
        p / "tokens.bin", lambda data: data[:4] + (10**6).to_bytes(4, "little") + data[8:]
    ),
}


def _keeping_size_and_mtime(path: Path, change) -> None:
    st = path.stat()
    path.write_bytes(change(path.read_bytes()))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_cache_is_rebuilt_with_a_warning_naming_it(tmp_path, case, caplog):
    root = write_datasets(tmp_path, {"d": ({}, [alpaca(i, history=1) for i in range(5)])})
    first = examples(build(root, ["d"])[0])
    (cache,) = _cache_files(root)
    CORRUPTIONS[case](cache, cache_arrays(cache))
    with caplog.at_level(logging.WARNING, logger="telechat_lab"):
        again, _, report = build(root, ["d"])
    assert not report["datasets"]["d"].get("cached") and examples(again) == first
    assert [r for r in caplog.records if str(cache) in r.getMessage() and "rebuilding" in r.getMessage()]
    assert build(root, ["d"])[2]["datasets"]["d"]["cached"] is True  # written again, whole
    assert _cache_files(root) == [cache] and (cache / META).is_file()
    assert not [p for p in cache.parent.iterdir() if TEMP_MARK in p.name]  # the replaced entry is gone


def test_an_entry_is_read_whole_again_only_when_its_files_changed_since_it_was_last_known_whole(tmp_path, monkeypatch):
    """A warm start checks every token of an entry only when one of its files changed (inode, size, mtime, ctime)
    since it was written or last checked whole, or always with data.trust_file_stat=false."""
    root = write_datasets(tmp_path, {"d": ({}, [alpaca(i, history=1) for i in range(5)])})
    first = examples(build(root, ["d"])[0])
    (cache,) = _cache_files(root)
    scanned = []
    release = preprocess_mod._release
    monkeypatch.setattr(preprocess_mod, "_release", lambda *a: (scanned.append(1), release(*a)))

    def warm(**options) -> int:
        scanned.clear()
        ds, _, report = build(root, ["d"], **options)
        assert report["datasets"]["d"]["cached"] is True and examples(ds) == first
        return len(scanned)

    assert warm() == 0  # just written: known whole
    assert warm(trust_file_stat=False) == 1  # every token, every time
    assert warm(trust_file_stat=False) == 1
    os.utime(cache / "labels.bin")  # touched: another mtime (same content)
    assert warm() == 1 and warm() == 0  # checked whole once, then known whole again
    (cache / "verified.json").write_text("{nope")
    assert warm() == 1 and warm() == 0


# ------------------------------------------------------------------------ 10. a failed cache write is a warning


def test_a_cache_that_cannot_be_written_is_a_warning_and_encoding_goes_on(tmp_path, caplog):
    root = write_datasets(tmp_path, {"d": ({}, [alpaca(i) for i in range(3)])})
    (root / "cache").write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING, logger="telechat_lab"):
        train, _, report = build(root, ["d"])
    assert len(train) == 3 and not report["datasets"]["d"].get("cached")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("could not write the data cache" in w for w in warnings), warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="telechat_lab"):
        build(root, ["d"])  # the data are built more than once a run: said once
    assert not caplog.records
    assert (root / "cache").read_text() == "a file where the cache directory should be"


def test_a_failing_write_leaves_no_temporary(tmp_path, monkeypatch, caplog):
    root = write_datasets(tmp_path, {"d": ({}, [alpaca(i) for i in range(3)])})

    def full_disk(self, meta):
        (self.tmp / "tokens.bin").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(preprocess_mod.ArrayWriter, "commit", full_disk)
    with caplog.at_level(logging.WARNING, logger="telechat_lab"):
        assert len(build(root, ["d"])[0]) == 3
    assert "No space left on device" in caplog.text
    assert list((root / "cache" / "datasets").iterdir()) == []


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    root = write_datasets(tmp_path, {"d": ({}, [alpaca(i) for i in range(3)])})
    datasets = root / "cache" / "datasets"
    datasets.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    host = socket.gethostname()
    left = datasets / f"d-0123.partial-{host}-{pid}.npz"
    left.write_bytes(b"x" * 1000)
    left_by_an_earlier_version = datasets / f"d-0123.{pid}.tmp.npz"
    left_by_an_earlier_version.write_bytes(b"x" * 1000)
    live = datasets / temporary_name(Path("e-0123.npz")).name  # this process is still writing it
    live.write_bytes(b"y")
    other_host_new = datasets / "f-1.partial-elsewhere-1.npz"
    other_host_new.write_bytes(b"z")
    other_host_old = datasets / "g-1.partial-elsewhere-2.npz"
    other_host_old.write_bytes(b"z")
    os.utime(other_host_old, (0, 0))
    staging = root / "cache" / ".tmp-tiny-abc"  # another writer's (files.TEMP_PREFIX): not the data cache's
    staging.mkdir()
    build(root, ["d"])
    assert staging.exists()
    assert not left.exists() and not other_host_old.exists() and not left_by_an_earlier_version.exists()
    assert live.exists() and other_host_new.exists()


# ------------------------------------------------------------------------ 5. resume on changed data


def test_resume_refuses_data_that_changed_unless_told_and_then_says_so(tmp_path, caplog):
    from helpers import run_train

    from telechat_lab.errors import DataError

    root = write_datasets(tmp_path / "data", {"d": ({"file_name": "d.jsonl"}, [alpaca(i) for i in range(12)])})
    data = [f"data.dataset_dir={root}", "data.datasets=[d]", "data.max_samples=null", "data.val_size=3"]
    out = tmp_path / "run"
    run_train(out, *data, "trainer.max_steps=2")
    _edit_keeping_size_and_mtime(root / "d.jsonl", "It is 4.", "It is 5.")
    checkpoints = sorted((out / "checkpoints").iterdir())
    with pytest.raises(DataError) as err:
        run_train(out, *data, "resume=true", "trainer.max_steps=3")
    message = str(err.value)
    assert "dataset 'd' (d.jsonl changed)" in message and "data.allow_changed_on_resume=true" in message, message
    assert sorted((out / "checkpoints").iterdir()) == checkpoints
    with open(root / "d.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(alpaca(20)) + "\n")
    with pytest.raises(DataError, match=r"12 -> 13 examples.*the training set: 9 -> 10 examples"):
        run_train(out, *data, "resume=true", "trainer.max_steps=3")
    with caplog.at_level(logging.WARNING, logger="telechat_lab"):
        metrics = run_train(out, *data, "resume=true", "trainer.max_steps=3", "data.allow_changed_on_resume=true")
    assert metrics["steps"] == 3
    assert "resuming on data that changed since the checkpoint: dataset 'd'" in caplog.text

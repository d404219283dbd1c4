"""Encoded data in constant memory: the cache's tokens and labels are memory maps that concat, subset, mixing,
stats and the validation split never read or copy; records are read and encoded a shard at a time, and shards
smaller than the data give the same arrays as one; a cache that cannot be written mid-way keeps the data in
memory. Structural checks on tiny data (the sizes are measured by bench/data_scale.py, never here)."""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_data import alpaca, build, examples, write_datasets
from test_data_cache import _cache_files, cache_arrays

from telechat_lab.data import format_report
from telechat_lab.data import preprocess as preprocess_mod
from telechat_lab.data.cache_files import TEMP_MARK, ArrayWriter
from telechat_lab.data.dataset import EncodedDataset
from telechat_lab.data.fingerprint import data_fingerprint
from telechat_lab.errors import BadRecord, DataError


class Untouchable:
    """Stands for a token array that must not be read: only its length may be asked."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        pytest.fail("the tokens were read")

    def __array__(self, *args, **kwargs):
        pytest.fail("the tokens were copied")


def _root(tmp_path, n=12, name="d"):
    return write_datasets(
        tmp_path, {name: ({"file_name": f"{name}.jsonl"}, [alpaca(i, history=i % 2) for i in range(n)])}
    )


@pytest.mark.parametrize("warm", [False, True])
def test_the_tokens_and_labels_are_memory_maps_of_the_cache(tmp_path, warm):
    root = _root(tmp_path)
    if warm:
        build(root, ["d"])
    train, _, report = build(root, ["d"])
    assert bool(report["datasets"]["d"].get("cached")) == warm
    (cache,) = _cache_files(root)
    for segments in (train.segments, train.label_segments):
        assert len(segments) == 1 and isinstance(segments[0], np.memmap)
        assert str(segments[0].filename).startswith(str(cache))
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        ["meta.json", "verified.json", *(f"{n}.bin" for n in ("tokens", "labels", "offsets", "source", "counts"))]
    )


def test_concat_subset_mixing_stats_split_and_fingerprint_never_read_the_tokens(tmp_path):
    root = write_datasets(
        tmp_path,
        {
            "a": ({"file_name": "a.jsonl"}, [alpaca(i) for i in range(8)]),
            "b": ({"file_name": "b.jsonl"}, [alpaca(i, history=1) for i in range(5)]),
        },
    )
    build(root, ["a", "b"])  # cached
    expected_train, expected_val, expected = build(root, ["a", "b"], val_size=3, mix={"a": 1.5})
    real_concat = EncodedDataset.concat
    parts_seen = []

    def concat(parts):  # every part's tokens replaced by arrays that fail when read
        for part in parts:
            parts_seen.append(part.segments[0])
            part.segments = [Untouchable(len(s)) for s in part.segments]
            part.label_segments = [Untouchable(len(s)) for s in part.label_segments]
        return real_concat(parts)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EncodedDataset, "concat", staticmethod(concat))
        train, val, report = build(root, ["a", "b"], val_size=3, mix={"a": 1.5})
    assert len(parts_seen) == 2 and all(isinstance(s, np.memmap) for s in parts_seen)
    assert report == expected  # stats, the split and the fingerprint, with no token read
    assert len(train.segments) == 2 and all(isinstance(s, Untouchable) for s in train.segments)
    assert train.targets().tolist() == expected_train.targets().tolist()
    sub = train.subset(np.arange(3))
    assert sub.segments == train.segments and sub.stats()["examples"] == 3
    data_fingerprint(report["datasets"], {"a": root / "a.jsonl", "b": root / "b.jsonl"}, train, val)
    assert examples(expected_val) == examples(expected_val.subset(np.arange(len(expected_val))))


def test_concat_keeps_the_parts_maps_and_reads_across_them(tmp_path):
    root = write_datasets(
        tmp_path,
        {
            "a": ({"file_name": "a.jsonl"}, [alpaca(i) for i in range(4)]),
            "b": ({"file_name": "b.jsonl"}, [alpaca(10 + i, history=1) for i in range(3)]),
        },
    )
    train, _, _ = build(root, ["a", "b"])
    alone = [build(root, [n])[0] for n in ("a", "b")]
    assert all(
        np.shares_memory(t, alone[k].segments[0]) or t.filename == alone[k].segments[0].filename
        for k, t in enumerate(train.segments)
    )
    assert examples(train) == examples(alone[0]) + examples(alone[1])
    joined = EncodedDataset.concat([train, train])
    assert len(joined.segments) == 4 and examples(joined) == examples(train) * 2
    assert joined.stats() == {k: 2 * v for k, v in train.stats().items()}


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_smaller_than_the_data_give_the_same_arrays_as_one(tmp_path, monkeypatch, workers):
    records = [alpaca(i, history=i % 3) for i in range(70)]
    root = write_datasets(tmp_path, {"d": ({"file_name": "d.jsonl"}, records)})
    whole, _, report = build(root, ["d"], cache_dir=str(tmp_path / "one"), cutoff_len=300)
    sizes = []
    real = preprocess_mod.encode_records
    monkeypatch.setattr(
        preprocess_mod,
        "encode_records",
        lambda enc, spec, recs, *a: sizes.append(len(recs)) or real(enc, spec, recs, *a),
    )
    monkeypatch.setattr(preprocess_mod, "SHARD_RECORDS", 16)
    monkeypatch.setattr(preprocess_mod, "JOB_RECORDS", 5)
    sharded, _, report2 = build(
        root, ["d"], cache_dir=str(tmp_path / "many"), cutoff_len=300, preprocessing_num_workers=workers
    )
    if workers == 1:  # the records reach the encoder a shard at a time (the pool's calls are in its processes)
        assert sizes == [16, 16, 16, 16, 6]
    one, many = (cache_arrays(next((tmp_path / d / "datasets").iterdir())) for d in ("one", "many"))
    assert sorted(one) == sorted(many)
    for name in one:
        np.testing.assert_array_equal(one[name], many[name], err_msg=name)
    assert examples(sharded) == examples(whole)
    assert report2["datasets"]["d"] == report["datasets"]["d"]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_record_is_the_same_message_whatever_process_encodes_it(tmp_path, monkeypatch, workers):
    """A bad record found in a worker reaches the main process as itself (its error crosses the pipe), not as a
    worker that died; with data.on_bad_record=skip it is counted and named as in this process."""
    records = [alpaca(i) for i in range(70)]
    records[41]["output"] = "  "
    root = write_datasets(tmp_path, {"d": ({"file_name": "d.jsonl"}, records)})
    monkeypatch.setattr(preprocess_mod, "SHARD_RECORDS", 16)
    monkeypatch.setattr(preprocess_mod, "JOB_RECORDS", 5)
    with pytest.raises(BadRecord, match=r"^dataset 'd': .*d\.jsonl line 42: empty reply") as bad:
        build(root, ["d"], preprocessing_num_workers=workers)
    assert bad.value.reason == "empty reply"
    _, _, report = build(root, ["d"], preprocessing_num_workers=workers, on_bad_record="skip")
    counts = report["datasets"]["d"]
    assert counts["skipped"] == 1 and counts["skip_reasons"] == {"empty reply": 1}
    assert counts["skipped_at"][0].endswith("d.jsonl line 42")


def test_json_lines_decoded_in_the_workers_are_counted_and_named_as_in_this_process(tmp_path, monkeypatch):
    """JSON lines are decoded where they are encoded (in the workers, when there are); data.max_samples keeps the
    decode in this process (it counts the lines holding a record). Every way gives the same examples, counts and
    places: the unreadable lines first among the skipped, then the records that hold no example."""
    records = [alpaca(i) for i in range(70)]
    records[50]["output"] = "  "
    root = write_datasets(tmp_path, {"d": ({"file_name": "d.jsonl"}, records)})
    path = root / "d.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[6], lines[44] = "{not json\n", "[1, 2]\n"
    path.write_text("".join(lines), encoding="utf-8")
    monkeypatch.setattr(preprocess_mod, "SHARD_RECORDS", 16)
    monkeypatch.setattr(preprocess_mod, "JOB_RECORDS", 5)
    with pytest.raises(BadRecord, match=r"^dataset 'd': .*d\.jsonl line 7: malformed JSON \(Expecting") as bad:
        build(root, ["d"], preprocessing_num_workers=2)
    assert bad.value.reason == "malformed JSON"
    built = {
        how: build(root, ["d"], on_bad_record="skip", cache_dir=str(tmp_path / how), **kwargs)
        for how, kwargs in {
            "1 process": {"preprocessing_num_workers": 1},
            "2 workers": {"preprocessing_num_workers": 2},
            "max_samples": {"preprocessing_num_workers": 2, "max_samples": 1000},
        }.items()
    }
    counts = {how: report["datasets"]["d"] for how, (_, _, report) in built.items()}
    assert not any(c.get("cached") for c in counts.values())  # each way encoded
    for key in ("records", "skipped", "skip_reasons", "skipped_at"):
        assert counts["2 workers"][key] == counts["1 process"][key] == counts["max_samples"][key], key
    one = counts["1 process"]
    assert one["records"] == 70 and one["skipped"] == 3
    assert one["skip_reasons"] == {"malformed JSON": 1, "not a JSON object": 1, "empty reply": 1}
    assert [place.rsplit(" ", 1)[1] for place in one["skipped_at"]] == ["7", "45", "51"]
    text = format_report(built["2 workers"][2])
    assert (
        f"d: 3 skipped (1 malformed JSON, 1 not a JSON object, 1 empty reply), e.g. {path} lines 7, 45 and 51" in text
    )
    assert examples(built["2 workers"][0]) == examples(built["1 process"][0]) == examples(built["max_samples"][0])
    assert len(built["1 process"][0]) == 67


@pytest.mark.parametrize("script", ["guarded", "unguarded", "stdin"])
def test_a_script_without_a_main_guard_is_told_before_workers_start(tmp_path, monkeypatch, script):
    """Spawned workers import the program's script: one that calls the API at its top level would run it again in
    every worker, and a program read from standard input has no script to import; either is refused, naming it
    and the fix, before a worker starts, and whether or not workers would start (a warm cache). A guarded one
    encodes."""
    import types

    path = tmp_path / "prepare.py"
    call = "build_datasets(cfg, 'tok')"
    path.write_text(f"if __name__ == '__main__':\n    {call}\n" if script == "guarded" else f"{call}\n", "utf-8")
    root = _root(tmp_path, n=70)
    monkeypatch.setattr(preprocess_mod, "SHARD_RECORDS", 16)
    if script == "unguarded":
        build(root, ["d"], preprocessing_num_workers=1)  # a warm cache: no worker would start
    main_file = "<stdin>" if script == "stdin" else str(path)
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__file__=main_file, __spec__=None))
    if script == "guarded":
        assert len(build(root, ["d"], preprocessing_num_workers=2)[0]) == 70
        return
    start = f"{path}: " if script == "unguarded" else ""
    with pytest.raises(DataError, match=re.escape(f"{start}data.preprocessing_num_workers=2 starts worker")) as e:
        build(root, ["d"], preprocessing_num_workers=2)
    assert 'under `if __name__ == "__main__":`' in str(e.value)
    if script == "stdin":
        assert "a program read from <stdin> does not have: save it as a file" in str(e.value)
        assert not list((root / "cache").glob("datasets/*/meta.json"))


def test_a_worker_that_dies_is_a_clear_error_not_a_wait(tmp_path, monkeypatch):
    """A worker killed mid-way (the kernel's OOM killer) ends the encoding with the dataset and the setting to
    lower; nothing half-written is left in the cache."""
    root = _root(tmp_path, n=70)
    monkeypatch.setattr(preprocess_mod, "SHARD_RECORDS", 16)
    monkeypatch.setattr(preprocess_mod, "JOB_RECORDS", 5)
    pools = []

    class Pool(preprocess_mod.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(preprocess_mod, "ProcessPoolExecutor", Pool)
    real_append = preprocess_mod._Output.append

    def append(self, part, records):
        real_append(self, part, records)
        for process in list(pools[0]._processes.values()):  # after the first job's arrays
            process.kill()
            process.join()

    monkeypatch.setattr(preprocess_mod._Output, "append", append)
    with pytest.raises(DataError, match=r"dataset 'd': a process encoding it died .*preprocessing_num_workers=2"):
        build(root, ["d"], preprocessing_num_workers=2)
    assert not [p for p in (root / "cache" / "datasets").iterdir() if (p / "meta.json").exists()]


def _workers_of(pid: int) -> list[int]:
    """The spawned multiprocessing workers among `pid`'s children (not its resource tracker)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        for child in open(f"/proc/{pid}/task/{task}/children").read().split():
            try:
                if b"spawn_main" in open(f"/proc/{child}/cmdline", "rb").read():
                    found.append(int(child))
            except OSError:
                continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("when", ["encoding", "starting"])
def test_ctrl_c_while_workers_encode_is_one_line_and_leaves_nothing_behind(tmp_path, when):
    """Ctrl+C (SIGINT to the terminal's whole process group) during a 2-worker encoding, or while its workers are
    still starting (importing): one line and exit code 130, no traceback (of the main process or a worker), no
    process left, nothing of the entry in the cache."""
    root = write_datasets(tmp_path, {"d": ({"file_name": "d.jsonl"}, [alpaca(i, history=i % 3) for i in range(40000)])})
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "telechat_lab.data.inspect", f"data.dataset_dir={root}", "data.datasets=[d]"]
    proc = subprocess.Popen(
        [*command, "data.preprocessing_num_workers=2", f"data.cache_dir={cache}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, as a terminal's foreground job is
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a shell starts it
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    seen = []
    if when == "starting":  # as soon as a worker exists: it takes a second to import what it needs
        deadline = time.time() + 120
        while not _workers_of(proc.pid) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
        assert _workers_of(proc.pid), "no worker started"
    else:
        for line in proc.stderr:  # the progress line comes a second into the encoding
            seen.append(line)
            if line.startswith("encoding d ..."):
                break
    os.killpg(proc.pid, signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, "".join(seen) + rest
    assert rest.strip().splitlines()[-1] == "stopped by Ctrl+C (SIGINT)" and "Traceback" not in rest, rest
    deadline = time.time() + 30  # no worker outlives it (an exited one is reaped by init within a moment)
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("a process of its group is still there")
    assert [p.name for p in (cache / "datasets").iterdir()] == []


def test_records_are_read_streaming(tmp_path, monkeypatch):
    """The reader is asked for records as the encoder needs them, not all first."""
    root = _root(tmp_path, n=40)
    monkeypatch.setattr(preprocess_mod, "SHARD_RECORDS", 8)
    events = []
    real_iter, real_encode = preprocess_mod.iter_records, preprocess_mod.encode_records

    def reading(spec, skip, **kw):
        for item in real_iter(spec, skip, **kw):
            events.append("read")
            yield item

    monkeypatch.setattr(preprocess_mod, "iter_records", reading)
    monkeypatch.setattr(preprocess_mod, "encode_records", lambda *a: events.append("encode") or real_encode(*a))
    build(root, ["d"])
    assert events.index("encode") == 8 and events.count("encode") == 5  # the first shard encoded before more read


def test_a_write_failing_mid_way_keeps_the_data_in_memory(tmp_path, monkeypatch, caplog):
    root = _root(tmp_path, n=30)
    expected = examples(build(root, ["d"], cache_dir=str(tmp_path / "ok"))[0])
    monkeypatch.setattr(preprocess_mod, "SHARD_RECORDS", 7)
    calls = []
    real_append = ArrayWriter.append

    def append(self, **arrays):
        calls.append(1)
        if len(calls) == 3:  # the offsets' first zero, two shards, then a full disk
            self.files["tokens"].write(b"part")
            raise OSError(28, "No space left on device")
        real_append(self, **arrays)

    monkeypatch.setattr(ArrayWriter, "append", append)
    with caplog.at_level(logging.WARNING, logger="telechat_lab"):
        train, _, report = build(root, ["d"])
    assert examples(train) == expected and not report["datasets"]["d"].get("cached")
    assert "No space left on device" in caplog.text
    assert not isinstance(train.segments[0], np.memmap)
    assert list((root / "cache" / "datasets").iterdir()) == []


def test_a_dataset_pickles_its_maps_as_their_files(tmp_path):
    root = _root(tmp_path, n=200)
    train, _, _ = build(root, ["d"])
    data = pickle.dumps(train)
    assert len(data) < train.segments[0].nbytes  # the tokens did not travel
    again = pickle.loads(data)
    assert isinstance(again.segments[0], np.memmap) and examples(again) == examples(train)


def test_a_dead_writers_temporary_directory_is_removed(tmp_path):
    import socket
    import subprocess
    import sys

    root = _root(tmp_path, n=3)
    datasets = root / "cache" / "datasets"
    datasets.mkdir(parents=True)
    pid = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )
    left = datasets / f"d-0123{TEMP_MARK}{socket.gethostname()}-{pid}"
    left.mkdir()
    (left / "tokens.bin").write_bytes(b"x" * 100)
    build(root, ["d"])
    assert not left.exists() and len(_cache_files(root)) == 1


def test_the_scale_bench_runs_cold_then_warm_in_their_own_processes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "data_scale.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--smoke", "--work", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("| 300 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 9 and all(cells[k].endswith("GB") for k in (2, 5, 7)), row
    assert "| warm train.py to first step | its peak RSS |" in done.stdout
    assert 0 < float(cells[6].removesuffix(" s")) < float(cells[3].removesuffix(" s")) + 60, row  # train.py ran
    assert 0.1 < float(cells[7].removesuffix(" GB")) < 8, row  # train.py's own peak: torch and the model loaded
    assert list(tmp_path.glob("alpaca_300_0/synthetic.jsonl")) and not list(tmp_path.glob("cache_*"))
    assert not list(tmp_path.glob("train_*"))  # the train.py run's output_dir is not kept


def test_parquet_is_read_a_row_group_at_a_time(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from telechat_lab.data.registry import iter_records, load_dataset_info

    records = [{k: v for k, v in alpaca(i).items() if k != "history"} for i in range(7)]
    root = write_datasets(tmp_path, {"pq": ({"file_name": "d.parquet"}, None), "js": ({}, records)})
    pq.write_table(pa.Table.from_pylist(records), root / "d.parquet", row_group_size=2)
    read_groups = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, i, *a, **k: read_groups.append(i) or real(self, i)
    )
    spec = load_dataset_info(root, ["pq"])["pq"]
    got = iter_records(spec)
    assert next(got)[1:] == (0, records[0]) and read_groups == [0]  # one group read for the first record
    assert [(index, rec) for _, index, rec in got] == list(enumerate(records))[1:] and read_groups == [0, 1, 2, 3]
    assert examples(build(root, ["pq"])[0]) == examples(build(root, ["js"])[0])


def test_dataloader_workers_read_the_same_batches_from_the_maps(tmp_path):
    torch = pytest.importorskip("torch")
    from telechat_lab.data.packing import Collator

    train, _, _ = build(_root(tmp_path, n=9), ["d"])

    def batches(**workers):
        loader = torch.utils.data.DataLoader(train, batch_size=4, collate_fn=Collator(), **workers)
        return [{k: v.tolist() for k, v in batch.items()} for batch in loader]

    here = batches()
    assert batches(num_workers=1, multiprocessing_context="spawn") == here  # the dataset pickled: its maps by file
    assert batches(num_workers=2, multiprocessing_context="fork") == here

"""data.streaming=true (issue 23 item 4): records read and encoded on the fly, sharded over (rank, worker) without
overlap, packed with the map-style row format, a seeded block shuffle, an exact resume mid-stream (per shard
positions, and a whole run interrupted and resumed), validation from the head of the stream and the config checks.
Tokenizer-only tests use the tiny tokenizer; the runs the tiny model on the demo pt data."""

from __future__ import annotations

import json
import os
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from helpers import adapter_weights, compose_train, losses, run_train

from telechat_lab.config import config_problems
from telechat_lab.data import DataConfig, DataError, build_datasets
from telechat_lab.data.pipeline import DEMO_DATA
from telechat_lab.data.streaming import (
    RecordStream,
    ShardRows,
    StreamingDataset,
    _fresh,
    stream_source,
    validation_examples,
)
from telechat_lab.errors import ConfigError
from telechat_lab.tokenizer import IGNORE_INDEX, TINY_TOKENIZER_PATH
from telechat_lab.training.datamodule import TelechatDataModule

TINY = TINY_TOKENIZER_PATH
PT = ["pt_demo", "pt_jsonl_demo"]  # 30 lines of text and 6 JSON lines: 36 records


def cfg(**kw) -> DataConfig:
    base = {"datasets": PT, "val_size": 0, "cutoff_len": 32, "streaming": True, "streaming_buffer": 5}
    return DataConfig(**{**base, **kw})


def round_robin(dataset: StreamingDataset, n: int) -> list[dict]:
    """The first n batches as a DataLoader with dataset.workers workers hands them out: worker i % workers."""
    iters = [dataset.batches(w) for w in range(dataset.workers)]
    return [next(iters[i % dataset.workers]) for i in range(n)]


def same(a: dict, b: dict) -> bool:
    keys = [k for k in a if k != "stream_state"]
    return keys == [k for k in b if k != "stream_state"] and all(torch.equal(a[k], b[k]) for k in keys)


def test_every_record_is_read_by_exactly_one_rank_and_worker():
    """world=2 x workers=2 simulated: the four shards' records of one pass are the stream's records, each once;
    the head taken for validation by none of them."""
    for val_size in (0, 3):
        c = cfg(dataloader_num_workers=2, val_size=val_size)
        source = stream_source(c, TINY, "pt")
        read = Counter()
        for rank in range(2):
            dataset = StreamingDataset(source, c, rank, 2)
            for worker in range(2):
                stream = RecordStream(source, dataset.shard_of(worker), dataset.shards)
                read.update(
                    (where, raw if isinstance(raw, str) else raw["text"]) for _, where, raw in stream.records(_fresh(0))
                )
        every = [
            (w, r if isinstance(r, str) else r["text"])
            for _, w, r in RecordStream(source, 0, 1).records(_fresh(0), every=True)
        ]
        assert len(every) == 36 and len(set(every)) == 36
        assert set(read.values()) == {1} and sorted(read) == sorted(every[val_size:])


def test_a_pass_of_the_stream_holds_the_map_style_examples():
    """One epoch of a shard's rows (no packing) is the map-style pipeline's examples of the same data, each once
    (documents longer than cutoff_len split the same way), in a seeded order that a second reading repeats."""
    c = cfg(cutoff_len=16)
    train, _, _ = build_datasets(DataConfig(datasets=PT, val_size=0, cutoff_len=16), TINY, kind="pt")
    expected = Counter(tuple(train[i]["input_ids"].tolist()) for i in range(len(train)))
    rows = ShardRows(stream_source(c, TINY, "pt"), 0, 1, c.seed, c.streaming_buffer, False)
    first = [(tuple(r["input_ids"].tolist()), s) for r, s in islice(rows.rows(None), len(train))]
    assert Counter(ids for ids, _ in first) == expected
    assert all(s["epoch"] == 0 for _, s in first)
    two = [(tuple(r["input_ids"].tolist()), s["epoch"]) for r, s in islice(rows.rows(None), 2 * len(train))]
    assert two[: len(train)] == [(ids, 0) for ids, _ in first]  # a second reading repeats the order
    second = [ids for ids, epoch in two[len(train) :]]
    assert {epoch for _, epoch in two[len(train) :]} == {1}  # the stream goes on with the next epoch
    assert Counter(second) == expected and second != [ids for ids, _ in first]  # in another order


def test_packed_stream_rows_are_the_map_style_row_format():
    """data.packing: rows of at most cutoff_len tokens holding several documents, position_ids restarting per
    document, each document's first label ignored; the documents of one pass are the examples, each once."""
    c = cfg(cutoff_len=128, packing=True)
    train, _, _ = build_datasets(DataConfig(datasets=PT, val_size=0, cutoff_len=128), TINY, kind="pt")
    expected = Counter(tuple(train[i]["input_ids"].tolist()) for i in range(len(train)))
    rows = ShardRows(stream_source(c, TINY, "pt"), 0, 1, c.seed, c.streaming_buffer, True)
    docs, multi = Counter(), 0
    for row, state in rows.rows(None):
        if state["epoch"] > 0:
            break
        ids, pos, labels = row["input_ids"], row["position_ids"], row["labels"]
        assert len(ids) <= 128 and len(ids) == len(pos) == len(labels)
        starts = np.flatnonzero(pos == 0).tolist()
        multi += len(starts) > 1
        for a, b in zip(starts, [*starts[1:], len(ids)]):
            assert pos[a:b].tolist() == list(range(b - a)) and labels[a] == IGNORE_INDEX
            docs[tuple(ids[a:b].tolist())] += 1
    assert docs == expected and multi > 0
    batch = next(
        StreamingDataset(stream_source(c, TINY, "pt"), DataConfig(**{**c.__dict__, "batch_size": 3})).batches(0)
    )
    assert batch["input_ids"].shape[0] == 3 and "position_ids" in batch and "attention_mask" not in batch


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_yields_exactly_the_remaining_batches(workers):
    """Interrupted after K batches (mid-block, and later past an epoch's end), a stream rebuilt from the
    positions the batches carried (and the number taken) continues with exactly the uninterrupted batches."""
    c = cfg(dataloader_num_workers=workers, batch_size=2, packing=True, streaming_buffer=4)
    source = stream_source(c, TINY, "pt")
    whole = round_robin(StreamingDataset(source, c), 60)
    assert any(b["stream_state"][1]["epoch"] > 0 for b in whole)  # the run crosses into the second epoch
    for k in (7, 41):
        positions = {}
        for b in whole[:k]:
            positions[b["stream_state"][0]] = b["stream_state"][1]
        resumed = StreamingDataset(source, c)
        resumed.positions, resumed.rotate = positions, k % resumed.workers
        assert all(same(a, b) for a, b in zip(round_robin(resumed, 60 - k), whole[k:]))


def test_validation_is_the_head_of_the_stream():
    """data.val_size=N: the first N records, encoded once; training never reads them."""
    c = cfg(val_size=4, cutoff_len=128)
    source = stream_source(c, TINY, "pt")
    head = validation_examples(source)
    first = [line for line in (DEMO_DATA / "pt_demo.txt").read_text().splitlines() if line.strip()][:4]
    encoder = ShardRows(source, 0, 1, 0, 4, False).encoder()
    assert [list(ids) for ids, _ in head] == [rows[0].tolist() for rows, _ in encoder.encode_texts(first)]
    trained = [w for _, w, _ in RecordStream(source, 0, 1).records(_fresh(0))]
    assert len(trained) == 32 and not any(
        w.endswith(f" line {n}") and "pt_demo.txt" in w for n in range(1, 5) for w in trained
    )
    with pytest.raises(DataError, match="only 36 records"):
        validation_examples(stream_source(cfg(val_size=40), TINY, "pt"))


def test_sft_conversations_stream_too():
    c = DataConfig(datasets=["telechat_demo"], val_size=0, streaming=True, cutoff_len=256)
    train, _, _ = build_datasets(DataConfig(datasets=["telechat_demo"], val_size=0, cutoff_len=256), TINY)
    rows = ShardRows(stream_source(c, TINY, "sft"), 0, 1, c.seed, c.streaming_buffer, False)
    got = Counter(tuple(r["labels"].tolist()) for r, _ in islice(rows.rows(None), len(train)))
    assert got == Counter(tuple(train[i]["labels"].tolist()) for i in range(len(train)))


def test_what_cannot_stream_is_refused_by_name(tmp_path):
    with pytest.raises(DataError, match="'identity'.*one JSON array"):
        stream_source(DataConfig(datasets=["identity"], streaming=True), TINY, "sft")
    with pytest.raises(DataError, match="not pairwise data"):
        stream_source(DataConfig(datasets=["dpo_demo"], streaming=True), TINY, "pairwise")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"bad": {"file_name": "bad.jsonl", "columns": {"prompt": "text"}}})
    )
    c = DataConfig(dataset_dir=str(tmp_path), datasets=["bad"], val_size=0, streaming=True, dataloader_num_workers=1)
    item = next(iter(StreamingDataset(stream_source(c, TINY, "pt"), c)))
    assert "stream_error" in item and "bad.jsonl line 2: malformed JSON" in item["stream_error"]
    module = TelechatDataModule(c, TINY.parent if TINY.is_file() else TINY, kind="pt")
    with pytest.raises(DataError, match="bad.jsonl line 2: malformed JSON"):
        module.on_before_batch_transfer(item, 0)


def test_streaming_config_checks():
    composed = compose_train(["stage=pt", "data.streaming=true", "trainer.max_steps=-1"])
    composed.data.mix = {"pt_demo": 2.0}
    problems = "\n".join(config_problems(composed))
    assert "needs trainer.max_steps" in problems and "data.val_size=0.05" in problems and "data.mix" in problems
    problems = "\n".join(config_problems(compose_train(["stage=dpo", "data.streaming=true", "trainer.max_steps=3"])))
    assert "data.streaming=true with stage=dpo" in problems
    assert not config_problems(
        compose_train(["stage=pt", "data.streaming=true", "trainer.max_steps=3", "data.val_size=4"])
    )


STREAM_RUN = [
    "stage=pt",
    f"data.datasets=[{','.join(PT)}]",
    "data.streaming=true",
    "data.cutoff_len=32",
    "data.batch_size=2",
    "data.dataloader_num_workers=2",
    "data.streaming_buffer=5",
    "optim.scheduler=constant",
]


def test_an_interrupted_streaming_run_resumes_exactly(tmp_path):
    """Interrupted after 7 steps (mid-block) of a 22-step run that crosses an epoch (36 rows of 2 shards), resumed:
    the same losses and the same final weights as the uninterrupted run; validation on the head of the stream."""
    run_train(tmp_path / "long", *STREAM_RUN, "data.val_size=4", "trainer.max_steps=22")
    run_train(tmp_path / "short", *STREAM_RUN, "data.val_size=4", "trainer.max_steps=7")
    metrics = run_train(tmp_path / "short", *STREAM_RUN, "data.val_size=4", "resume=true", "trainer.max_steps=22")
    assert losses(tmp_path / "short") == pytest.approx(losses(tmp_path / "long"), abs=1e-6)
    assert len(losses(tmp_path / "long")) == 22 and metrics["steps"] == 22 and metrics["val_loss"] is not None
    long, short = adapter_weights(tmp_path / "long"), adapter_weights(tmp_path / "short")
    assert all(torch.allclose(long[k], short[k], atol=1e-6) for k in long)


def test_a_resume_with_other_shards_is_refused(tmp_path):
    run_train(tmp_path / "a", *STREAM_RUN, "data.val_size=0", "trainer.max_steps=2")
    with pytest.raises(DataError, match="2 shard\\(s\\).*this run 1"):
        run_train(
            tmp_path / "a",
            *STREAM_RUN,
            "data.val_size=0",
            "resume=true",
            "trainer.max_steps=4",
            "data.dataloader_num_workers=0",
        )


def test_the_progress_bar_counts_to_max_steps_of_an_endless_stream():
    """A stream is one endless Lightning epoch: the bar counts the batches to max_steps (from a resumed step too)
    and names no epoch count it cannot know (the stream's epoch is logged as `epoch`)."""
    from types import SimpleNamespace

    from telechat_lab.training.callbacks import StepsProgressBar

    bar = StepsProgressBar()
    bar._trainer = SimpleNamespace(
        max_steps=12, accumulate_grad_batches=2, num_training_batches=float("inf"), max_epochs=3, global_step=4
    )
    bar._steps_at_start, bar._done_at_start = 4, 8  # resumed after 4 steps of 2 batches
    assert bar.total_train_batches == 8 + (12 - 4) * 2
    assert bar._get_train_description(0).strip() == "Training"


@pytest.mark.slow
def test_a_ddp_streaming_run_resumes_exactly(tmp_path):
    """2 ranks (each its own shard; the checkpoint gathers both ranks' positions): interrupted after 3 steps and
    resumed, the same losses and weights as the uninterrupted 2-rank run."""
    from helpers import REPO, train_cli

    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}  # this checkout's package
    common = [
        *STREAM_RUN,
        "data.dataloader_num_workers=0",
        "data.val_size=0",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        "hardware=ddp",
        "hardware.devices=2",
        "hardware.accelerator=cpu",
        "adapter.dropout=0",
        f"data.cache_dir={tmp_path}/cache",
    ]
    train_cli([*common, "trainer.max_steps=8", f"output_dir={tmp_path / 'long'}"], tmp_path, env=env)
    train_cli([*common, "trainer.max_steps=3", f"output_dir={tmp_path / 'short'}"], tmp_path, env=env)
    train_cli([*common, "trainer.max_steps=8", "resume=true", f"output_dir={tmp_path / 'short'}"], tmp_path, env=env)
    assert losses(tmp_path / "short") == pytest.approx(losses(tmp_path / "long"), abs=1e-6)
    long, short = adapter_weights(tmp_path / "long"), adapter_weights(tmp_path / "short")
    assert all(torch.allclose(long[k], short[k], atol=1e-6) for k in long)


def _write_formats(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"Document number {i} says {'something ' * (i % 4)}." for i in range(11)]
    pq.write_table(pa.table({"text": texts}), root / "c.parquet", row_group_size=3)
    with open(root / "c.csv", "w", newline="") as f:
        f.write("text\n" + "".join(f'"{t}\nwith a second line"\n' for t in texts))
    (root / "c.txt").write_text("\ufeff" + "\n\n".join(f"{t}\nmore of it" for t in texts) + "\n")
    (root / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n\n")
    info = {f: {"file_name": f"c.{f}", "columns": {"prompt": "text"}} for f in ("parquet", "csv", "jsonl")}
    info["txt"] = {"file_name": "c.txt", "sample_by": "paragraph"}
    (root / "dataset_info.json").write_text(json.dumps(info))


@pytest.mark.parametrize("fmt", ["parquet", "csv", "txt", "jsonl"])
def test_each_file_format_streams_its_records_and_resumes_from_any_of_them(tmp_path, fmt):
    """Parquet (from the row group holding the position), CSV (quoted multi-line fields), text paragraphs (a
    byte-order mark) and JSON lines: one pass reads what the map-style reader reads, in order; reading again from
    any record's saved position yields exactly the records from it on."""
    from telechat_lab.data.registry import load_dataset_info, read_records

    _write_formats(tmp_path)
    c = DataConfig(dataset_dir=str(tmp_path), datasets=[fmt], val_size=0, streaming=True)
    source = stream_source(c, TINY, "pt")
    stream = RecordStream(source, 0, 1)
    got = list(stream.records(_fresh(0)))
    records, _ = read_records(load_dataset_info(tmp_path, [fmt])[fmt])
    spec = source.specs[0]
    texts = [json.loads(raw)["text"] if isinstance(raw, str) else raw["text"] for _, _, raw in got]
    assert texts == [rec["text"] for _, _, rec in records] and len(texts) == 11
    assert [w.rsplit(" ", 1)[1] for _, w, _ in got] == [str(index) for _, index, _ in records]
    for k, (pos, _, _) in enumerate(got):
        assert [w for _, w, _ in stream.records(pos)] == [w for _, w, _ in got[k:]]
    assert spec.name == fmt


def test_a_streamed_sft_run_trains_and_its_validation_split_is_not_rebuilt_by_eval(tmp_path):
    """Conversations stream too (a JSON-lines SFT set); eval.split=val of such a run is refused (its validation
    is the head of its stream, which eval's rebuilt split would not be) instead of scoring other examples."""
    from telechat_lab import api

    args = ["data.datasets=[telechat_demo]", "data.streaming=true", "data.val_size=2", "trainer.max_steps=2"]
    metrics = run_train(tmp_path / "run", *args, "data.max_samples=null")
    assert metrics["steps"] == 2 and metrics["val_loss"] is not None
    with pytest.raises(ConfigError, match="validates on the head of its stream"):
        api.evaluate([f"run_dir={tmp_path / 'run'}", "eval.split=val", f"output_dir={tmp_path / 'eval'}"])
    assert not (tmp_path / "eval").exists()


def test_a_shard_that_gets_no_example_is_named_instead_of_waiting_for_ever():
    source = stream_source(cfg(), TINY, "pt")
    assert next(ShardRows(source, 35, 36, 0, 5, False).rows(None))[1]["g"] == 35  # the last record's shard
    with pytest.raises(DataError, match="shard 36 of 37 .* gets no training example"):
        next(ShardRows(source, 36, 37, 0, 5, False).rows(None))


def test_padding_free_stream_batches_are_one_row_of_the_batch_examples():
    c = cfg(cutoff_len=128, padding_free=True, batch_size=3)
    batch = next(StreamingDataset(stream_source(c, TINY, "pt"), c).batches(0))
    rows = [r for r, _ in islice(ShardRows(stream_source(c, TINY, "pt"), 0, 1, c.seed, 5, False).rows(None), 3)]
    assert batch["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    assert batch["input_ids"][0].tolist() == [t for r in rows for t in r["input_ids"].tolist()]
    assert (batch["position_ids"][0] == 0).sum() == 3


def test_bytes_that_are_not_utf8_are_named_by_line_and_offset(tmp_path):
    (tmp_path / "latin.txt").write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"latin": {"file_name": "latin.txt"}}))
    c = DataConfig(dataset_dir=str(tmp_path), datasets=["latin"], val_size=0, streaming=True)
    with pytest.raises(DataError, match=r"latin.txt: line 2, byte offset 14 \(0xe9\) is not UTF-8"):
        list(RecordStream(stream_source(c, TINY, "pt"), 0, 1).records(_fresh(0)))

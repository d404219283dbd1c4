"""Tests of the data of the stages beside SFT (issue 21): dataset_info.json's preference (`"ranking": true`), KTO
(`kto_tag`) and raw-text entries, the refusal of a dataset a stage cannot read, their encoding (against the SFT
encoder), the truncation rule of a prompt and its replies, raw-text rows and packing, the batches (pairs
chosen-then-rejected, KTO's KL rows), step_examples, the resumable sampler on pairs, the cache keyed by kind,
inspect, the config checks and each stage's default (demo) data. Tokenizer-only: the tiny tokenizer."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import compose_train
from test_data import write_datasets
from test_data_cache import cache_arrays, rewrite_cache

from telechat_lab.config import config_problems
from telechat_lab.data import DataConfig, DataError, build_datasets, format_report
from telechat_lab.data.encoder import BOT, END, IGNORE, USER, ChatEncoder, TemplateOptions, infer_seqlen
from telechat_lab.data.formats import Conversation, Prompted, to_prompted
from telechat_lab.data.packing import PAD_ID, Collator, PackedDataset
from telechat_lab.data.pipeline import DEMO_DATA
from telechat_lab.data.registry import load_dataset_info
from telechat_lab.errors import ConfigError
from telechat_lab.tokenizer import TINY_TOKENIZER_PATH
from telechat_lab.training.datamodule import TelechatDataModule

TINY = TINY_TOKENIZER_PATH
RANKING = {
    "ranking": True,
    "columns": {
        "prompt": "instruction",
        "query": "input",
        "chosen": "chosen",
        "rejected": "rejected",
        "system": "system",
        "history": "history",
    },
}
SHAREGPT_RANKING = {
    "formatting": "sharegpt",
    "ranking": True,
    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
}
KTO = {"formatting": "sharegpt", "columns": {"messages": "conversations", "kto_tag": "kto_tag"}}
PT = {"columns": {"prompt": "text"}}


def pair(i: int, history: int = 0, system: str = "") -> dict:
    return {
        "instruction": f"Question {i}: what is {i} plus {i}?",
        "input": "",
        "chosen": f"It is {2 * i}." + " Indeed." * (i % 3),
        "rejected": f"It is {2 * i + 1}, I think." + " Maybe." * (i % 2),
        "system": system,
        "history": [[f"Earlier question {i}.{k}?", f"Earlier answer {i}.{k}."] for k in range(history)],
    }


def kto(i: int, tag=None) -> dict:
    return {
        "conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i}" + "!" * (i % 3)}],
        "kto_tag": (i % 2 == 0) if tag is None else tag,
    }


def build(root: Path, names, kind: str, **options):
    options = {"val_size": 0, "cutoff_len": 100000, "cache_dir": str(root / "cache"), **options}
    cfg = DataConfig(dataset_dir=str(root), datasets=names, **options)
    return build_datasets(cfg, TINY, shuffle_order=False, kind=kind)


def encoder(**options) -> ChatEncoder:
    return ChatEncoder(TINY, TemplateOptions(**{"cutoff_len": 100000, **options}))


def sft_of(prompted: Prompted, reply: str, **options):
    """The SFT encoding of the conversation that ends in `reply` (mask_history: only that reply trained)."""
    conv = Conversation(prompted.conv.system, [*prompted.conv.turns, (prompted.query, reply)], prompted.conv.tools)
    return encoder(mask_history=True, **options).encode(conv)


# ------------------------------------------------------------------------------------------------- formats


def test_each_entry_shape_is_its_kind_and_a_stage_of_another_kind_is_refused_before_loading(tmp_path):
    root = write_datasets(
        tmp_path,
        {
            "pairs": (RANKING, None),  # no files at all: refused by the entry alone
            "share_pairs": (SHAREGPT_RANKING, None),
            "tagged": (KTO, None),
            "texts": (PT, None),
            "raw": ({"file_name": "raw.txt"}, None),
            "raw_lf": ({"file_name": "raw.txt", "columns": {"prompt": "text"}}, None),  # LLaMA-Factory's wiki_demo
            "chats": ({}, None),
        },
    )
    (root / "raw.txt").write_text("one\n", encoding="utf-8")
    specs = load_dataset_info(root)
    kinds = {name: spec.kind for name, spec in specs.items()}
    assert kinds == {
        "pairs": "pairwise",
        "share_pairs": "pairwise",
        "tagged": "kto",
        "texts": "pt",
        "raw": "pt",
        "raw_lf": "pt",
        "chats": "sft",
    }
    info = str(root / "dataset_info.json")
    fits = {"pairs": "dpo", "tagged": "kto", "texts": "pt", "chats": "sft"}
    for name, stage in fits.items():
        for kind, other in (("sft", "sft"), ("pt", "pt"), ("pairwise", "dpo"), ("kto", "kto")):
            if other == stage:
                continue
            with pytest.raises(DataError) as err:
                build(root, [name], kind)
            message = str(err.value)
            assert f"dataset '{name}' ({info})" in message and f"it fits stage={stage}, not stage={other}" in message
    with pytest.raises(DataError) as err:  # every misfit at once, one line each
        build(root, ["pairs", "chats", "tagged"], "pairwise")
    assert str(err.value).count("\n") == 1 and "'chats'" in str(err.value) and "'tagged'" in str(err.value)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"ranking": "yes"}, "ranking must be true or false"),
        ({"ranking": True, "formatting": "telechat"}, "ranking datasets are alpaca or sharegpt"),
        ({"ranking": True, "columns": {"kto_tag": "t"}}, "a ranking dataset has no kto_tag column"),
        ({"sample_by": "line"}, "'sample_by' applies to .txt files only"),
        ({"file_name": "a.txt", "sample_by": "page"}, "sample_by must be one of"),
        ({"file_name": "a.txt", "columns": {"prompt": "body"}}, "a .txt file is raw text"),
        ({"file_name": "a.txt", "formatting": "sharegpt"}, "a .txt file is raw text"),
        ({"file_name": "a.txt", "ranking": True}, "a .txt file is raw text"),
    ],
)
def test_bad_entries_name_the_dataset_and_what_is_wrong(tmp_path, entry, message):
    root = write_datasets(tmp_path, {"d": (entry, None)})
    with pytest.raises(DataError, match=message) as err:
        load_dataset_info(root)
    assert "dataset 'd'" in str(err.value) and "dataset_info.json" in str(err.value)


def test_preference_records_alpaca_and_sharegpt_with_tags_mapped(tmp_path):
    tags = {"role_tag": "role", "content_tag": "text", "user_tag": "u", "assistant_tag": "a", "function_tag": "f"}
    share = {
        "conversations": [
            {"role": "u", "text": "Hello"},
            {"role": "a", "text": "Hi!"},
            {"role": "u", "text": "Weather?"},
        ],
        "chosen": {"role": "f", "text": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        "rejected": {"role": "a", "text": "No idea."},
    }
    root = write_datasets(
        tmp_path,
        {
            "a": (RANKING, [pair(3, history=1, system="Be exact.")]),
            "s": ({**SHAREGPT_RANKING, "tags": tags}, [share]),
        },
    )
    specs = load_dataset_info(root)
    got = to_prompted(specs["a"], pair(3, history=1, system="Be exact."), "here")
    assert got.conv.system == "Be exact." and got.conv.turns == [("Earlier question 3.0?", "Earlier answer 3.0.")]
    assert got.query == "Question 3: what is 3 plus 3?" and got.replies == ["It is 6.", "It is 7, I think. Maybe."]
    got = to_prompted(specs["s"], share, "here")
    assert got.conv.turns == [("Hello", "Hi!")] and got.query == "Weather?"
    assert got.replies[0].startswith("<tool_call>") and '"city": "Paris"' in got.replies[0]
    assert got.replies[1] == "No idea."
    bad_role = {**share, "rejected": {"role": "u", "text": "x"}}
    with pytest.raises(DataError, match="here: chosen|here: rejected: role 'u' is not the assistant's"):
        to_prompted(specs["s"], bad_role, "here")
    ends_with_reply = {**share, "conversations": share["conversations"][:2]}
    with pytest.raises(DataError, match="does not end with the user's message"):
        to_prompted(specs["s"], ends_with_reply, "here")
    with pytest.raises(DataError, match="here: rejected: empty reply"):
        to_prompted(specs["a"], {**pair(1), "rejected": "  "}, "here")


def test_kto_tag_kept_per_example_and_a_non_bool_tag_names_file_and_line(tmp_path):
    root = write_datasets(tmp_path, {"k": ({**KTO, "file_name": "k.jsonl"}, [kto(i) for i in range(5)])})
    train, _, _ = build(root, ["k"], "kto")
    assert [bool(train[i]["kto_tag"]) for i in range(len(train))] == [True, False, True, False, True]
    root = write_datasets(tmp_path / "bad", {"k": ({**KTO, "file_name": "k.jsonl"}, [kto(0), kto(1, tag="yes")])})
    with pytest.raises(DataError, match=r"k\.jsonl line 2: kto_tag is not true or false \(got 'yes'"):
        build(root, ["k"], "kto")
    train, _, report = build(root, ["k"], "kto", on_bad_record="skip")
    assert len(train) == 1 and report["datasets"]["k"]["skipped"] == 1


def test_raw_text_by_line_paragraph_document_and_text_column(tmp_path):
    text = "first line\nsecond line\n\n\nthird, after blanks\nfourth\n"
    root = write_datasets(
        tmp_path,
        {
            "lines": ({"file_name": "t.txt"}, text),
            "paragraphs": ({"file_name": "t.txt", "sample_by": "paragraph"}, None),
            "whole": ({"file_name": "t.txt", "sample_by": "document"}, None),
            "column": ({**PT, "file_name": "c.jsonl"}, [{"text": "first line"}, {"text": "fourth"}]),
            "folder": ({"file_name": "texts"}, None),
        },
    )
    (root / "texts").mkdir()
    (root / "texts" / "a.txt").write_text("first line\n", encoding="utf-8")
    (root / "texts" / "b.txt").write_text("fourth\n", encoding="utf-8")
    enc = encoder()

    def docs(name):
        train, _, report = build(root, [name], "pt")
        assert report["datasets"][name]["records"] == len(train)
        return [train[i]["input_ids"].tolist() for i in range(len(train))], train

    ids = lambda t: [*enc.encode_text(t), END]  # noqa: E731
    lines, train = docs("lines")
    assert lines == [ids("first line"), ids("second line"), ids("third, after blanks"), ids("fourth")]
    assert [int(r) for _, r in train.source[train.index]] == [1, 2, 5, 6]  # line numbers
    assert all(np.array_equal(train[i]["labels"], train[i]["input_ids"]) for i in range(len(train)))  # all trained
    assert docs("paragraphs")[0] == [ids("first line\nsecond line"), ids("third, after blanks\nfourth")]
    assert docs("whole")[0] == [ids(text)]
    assert docs("column")[0] == [ids("first line"), ids("fourth")] == docs("folder")[0]
    mixed = ["a <tool_call> b", "plain"]  # a tool tag is its control id in raw text too, as the tokenizer reads it
    encoded = [([row.tolist() for row in rows], was_split) for rows, was_split in enc.encode_texts(mixed)]
    assert encoded == [([ids(t)], False) for t in mixed] and 9 in ids(mixed[0])
    root = write_datasets(tmp_path / "bad", {"c": ({**PT, "file_name": "c.jsonl"}, [{"text": "a"}, {"text": " "}])})
    with pytest.raises(DataError, match=r"c\.jsonl line 2: empty text"):
        build(root, ["c"], "pt")


# ------------------------------------------------------------------------------------------------ encoding


def test_pair_rows_are_exactly_the_sft_encoding_of_prompt_plus_reply_labels_on_the_reply_only(tmp_path):
    records = [pair(1), pair(2, history=2, system="Be brief."), pair(5, history=1)]
    root = write_datasets(tmp_path, {"p": (RANKING, records)})
    train, _, report = build(root, ["p"], "pairwise")
    spec = load_dataset_info(root)["p"]
    assert len(train) == 3 and report["datasets"]["p"]["examples"] == 3
    for i, record in enumerate(records):
        prompted = to_prompted(spec, record, "here")
        item = train[i]
        for key, reply in zip(("chosen", "rejected"), prompted.replies):
            sft = sft_of(prompted, reply)
            assert item[f"{key}_input_ids"].tolist() == sft.input_ids
            assert item[f"{key}_labels"].tolist() == sft.labels  # mask_history: the last reply alone
            n = int(item["prompt_len"])
            assert item[f"{key}_input_ids"][n - 1] == BOT and item[f"{key}_input_ids"][-1] == END
            assert (item[f"{key}_labels"][:n] == IGNORE).all() and (item[f"{key}_labels"][n:] != IGNORE).all()
    # counts: tokens and trained tokens of both rows
    stats = train.stats()
    assert stats["tokens"] == sum(len(train[i][f"{k}_input_ids"]) for i in range(3) for k in ("chosen", "rejected"))
    assert stats["trained_tokens"] == sum(
        int((train[i][f"{k}_labels"] != IGNORE).sum()) for i in range(3) for k in ("chosen", "rejected")
    )


def test_kto_example_is_the_sft_encoding_of_its_conversation_and_trains_the_completion(tmp_path):
    record = {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "Count to 3."},
            {"from": "gpt", "value": "1, 2, 3."},
        ],
        "kto_tag": False,
    }
    root = write_datasets(tmp_path, {"k": (KTO, [record])})
    train, _, _ = build(root, ["k"], "kto")
    prompted = to_prompted(load_dataset_info(root)["k"], record, "here")
    sft = sft_of(prompted, "1, 2, 3.")
    assert train[0]["input_ids"].tolist() == sft.input_ids and train[0]["labels"].tolist() == sft.labels
    assert train[0]["kto_tag"] == np.False_


def test_truncation_keeps_the_last_turn_drops_older_turns_first_and_cuts_both_replies_alike():
    enc = encoder(cutoff_len=10**6)
    long_reply = " ".join(f"word{k}" for k in range(60))
    prompted = Prompted(
        Conversation("Sys.", [(f"old question {k} " * 6, f"old answer {k} " * 6) for k in range(4)]),
        "the last question?",
        [long_reply, "short no."],
    )
    full = enc.encode_prompted_batch([prompted])[0]
    prefix = enc.system_ids(Conversation("Sys."))
    turns = enc._encode_turns([Conversation("Sys.", prompted.conv.turns)])[0][1]
    turn_size = [u_len + a_len + len(enc.newline) for _, u_len, _, a_len in turns]
    query = [USER, *enc.encode_text("the last question?"), BOT]
    assert full.prompt_len == len(prefix) + sum(turn_size) + len(query) and not full.truncated
    longest = len(full.rows[0][0]) - full.prompt_len

    cutoff = full.prompt_len + longest - turn_size[0] - 5  # a bit more than the oldest turn must go
    budget, _ = infer_seqlen(full.prompt_len, longest, cutoff)
    got = ChatEncoder(TINY, TemplateOptions(cutoff_len=cutoff)).encode_prompted_batch([prompted])[0]
    dropped, size = 0, full.prompt_len
    while size > budget:  # the rule: whole turns, oldest first, until the prompt fits its budget
        size -= turn_size[dropped]
        dropped += 1
    kept = Prompted(Conversation("Sys.", prompted.conv.turns[dropped:]), prompted.query, prompted.replies)
    assert got.truncated and 1 <= dropped < 4 and got.prompt_len == size
    room = cutoff - size
    for row, reply in zip(got.rows, prompted.replies):
        sft = sft_of(kept, reply)
        assert row[0].tolist() == sft.input_ids[: size + room] and row[1].tolist() == sft.labels[: size + room]
        assert len(row[0]) <= cutoff
    assert len(got.rows[0][0]) == cutoff  # the long reply fills the room; the short one keeps all of it
    assert got.rows[1][0].tolist() == sft_of(kept, "short no.").input_ids

    # a tight cutoff: every older turn goes, the system block and the last question stay
    tight = len(prefix) + len(query) + 3
    got = ChatEncoder(TINY, TemplateOptions(cutoff_len=tight)).encode_prompted_batch([prompted])[0]
    assert got.prompt_len == len(prefix) + len(query) and got.rows[0][0][: got.prompt_len].tolist() == prefix + query
    assert [len(ids) for ids, _ in got.rows] == [tight, tight]
    # no room for one reply token: dropped
    assert ChatEncoder(TINY, TemplateOptions(cutoff_len=len(prefix) + len(query))).encode_prompted_batch(
        [prompted]
    ) == [None]


def test_infer_seqlen_budget_split():
    assert infer_seqlen(100, 10, 50) == (40, 10)  # a short reply keeps all of it
    assert infer_seqlen(10, 100, 50) == (10, 40)  # a short prompt keeps all of it
    assert infer_seqlen(60, 40, 50) == (30, 20)  # else in proportion


def test_dropped_pairs_are_counted_in_the_report(tmp_path):
    long_prompt = {**pair(1), "instruction": "question " * 80}
    root = write_datasets(tmp_path, {"p": (RANKING, [pair(2), long_prompt])})
    train, _, report = build(root, ["p"], "pairwise", cutoff_len=40, default_system="")
    assert len(train) == 1 and report["datasets"]["p"]["dropped"] == 1


def test_long_documents_split_into_overlapping_rows_every_token_predicted_once(tmp_path):
    text = " ".join(f"token{k}" for k in range(80))
    root = write_datasets(tmp_path, {"t": ({"file_name": "t.txt"}, text + "\nshort\n")})
    ids = [*encoder().encode_text(text), END]
    cutoff = 32
    train, _, report = build(root, ["t"], "pt", cutoff_len=cutoff)
    rows = [train[i]["input_ids"].tolist() for i in range(len(train) - 1)]
    assert all(len(r) <= cutoff for r in rows) and len(rows) == -(-(len(ids) - 1) // (cutoff - 1))
    predicted = [tok for r in rows for tok in r[1:]]  # the first token of each row predicts nothing
    assert predicted == ids[1:] and rows[0][0] == ids[0]
    assert report["datasets"]["t"]["split"] == 1 and report["datasets"]["t"]["records"] == 2
    assert "1 document(s) longer than data.cutoff_len split" in format_report(report)


def test_packed_documents_never_attend_across_documents(tmp_path):
    root = write_datasets(tmp_path, {"t": ({"file_name": "t.txt"}, "alpha beta\ngamma\ndelta epsilon zeta\n")})
    train, _, _ = build(root, ["t"], "pt", cutoff_len=64)
    packed = PackedDataset(train, 64)
    assert len(packed) == 1
    batch = Collator()([packed[0]])
    positions = batch["position_ids"][0].tolist()
    lengths = [len(train[i]["input_ids"]) for i in packed.rows[0]]
    expected = [p for n in lengths for p in range(n)]
    assert positions == expected  # restarting at every document: the varlen path keeps them apart
    starts = np.cumsum([0, *lengths[:-1]])
    assert all(batch["labels"][0, s].item() == IGNORE for s in starts)  # no document predicts the next one's start
    assert int((batch["labels"] != IGNORE).sum()) == sum(n - 1 for n in lengths)


# --------------------------------------------------------------------------------------------- batches


def _pairs_root(tmp_path, n=10):
    return write_datasets(tmp_path, {"p": (RANKING, [pair(i, history=i % 2) for i in range(n)])})


def test_pair_batch_is_chosen_rows_then_rejected_rows_of_the_same_pairs(tmp_path):
    train, _, _ = build(_pairs_root(tmp_path), ["p"], "pairwise")
    items = [train[i] for i in (3, 0, 7)]
    batch = Collator(kind="pairwise")(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape[0] == 6
    for row, (it, key) in enumerate([(it, k) for k in ("chosen", "rejected") for it in items]):
        n = len(it[f"{key}_input_ids"])
        assert batch["input_ids"][row, :n].tolist() == it[f"{key}_input_ids"].tolist()
        assert batch["labels"][row, :n].tolist() == it[f"{key}_labels"].tolist()
        assert batch["attention_mask"][row].sum() == n and (batch["input_ids"][row, n:] == PAD_ID).all()
        assert (batch["labels"][row, n:] == IGNORE).all()


def test_kto_kl_rows_pair_each_prompt_with_the_previous_examples_completion(tmp_path):
    root = write_datasets(tmp_path, {"k": (KTO, [kto(i) for i in range(4)])})
    train, _, _ = build(root, ["k"], "kto")
    items = [train[i] for i in range(4)]
    batch = Collator(kind="kto", cutoff_len=1000)(items)
    assert batch["kto_desirable"].tolist() == [True, False, True, False]
    assert batch["kl_input_ids"].shape == batch["input_ids"].shape
    for i, it in enumerate(items):
        other = items[(i - 1) % 4]
        p, q = int(it["prompt_len"]), int(other["prompt_len"])
        expected = it["input_ids"][:p].tolist() + other["input_ids"][q:].tolist()
        n = len(expected)
        assert batch["kl_input_ids"][i, :n].tolist() == expected and batch["kl_attention_mask"][i].sum() == n
        assert batch["kl_labels"][i, :n].tolist() == [IGNORE] * p + other["labels"][q:].tolist()
        assert batch["labels"][i, : len(it["labels"])].tolist() == it["labels"].tolist()
    cut = Collator(kind="kto", cutoff_len=int(items[1]["prompt_len"]) + 1)([items[0], items[1]])
    assert int(cut["kl_attention_mask"][1].sum()) == int(items[1]["prompt_len"]) + 1  # cut to cutoff_len


def _datamodule(root, kind, **options) -> TelechatDataModule:
    options = {"val_size": 0, "batch_size": 2, "cache_dir": str(root / "cache"), **options}
    dm = TelechatDataModule(DataConfig(dataset_dir=str(root), datasets=["p"], **options), TINY, kind=kind)
    dm.setup()
    return dm


def _fake_trainer(batch_idx: int, accumulate: int, batches: int):
    epoch_loop = SimpleNamespace(batch_idx=batch_idx)
    return SimpleNamespace(
        training=True,
        fit_loop=SimpleNamespace(epoch_loop=epoch_loop),
        accumulate_grad_batches=accumulate,
        num_training_batches=batches,
        current_epoch=0,
    )


def test_step_examples_count_the_pairs_of_the_whole_accumulated_step(tmp_path):
    dm = _datamodule(_pairs_root(tmp_path, 11), "pairwise", batch_size=2)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 4, 4, 4, 2]  # 11 pairs: the last batch has one
    expected = [6, 6, 6, 5, 5, 5]  # accumulate 3: steps of 3 batches (6 pairs), the last of 5 pairs
    for k in range(6):
        dm.trainer = _fake_trainer(k - 1, 3, 6)  # Lightning's batch_idx before the batch is counted
        got = dm.on_before_batch_transfer({}, 0)
        assert set(got) == {"step_examples"} and got["step_examples"].item() == expected[k]
    # two ranks: each step counts the pairs of both (the sampler pads 11 to 12 by repetition)
    dm.sampler = type(dm.sampler)(len(dm.train_set), dm.cfg.seed, rank=0, world=2)
    dm._targets = None
    assert dm.targets_in_batches(0, 0, 2) == 8 and dm.targets_in_batches(0, 2, 3) == 4
    sft_like = _datamodule(write_datasets(tmp_path / "t", {"p": ({"file_name": "t.txt"}, "a b\nc\n")}), "pt")
    sft_like.train_dataloader()
    sft_like.trainer = _fake_trainer(-1, 1, 1)
    got = sft_like.on_before_batch_transfer({}, 0)
    assert set(got) == {"step_targets"} and got["step_targets"].item() == sft_like.train_set.targets().sum()


def test_resume_mid_epoch_yields_the_same_remaining_pair_batches(tmp_path):
    root = _pairs_root(tmp_path, 9)
    first = _datamodule(root, "pairwise")
    batches = list(first.train_dataloader())
    resumed = _datamodule(root, "pairwise")
    resumed.load_state_dict({"epoch": 0, "epoch_batches_done": 2, "data_fingerprint": first.report["fingerprint"]})
    rest = list(resumed.train_dataloader())
    assert len(rest) == len(batches) - 2
    for a, b in zip(rest, batches[2:]):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "labels"))


def test_validation_split_keeps_pairs_whole(tmp_path):
    root = _pairs_root(tmp_path, 20)
    cfg = DataConfig(dataset_dir=str(root), datasets=["p"], val_size=0.25, cache_dir=str(root / "cache"))
    train, val, report = build_datasets(cfg, TINY, kind="pairwise")
    assert len(val) == 5 and len(train) == 15 and report["val"]["examples"] == 5
    records = sorted(int(r) for _, r in np.concatenate([train.source[train.index], val.source[val.index]]))
    assert records == list(range(20))
    for ds in (train, val):
        for i in range(len(ds)):
            n = int(ds[i]["prompt_len"])
            assert np.array_equal(ds[i]["chosen_input_ids"][:n], ds[i]["rejected_input_ids"][:n])


# ------------------------------------------------------------------------------------------------- cache


def test_cache_keyed_by_kind_and_checked_for_pairs(tmp_path, caplog):
    records = [{"instruction": f"Say {i}", "output": f"{i}."} for i in range(4)]
    root = write_datasets(tmp_path, {"d": ({}, records)})
    sft, _, report = build(root, ["d"], "sft")
    assert not report["datasets"]["d"].get("cached")
    info = json.loads((root / "dataset_info.json").read_text())
    info["d"]["columns"] = {"prompt": "instruction"}  # the same file read as raw text
    (root / "dataset_info.json").write_text(json.dumps(info))
    pt, _, report = build(root, ["d"], "pt")
    assert not report["datasets"]["d"].get("cached")
    assert pt[0]["input_ids"].tolist() == [*encoder().encode_text("Say 0"), END]
    assert build(root, ["d"], "pt")[2]["datasets"]["d"].get("cached")

    proot = _pairs_root(tmp_path / "pairs", 3)
    first = build(proot, ["p"], "pairwise")[0][0]  # read now: the cache's files are altered in place below
    (cache,) = (proot / "cache" / "datasets").glob("p-*")
    arrays = cache_arrays(cache)
    starts = arrays["offsets"][:-1]
    arrays["tokens"][starts[1]] = (arrays["tokens"][starts[1]] + 1) % 100  # the rejected row's prompt differs
    rewrite_cache(cache, tokens=arrays["tokens"])
    with caplog.at_level(logging.WARNING):
        again, _, report = build(proot, ["p"], "pairwise")
    assert "prompt is trained or differs between the rows" in caplog.text and not report["datasets"]["p"].get("cached")
    assert all(np.array_equal(again[0][k], first[k]) for k in first)


# ------------------------------------------------------------------------------------- inspect and config


def test_inspect_shows_and_writes_chosen_and_rejected(tmp_path):
    root = _pairs_root(tmp_path, 3)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "telechat_lab.data.inspect",
            "stage=dpo",
            f"data.dataset_dir={root}",
            "data.datasets=[p]",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"output={out}",
            "show=1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "p record 0 chosen" in result.stdout and "p record 0 rejected" in result.stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    train, _, _ = build(root, ["p"], "pairwise")
    assert len(lines) == 3
    for i, line in enumerate(lines):
        keys = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "prompt_len"]
        assert list(line) == keys
        assert all(line[k] == np.asarray(train[i][k]).tolist() for k in keys)


def test_config_refuses_packing_and_small_kto_batches_for_preference_stages(tmp_path):
    def problems(*overrides):
        return config_problems(compose_train(list(overrides), tmp_path), cuda_available=False)

    assert not [p for p in problems("stage=dpo") if "stage=" in p]
    packing = problems("stage=dpo", "data.packing=true")
    assert "data.packing=true with stage=dpo: its sequences are padded batches; set it false" in packing
    assert any("data.padding_free=true with stage=kto" in p for p in problems("stage=kto", "data.padding_free=true"))
    assert any("data.batch_size=1 with stage=kto" in p for p in problems("stage=kto", "data.batch_size=1"))
    assert not [p for p in problems("stage=pt", "data.packing=true") if "stage=" in p]
    with pytest.raises(ConfigError, match="pairwise data are padded batches"):  # the data module, used directly
        _datamodule(_pairs_root(tmp_path / "d", 2), "pairwise", packing=True)


def test_each_stage_composes_with_its_demo_data_and_the_command_line_wins(tmp_path):
    assert list(compose_train(["stage=dpo"]).data.datasets) == ["dpo_demo", "dpo_sharegpt_demo"]
    assert list(compose_train(["stage=kto"]).data.datasets) == ["kto_demo"]
    assert list(compose_train(["stage=pt"]).data.datasets) == ["pt_demo", "pt_jsonl_demo"]
    assert "identity" in compose_train(["stage=sft"]).data.datasets and compose_train([]).stage.name == "sft"
    assert list(compose_train(["stage=dpo", "data.datasets=[kto_demo]"]).data.datasets) == ["kto_demo"]
    cfg = compose_train(["stage=dpo"])
    assert cfg.stage.name == "dpo"


def test_demo_datasets_of_each_stage_build(tmp_path):
    def demo(names, kind):
        cfg = DataConfig(dataset_dir=str(DEMO_DATA), datasets=names, val_size=0, cache_dir=str(tmp_path))
        return build_datasets(cfg, TINY, shuffle_order=False, kind=kind)

    pairs, _, report = demo(["dpo_demo", "dpo_sharegpt_demo"], "pairwise")
    assert len(pairs) == 60 and report["dropped"] == report["skipped"] == 0
    chinese = sum(any("\u4e00" <= ch <= "\u9fff" for ch in json.dumps(r, ensure_ascii=False)) for r in _demo("dpo"))
    assert 15 <= chinese <= 45  # Chinese and English
    kto_set, _, _ = demo(["kto_demo"], "kto")
    tags = [bool(kto_set[i]["kto_tag"]) for i in range(len(kto_set))]
    assert len(tags) == 40 and sum(tags) == 20
    texts, _, report = demo(["pt_demo", "pt_jsonl_demo"], "pt")
    assert report["datasets"]["pt_demo"]["records"] == 30 and len(texts) == 36
    size = sum(p.stat().st_size for p in DEMO_DATA.iterdir() if p.name.startswith(("dpo_", "kto_", "pt_")))
    assert size < 100_000


def _demo(prefix: str) -> list:
    return [r for p in sorted(DEMO_DATA.glob(f"{prefix}_*.json")) for r in json.loads(p.read_text(encoding="utf-8"))]


def test_pairs_encode_alike_in_parallel_and_mix_and_pad_shards_as_whole_pairs(tmp_path):
    from telechat_lab.training.datamodule import EvenShards

    root = _pairs_root(tmp_path, 80)
    serial, _, _ = build(root, ["p"], "pairwise", cache_dir=str(tmp_path / "c1"))
    parallel, _, _ = build(root, ["p"], "pairwise", cache_dir=str(tmp_path / "c2"), preprocessing_num_workers=2)
    assert len(serial) == len(parallel) == 80
    assert all(all(np.array_equal(serial[i][k], parallel[i][k]) for k in serial[i]) for i in range(80))
    mixed, _, report = build(root, ["p"], "pairwise", mix={"p": 1.5})
    assert len(mixed) == 120 and report["datasets"]["p"]["examples"] == 120
    shards = EvenShards(serial.subset(np.arange(3)), world=2)
    assert len(shards) == 4
    filler = shards[3]
    assert (filler["chosen_labels"] == IGNORE).all() and (filler["rejected_labels"] == IGNORE).all()
    assert np.array_equal(filler["chosen_input_ids"], serial[0]["chosen_input_ids"])

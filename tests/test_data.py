"""Tests of telechat_lab.data: dataset_info.json and its files, the TeleChat2 encoding (against the golden cases
and the tokenizer's own chat template), truncation, mixing and splitting, packing, parallel encoding, the on-disk
cache, the inspect command and the errors bad input raises.

The real tokenizer, the golden cases and the release's demo data come from ../shared (`shared_path` skips the
tests that need them where it is absent); everything else uses the tiny tokenizer shipped in the package.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path
from helpers import record_to_chat, with_system

from telechat_lab.config import config_problems
from telechat_lab.data import DataConfig, DataError, DatasetSpec, build_datasets, format_report, load_dataset_info
from telechat_lab.data import pipeline as pipeline_mod
from telechat_lab.data import preprocess as preprocess_mod
from telechat_lab.data.encoder import BOT, IGNORE, USER, ChatEncoder, TemplateOptions
from telechat_lab.data.formats import to_conversation
from telechat_lab.data.packing import PAD_ID, Collator, PackedDataset
from telechat_lab.tokenizer import TINY_TOKENIZER_PATH, load_tokenizer

TINY = TINY_TOKENIZER_PATH

# The two dataset_info.json entries of the issue, exactly as written (plus the file name).
ALPACA_ENTRY = {
    "columns": {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "system": "system",
        "history": "history",
    }
}
SHAREGPT_ENTRY = {
    "formatting": "sharegpt",
    "columns": {"messages": "conversations", "system": "system", "tools": "tools"},
    "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "user", "assistant_tag": "assistant"},
}

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def alpaca(i: int, history: int = 0, system: str = "", input_: str = "") -> dict:
    return {
        "instruction": f"Question number {i}: what is {i} plus {i}?",
        "input": input_,
        "output": f"It is {2 * i}." + " Indeed." * (i % 4),
        "system": system,
        "history": [[f"Earlier question {i}.{k}?", f"Earlier answer {i}.{k}."] for k in range(history)],
    }


def write_datasets(root: Path, datasets: dict[str, tuple[dict, object]]) -> Path:
    """`datasets`: name -> (dataset_info entry without file_name, content); the content is a list of records
    (written as a JSON list, or JSON lines for a .jsonl name) or raw text; the file is `<name>.json` unless the
    entry gives `file_name`."""
    root.mkdir(parents=True, exist_ok=True)
    info = {}
    for name, (entry, content) in datasets.items():
        entry = {"file_name": f"{name}.json", **entry}
        info[name] = entry
        path = root / entry["file_name"]
        if content is None:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        elif path.suffix == ".jsonl":
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content), encoding="utf-8")
        else:
            path.write_text(json.dumps(content, ensure_ascii=False, indent=1), encoding="utf-8")
    (root / "dataset_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return root


def build(root: Path, names, tokenizer=TINY, **options):
    """(train, val, report) in dataset order, no validation split unless asked."""
    options = {"val_size": 0, "cutoff_len": 100000, "cache_dir": str(root / "cache"), **options}
    return build_datasets(DataConfig(dataset_dir=str(root), datasets=names, **options), tokenizer, shuffle_order=False)


def examples(ds) -> list[tuple[list[int], list[int]]]:
    return [(ds[i]["input_ids"].tolist(), ds[i]["labels"].tolist()) for i in range(len(ds))]


def sources(ds) -> list[tuple[str, int]]:
    return [(ds.names[d], int(r)) for d, r in ds.source[ds.index]]


def oracle(tok, record: dict, info: dict, *, train_on_prompt=False, mask_history=False, default_system=None):
    """(input_ids, labels) from the tokenizer's chat template: the trained tokens are its generation spans."""
    system, messages, tools = record_to_chat(record, info)
    out = tok.apply_chat_template(
        with_system(system, messages),
        tools=tools,
        default_system=default_system,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if train_on_prompt:
        mask = [1] * len(mask)
    elif mask_history:
        last_start = max(i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
        mask = [int(i >= last_start and m) for i, m in enumerate(mask)]
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]


@pytest.fixture(scope="module")
def tiny_tok():
    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def real_model_file() -> Path:
    return shared_path("telechat2", "tokenizer.model")


@pytest.fixture(scope="module")
def golden_cases() -> list[dict]:
    path = shared_path("golden", "template", "cases.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# dataset_info.json and files
# ----------------------------------------------------------------------------------------------------------------


def test_alpaca_entry_as_written_matches_chat_template(tmp_path, tiny_tok):
    records = [alpaca(1), alpaca(2, history=2, system="You are terse."), alpaca(3, input_="Some context.")]
    root = write_datasets(tmp_path, {"dataset_name": (ALPACA_ENTRY, records)})
    spec = load_dataset_info(root)["dataset_name"]
    assert spec.formatting == "alpaca" and spec.path == (root / "dataset_name.json").resolve()
    train, _, report = build(root, ["dataset_name"])
    assert examples(train) == [oracle(tiny_tok, r, ALPACA_ENTRY) for r in records]
    assert report["datasets"]["dataset_name"]["examples"] == 3
    # history turns are trained too (3 replies in the record with 2 history turns)
    assert sum(1 for t in train[1]["labels"].tolist() if t == 2) == 3  # three trained <_end>


def test_sharegpt_entry_as_written_matches_chat_template(tmp_path, tiny_tok):
    records = [
        {
            "conversations": [
                {"from": "user", "value": "Hi there"},
                {"from": "assistant", "value": "Hello!"},
                {"from": "user", "value": "Weather in Paris?"},
                {"from": "assistant", "value": "Sunny."},
            ],
            "system": "Be kind.",
        },
        {
            "conversations": [{"from": "user", "value": "Only a question"}, {"from": "assistant", "value": "Answer"}],
            "tools": json.dumps([WEATHER_TOOL]),
        },
    ]
    root = write_datasets(tmp_path, {"dataset_name": (SHAREGPT_ENTRY, records)})
    train, _, _ = build(root, ["dataset_name"])
    assert examples(train) == [oracle(tiny_tok, r, SHAREGPT_ENTRY) for r in records]


def test_file_types_and_folder_give_the_same_examples(tmp_path):
    records = [{k: v for k, v in alpaca(i, input_="ctx" if i % 2 else "").items() if k != "history"} for i in range(6)]
    (tmp_path / "src").mkdir()
    with open(tmp_path / "src" / "d.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    root = write_datasets(
        tmp_path / "src",
        {
            "as_json": ({"file_name": "d.json"}, records),
            "as_jsonl": ({"file_name": "d.jsonl"}, records),
            "as_csv": ({"file_name": "d.csv"}, None),
            "as_folder": ({"file_name": "parts"}, None),
        },
    )
    (root / "parts").mkdir()  # a folder of files: read in name order, whatever their types
    (root / "parts" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]), encoding="utf-8")
    (root / "parts" / "b.json").write_text(json.dumps(records[2:4]), encoding="utf-8")
    (root / "parts" / "c").mkdir()
    (root / "parts" / "c" / "d.json").write_text(json.dumps(records[4:]), encoding="utf-8")
    (root / "parts" / "notes.txt").write_text("ignored", encoding="utf-8")

    built = {name: build(root, [name]) for name in ("as_json", "as_jsonl", "as_csv", "as_folder")}
    reference = examples(built["as_json"][0])
    assert len(reference) == 6
    for name, (train, _, report) in built.items():
        assert examples(train) == reference, name
        assert report["datasets"][name]["records"] == 6
    # the record index is the 0-based record of a JSON list, the 1-based line of jsonl/csv
    assert [r for _, r in sources(built["as_json"][0])] == list(range(6))
    assert [r for _, r in sources(built["as_jsonl"][0])] == list(range(1, 7))
    assert [r for _, r in sources(built["as_csv"][0])] == list(range(2, 8))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    records = [{k: v for k, v in alpaca(i).items() if k != "history"} for i in range(4)]
    root = write_datasets(tmp_path, {"pq": ({"file_name": "d.parquet"}, None), "js": ({}, records)})
    pq.write_table(pa.Table.from_pylist(records), root / "d.parquet")
    assert examples(build(root, ["pq"])[0]) == examples(build(root, ["js"])[0])


def test_parquet_without_pyarrow_names_pyarrow(tmp_path, monkeypatch):
    root = write_datasets(tmp_path, {"pq": ({"file_name": "d.parquet"}, "not read")})
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="pyarrow") as err:
        build(root, ["pq"])
    assert "dataset 'pq'" in str(err.value) and "d.parquet" in str(err.value)


def test_num_samples_subsets_or_repeats_every_record(tmp_path):
    records = [alpaca(i) for i in range(10)]
    root = write_datasets(
        tmp_path,
        {
            "down": ({"file_name": "d.json", "num_samples": 4}, records),
            "up": ({"file_name": "d.json", "num_samples": 25}, None),
        },
    )
    train, _, report = build(root, ["down", "up"])
    counts = Counter(sources(train))
    down = {r: c for (n, r), c in counts.items() if n == "down"}
    up = {r: c for (n, r), c in counts.items() if n == "up"}
    assert sum(down.values()) == 4 and set(down.values()) == {1}  # a subset, no repeats
    assert sum(up.values()) == 25 and set(up) == set(range(10))  # every record at least once
    assert report["datasets"]["down"]["examples"] == 4 and report["datasets"]["up"]["examples"] == 25


def test_only_the_entries_used_are_checked(tmp_path):
    """LLaMA-Factory's own dataset_info.json holds hub and preference datasets: unused, they are left alone."""
    root = write_datasets(
        tmp_path,
        {
            "local": (ALPACA_ENTRY, [alpaca(1)]),
            "alpaca_en": ({"hf_hub_url": "llamafactory/alpaca_en"}, None),
            "dpo_en_demo": ({"file_name": "dpo_en_demo.json", "ranking": True}, None),
        },
    )
    info = json.loads((root / "dataset_info.json").read_text())
    del info["alpaca_en"]["file_name"]
    (root / "dataset_info.json").write_text(json.dumps(info))
    assert len(build(root, ["local"])[0]) == 1
    with pytest.raises(DataError, match="dataset 'alpaca_en': 'hf_hub_url' datasets are not supported"):
        build(root, ["local", "alpaca_en"])
    with pytest.raises(DataError, match=r"dataset 'dpo_en_demo' \(.*\) holds preference pairs.* fits stage=dpo, not "):
        build(root, ["dpo_en_demo"])  # refused before its (missing) file is read
    with pytest.raises(DataError, match="dataset 'alpaca_en'"):
        load_dataset_info(root)  # every entry, when asked for all


def test_dataset_names_as_list_or_comma_string(tmp_path):
    root = write_datasets(tmp_path, {"a": ({}, [alpaca(1)]), "b": ({}, [alpaca(2), alpaca(3)])})
    assert pipeline_mod.dataset_names(DataConfig(datasets=" a, b ,")) == ["a", "b"]
    as_list, _, report = build(root, ["a", "b"])
    as_string, _, _ = build(root, "a,b")
    assert list(report["datasets"]) == ["a", "b"]
    assert examples(as_string) == examples(as_list) and len(as_list) == 3
    assert sources(as_string) == [("a", 0), ("b", 0), ("b", 1)]


# ----------------------------------------------------------------------------------------------------------------
# golden cases (real tokenizer)
# ----------------------------------------------------------------------------------------------------------------


def _golden_root(tmp_path: Path, cases: list[dict]) -> Path:
    return write_datasets(tmp_path, {c["id"]: (c["dataset_info"], [c["record"]]) for c in cases})


GOLDEN_FLAGS = ("mask_history", "train_on_prompt", "train_role_tokens")  # each maps to data.<flag>


def golden_groups(cases: list[dict]) -> dict[tuple[bool, ...], list[dict]]:
    """The golden cases grouped by their options (one build per group)."""
    groups: dict[tuple[bool, ...], list[dict]] = {}
    for case in cases:
        groups.setdefault(tuple(bool(case.get(flag)) for flag in GOLDEN_FLAGS), []).append(case)
    return groups


def test_golden_cases_through_the_pipeline(tmp_path, golden_cases, real_model_file):
    real_tok = load_tokenizer(real_model_file)
    root = _golden_root(tmp_path, golden_cases)
    checked = 0
    for flags, cases in golden_groups(golden_cases).items():
        train, _, report = build(
            root, [c["id"] for c in cases], tokenizer=real_model_file, **dict(zip(GOLDEN_FLAGS, flags))
        )
        assert report["dropped"] == 0 and report["truncated"] == 0
        for case, (ids, labels) in zip(cases, examples(train), strict=True):
            assert ids == case["expected"]["input_ids"], case["id"]
            assert labels == case["expected"]["labels"], case["id"]
            # the prompt part (up to the last <_bot>) is what the tokenizer's template sends for generation
            system, messages, tools = record_to_chat(case["record"], case["dataset_info"])
            chat = with_system(system, messages)
            assert chat[-1]["role"] == "assistant"
            prompt = real_tok.apply_chat_template(chat[:-1], tools=tools, add_generation_prompt=True)["input_ids"]
            last_bot = len(ids) - 1 - ids[::-1].index(BOT)
            assert ids[: last_bot + 1] == prompt == case["expected"]["generation_prompt_ids"], case["id"]
            checked += 1
    assert checked == len(golden_cases) >= 11
    assert {"telechat_tool_tags", "release_role_tokens"} <= {c["id"] for c in golden_cases}


def _run_inspect(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "telechat_lab.data.inspect", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_inspect_cli_reproduces_golden_cases(tmp_path, golden_cases, real_model_file):
    # inspection needs only the tokenizer: a directory holding tokenizer.model and nothing else
    tok_dir = tmp_path / "tokenizer_only"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.model").write_bytes(real_model_file.read_bytes())
    root = _golden_root(tmp_path / "data", golden_cases)
    checked = 0
    for flags, cases in golden_groups(golden_cases).items():
        out = tmp_path / "out" / f"encoded-{checked}.jsonl"
        options = [f"data.{flag}={str(on).lower()}" for flag, on in zip(GOLDEN_FLAGS, flags)]
        result = _run_inspect(
            tmp_path,
            f"model.path={tok_dir}",
            f"data.dataset_dir={root}",
            f"data.datasets=[{','.join(c['id'] for c in cases)}]",
            "data.cutoff_len=100000",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"output={out}",
            *options,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert len(lines) == len(cases)
        for case, line in zip(cases, lines):
            expected = {"input_ids": case["expected"]["input_ids"], "labels": case["expected"]["labels"]}
            assert line == expected, case["id"]
        # the counts: records, examples, tokens, trained tokens, truncated, dropped, skipped
        rows = re.findall(r"^(\w+)" + r"\s+([\d,]+)" * 7 + r"\s*$", result.stdout, re.M)
        assert rows, result.stdout[-3000:]
        total = rows[-1][1:]  # the total row (or the one dataset's)
        tokens = sum(len(c["expected"]["input_ids"]) for c in cases)
        trained = sum(t != IGNORE for c in cases for t in c["expected"]["labels"])
        assert [int(g.replace(",", "")) for g in total] == [len(cases), len(cases), tokens, trained, 0, 0, 0]
        assert f"wrote {len(cases)} examples" in result.stdout
        checked += len(cases)
    assert checked == len(golden_cases)


def test_inspect_cli_bad_input_exits_nonzero(tmp_path, tiny_dir):
    good = json.dumps({"system": "", "dialog": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]})
    root = write_datasets(
        tmp_path / "data",
        {
            "broken": (
                {"file_name": "broken.jsonl", "formatting": "telechat"},
                good + "\n" + good + '\n{"system": oops\n',
            )
        },
    )
    result = _run_inspect(
        tmp_path,
        f"model.path={tiny_dir}",
        f"data.dataset_dir={root}",
        "data.datasets=[broken]",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"output={tmp_path / 'out.jsonl'}",
    )
    assert result.returncode == 2  # a user error: one message, no traceback
    message = result.stdout + result.stderr
    assert "Traceback" not in message and message.startswith("error: dataset 'broken'")
    assert "broken.jsonl line 3" in message and "malformed JSON" in message
    assert not (tmp_path / "out.jsonl").exists()


# ----------------------------------------------------------------------------------------------------------------
# mixing, max_samples, validation split
# ----------------------------------------------------------------------------------------------------------------


def test_mix_ratios_of_the_release_demo(tmp_path, real_model_file):
    demo = shared_path("data", "telechat2_sft_demo")
    ratios = json.loads((demo / "mix_ratios.json").read_text(encoding="utf-8"))
    files = ["demo_math.jsonl", "demo_role.jsonl", "demo_code.jsonl"]  # the small ones: 1.78, 1.24, 1.0
    names = [f.removesuffix(".jsonl") for f in files]
    root = write_datasets(
        tmp_path, {n: ({"file_name": str(demo / f), "formatting": "telechat"}, None) for n, f in zip(names, files)}
    )
    mix = {n: ratios[f] for n, f in zip(names, files)}

    def mixed(seed):
        train, _, report = build(root, names, tokenizer=real_model_file, mix=mix, seed=seed)
        return train, report

    train, report = mixed(1)
    counts = Counter(sources(train))
    for name in names:
        n = report["datasets"][name]["records"]
        assert report["datasets"][name]["dropped"] == 0
        whole, frac = int(mix[name]), mix[name] - int(mix[name])
        per_record = [counts[(name, r)] for (d, r) in counts if d == name]
        assert len(per_record) == n  # every example at least once
        assert sum(per_record) == report["datasets"][name]["examples"] == whole * n + round(frac * n)
        assert Counter(per_record) == Counter(
            {whole: n - round(frac * n), whole + 1: round(frac * n)} if frac else {whole: n}
        )
    assert report["datasets"]["demo_math"]["examples"] == 50 + 39  # ratio 1.78 of 50
    again, _ = mixed(1)
    other, _ = mixed(2)
    assert sources(again) == sources(train)
    assert sources(other) != sources(train) and len(other) == len(train)


def test_max_samples_takes_the_first_records(tmp_path):
    root = write_datasets(
        tmp_path,
        {"a": ({"file_name": "a.jsonl"}, [alpaca(i) for i in range(10)]), "b": ({}, [alpaca(i) for i in range(2)])},
    )
    train, _, report = build(root, ["a", "b"], max_samples=3)
    assert sources(train) == [("a", 1), ("a", 2), ("a", 3), ("b", 0), ("b", 1)]
    assert report["datasets"]["a"]["records"] == 3 and report["datasets"]["b"]["records"] == 2


def test_val_size_fraction_and_count_seeded(tmp_path):
    root = write_datasets(
        tmp_path, {"a": ({}, [alpaca(i) for i in range(30)]), "b": ({}, [alpaca(i) for i in range(30, 40)])}
    )

    def split(val_size, seed):
        cfg = DataConfig(
            dataset_dir=str(root), datasets=["a", "b"], val_size=val_size, seed=seed, cache_dir=str(tmp_path / "cache")
        )
        train, val, report = build_datasets(cfg, TINY)
        return train, val, report

    train, val, report = split(0.25, 3)
    assert (len(train), len(val)) == (30, 10)
    assert report["train"]["examples"] == 30 and report["val"]["examples"] == 10
    everything = sorted(sources(train) + sources(val))
    assert everything == sorted([("a", i) for i in range(30)] + [("b", i) for i in range(10)])  # disjoint, complete
    train2, val2, _ = split(0.25, 3)
    assert sources(train2) == sources(train) and sources(val2) == sources(val)
    assert examples(val2) == examples(val)
    _, val3, _ = split(0.25, 4)
    assert set(sources(val3)) != set(sources(val))
    train7, val7, _ = split(7, 3)
    assert (len(train7), len(val7)) == (33, 7)
    with pytest.raises(DataError, match="val_size"):
        split(40, 3)


# ----------------------------------------------------------------------------------------------------------------
# encoding options
# ----------------------------------------------------------------------------------------------------------------


def test_default_system_none_empty_and_custom(tmp_path, tiny_tok):
    records = [alpaca(1), alpaca(2, system="Record's own system.")]
    root = write_datasets(tmp_path, {"d": ({}, records)})
    results = {}
    for default_system in (None, "", "Custom default."):
        train, _, _ = build(root, ["d"], default_system=default_system)
        results[default_system] = examples(train)
        assert results[default_system] == [oracle(tiny_tok, r, {}, default_system=default_system) for r in records]
    # None: TeleChat's default system block; "": no <_system> at all; a record's own system always wins
    assert results[None][0][0][0] == 6 and results[""][0][0][0] == 4
    assert results["Custom default."][0][0][:3] == [
        6,
        *tiny_tok("Custom default.", add_special_tokens=False)["input_ids"][:2],
    ]
    assert results[None][1] == results[""][1] == results["Custom default."][1]
    assert len({tuple(results[k][0][0]) for k in results}) == 3


def test_tools_and_tool_roles(tmp_path, tiny_tok):
    info = {"formatting": "sharegpt"}
    call = {"name": "get_weather", "arguments": {"city": "杭州"}}
    records = [
        {
            "conversations": [  # a call, its result, the answer, then a plain turn; tools as a JSON string
                {"from": "human", "value": "Weather in Hangzhou?"},
                {"from": "function_call", "value": json.dumps(call)},  # ASCII-escaped: rendered as the template does
                {"from": "observation", "value": json.dumps({"temperature": 18})},
                {"from": "gpt", "value": "18 degrees."},
                {"from": "human", "value": "Thanks"},
                {"from": "gpt", "value": "Welcome"},
            ],
            "system": "Tool user.",
            "tools": json.dumps([WEATHER_TOOL]),
        },
        {
            "conversations": [  # two calls at once, two results; tools as a list, default system
                {"from": "human", "value": "Paris and Rome?"},
                {
                    "from": "function_call",
                    "value": json.dumps(
                        [
                            {"name": "get_weather", "arguments": {"city": "Paris"}},
                            {"name": "get_weather", "arguments": {"city": "Rome"}},
                        ]
                    ),
                },
                {"from": "observation", "value": "sunny"},
                {"from": "observation", "value": "rainy"},
                {"from": "gpt", "value": "Sunny in Paris, rainy in Rome."},
            ],
            "tools": [{"type": "function", "function": WEATHER_TOOL}],
        },
    ]
    root = write_datasets(tmp_path, {"tools": (info, records)})
    for default_system in (None, ""):
        train, _, _ = build(root, ["tools"], default_system=default_system)
        got = examples(train)
        assert got == [oracle(tiny_tok, r, info, default_system=default_system) for r in records]
    text = tiny_tok.decode(got[0][0])
    assert "# 可用工具" in text and '"name": "get_weather"' in text and '"city": "杭州"' in text
    # the tags are the control ids 9-12 (in the tools block of the system prompt too), and decode back
    assert '<_bot><tool_call>\n{"name": "get_weather", "arguments": {"city": "杭州"}}\n</tool_call><_end>' in text
    assert '<_user><tool_response>\n{"temperature": 18}\n</tool_response><_bot>' in text
    assert Counter(got[0][0])[9] == 3 and Counter(got[0][0])[12] == 1  # 2 in the tools block, 1 call; 1 result
    assert text.index("Tool user.") < text.index("# 可用工具")
    trained = tiny_tok.decode([t for t in got[1][1] if t != IGNORE])
    assert trained.count("<tool_call>") == 2 and "tool_response" not in trained


def test_train_role_tokens_in_every_format_with_mask_history_and_packing(tmp_path):
    telechat = {
        "system": "S.",
        "dialog": [
            {"role": "user", "content": "u1"},
            {"role": "bot", "content": "b1"},
            {"role": "user", "content": "u2"},
            {"role": "bot", "content": "b2"},
        ],
    }
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
            {"from": "human", "value": "q2"},
            {"from": "gpt", "value": "a2"},
        ]
    }
    root = write_datasets(
        tmp_path,
        {
            "a": ({}, [alpaca(3, history=2, system="S."), alpaca(4)]),
            "s": ({"formatting": "sharegpt"}, [sharegpt]),
            "t": ({"formatting": "telechat", "file_name": "t.jsonl"}, [telechat]),
        },
    )
    for mask_history in (False, True):
        plain = examples(build(root, ["a", "s", "t"], mask_history=mask_history)[0])
        train = build(root, ["a", "s", "t"], mask_history=mask_history, train_role_tokens=True)[0]
        roles = examples(train)
        for (ids, labels), (role_ids, role_labels) in zip(plain, roles, strict=True):
            assert role_ids == ids
            expected = list(labels)  # each trained reply's <_bot>, and the <_user> that opens its turn
            starts = [i for i in range(1, len(labels)) if labels[i] != IGNORE and labels[i - 1] == IGNORE]
            for start in starts:
                assert ids[start - 1] == BOT
                expected[start - 1] = BOT
                expected[max(i for i in range(start) if ids[i] == USER)] = USER
            assert role_labels == expected
            assert sum(t == USER for t in role_labels) == (1 if mask_history else ids.count(USER))
        # packing keeps them: every row's labels are its examples' (each example's first label ignored)
        packed = PackedDataset(train, 4096)
        assert sum(int((packed[r]["labels"] == USER).sum()) for r in range(len(packed))) == sum(
            lab.count(USER) for _, lab in roles
        )


def test_train_on_prompt_and_mask_history(tmp_path, tiny_tok):
    records = [alpaca(5, history=2, system="S."), alpaca(6)]
    root = write_datasets(tmp_path, {"d": ({}, records)})
    plain = examples(build(root, ["d"])[0])
    for opts in ({"train_on_prompt": True}, {"mask_history": True}):
        got = examples(build(root, ["d"], **opts)[0])
        assert got == [oracle(tiny_tok, r, {}, **opts) for r in records], opts
        assert [ids for ids, _ in got] == [ids for ids, _ in plain]
    on_prompt = examples(build(root, ["d"], train_on_prompt=True)[0])
    assert all(ids == labels for ids, labels in on_prompt)
    masked = examples(build(root, ["d"], mask_history=True)[0])
    assert sum(t == 2 for t in masked[0][1]) == 1 and sum(t == 2 for t in plain[0][1]) == 3
    assert masked[1] == plain[1]  # one turn: nothing to mask


def test_placeholders_filled_only_for_listed_datasets(tmp_path):
    raw = [{"instruction": "Who are you?", "output": "I am {{name}}, made by {{author}}."}]
    filled = [{"instruction": "Who are you?", "output": "I am Zed, made by Acme."}]
    root = write_datasets(
        tmp_path, {"ident": ({}, raw), "other": ({"file_name": "ident.json"}, None), "manual": ({}, filled)}
    )
    train, _, _ = build(
        root, ["ident", "other", "manual"], placeholders={"name": "Zed", "author": "Acme"}, fill_placeholders=["ident"]
    )
    ident, other, manual = examples(train)
    assert ident == manual and other != manual
    unfilled, _, _ = build(root, ["ident"], fill_placeholders=[])
    assert examples(unfilled) == [other]


# ----------------------------------------------------------------------------------------------------------------
# truncation and dropping
# ----------------------------------------------------------------------------------------------------------------


def _turns_record(first: int, last: int) -> dict:
    """alpaca record whose turns are `first`..`last` of one fixed conversation."""
    turns = [(f"User turn number {k} asks something.", f"Reply number {k}." + " More words." * k) for k in range(4)]
    sel = turns[first : last + 1]
    return {"instruction": sel[-1][0], "output": sel[-1][1], "history": [list(t) for t in sel[:-1]]}


def test_cutoff_keeps_first_whole_turns(tmp_path, tiny_tok):
    root = write_datasets(tmp_path, {"d": ({}, [_turns_record(0, 3)])})
    two = oracle(tiny_tok, _turns_record(0, 1), {})
    full = oracle(tiny_tok, _turns_record(0, 3), {})
    three = oracle(tiny_tok, _turns_record(0, 2), {})
    for cutoff in (len(two[0]), len(three[0]) - 1):  # turns 0-1 fit whole, turn 2 does not
        train, _, report = build(root, ["d"], cutoff_len=cutoff)
        assert examples(train) == [two], cutoff
        assert report["truncated"] == 1 and report["dropped"] == 0
    assert examples(build(root, ["d"], cutoff_len=len(full[0]))[0]) == [full]
    assert build(root, ["d"], cutoff_len=len(full[0]))[2]["truncated"] == 0


def test_cutoff_with_mask_history_keeps_last_whole_turns(tmp_path, tiny_tok):
    root = write_datasets(tmp_path, {"d": ({}, [_turns_record(0, 3)])})
    last_two = oracle(tiny_tok, _turns_record(2, 3), {}, mask_history=True)
    train, _, report = build(root, ["d"], cutoff_len=len(last_two[0]), mask_history=True)
    assert examples(train) == [last_two] and report["truncated"] == 1
    assert sum(t != IGNORE for t in last_two[1]) > 0


def test_cutoff_cuts_a_single_reply_or_drops_a_prompt_without_reply(tmp_path, tiny_tok):
    long = {"instruction": "Tell a story.", "output": "Once upon a time " * 20}
    short = {"instruction": "Hi", "output": "Hello"}
    root = write_datasets(tmp_path, {"d": ({}, [long, short])})
    full_ids, full_labels = oracle(tiny_tok, long, {})
    prompt_len = full_ids.index(BOT) + 1
    train, _, report = build(root, ["d"], cutoff_len=prompt_len + 3)
    (ids, labels), _ = examples(train)
    assert ids == full_ids[: prompt_len + 3] and labels == full_labels[: prompt_len + 3]
    assert sum(t != IGNORE for t in labels) == 3
    assert report["datasets"]["d"]["truncated"] == 1 and report["datasets"]["d"]["dropped"] == 0
    # the long record's prompt alone fills the cutoff: it is dropped (and counted), the short one is kept
    short_ids = oracle(tiny_tok, short, {})[0]
    assert len(short_ids) <= prompt_len
    train, _, report = build(root, ["d"], cutoff_len=prompt_len)
    assert [ids for ids, _ in examples(train)] == [short_ids]
    assert report["dropped"] == 1 and report["datasets"]["d"]["records"] == 2
    assert sources(train) == [("d", 1)]


def test_truncation_never_keeps_a_prompt_without_reply():
    conv = to_conversation(DatasetSpec(name="x", path=Path("x.json")), _turns_record(0, 3), "x")
    full = ChatEncoder(TINY, TemplateOptions(cutoff_len=10**6)).encode(conv)
    for mask_history in (False, True):
        kept = 0
        for cutoff in range(1, len(full.input_ids) + 2):
            enc = ChatEncoder(TINY, TemplateOptions(cutoff_len=cutoff, mask_history=mask_history)).encode(conv)
            if enc is None:
                continue
            kept += 1
            assert len(enc.input_ids) <= cutoff and enc.labels[-1] == enc.input_ids[-1] != IGNORE
            assert enc.truncated == (cutoff < len(full.input_ids))
            if not mask_history:  # first turns, then at most a cut reply: always a prefix of the full example
                assert enc.input_ids == full.input_ids[: len(enc.input_ids)]
                assert enc.labels == full.labels[: len(enc.labels)]
        assert kept > len(full.input_ids) // 2


def test_records_without_a_reply_are_errors_or_skipped_and_counted(tmp_path):
    records = [
        {"conversations": [{"from": "human", "value": "Only a user message"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {
            "conversations": [
                {"from": "human", "value": "Q"},
                {"from": "gpt", "value": "A"},
                {"from": "human", "value": "unanswered follow-up"},
            ]
        },
    ]
    root = write_datasets(
        tmp_path, {"d": ({"formatting": "sharegpt"}, records), "none": ({"formatting": "sharegpt"}, records[:1])}
    )
    with pytest.raises(DataError, match=r"dataset 'd': .*d.json record 0: the conversation ends without a reply"):
        build(root, ["d"])
    train, _, report = build(root, ["d"], on_bad_record="skip")
    counts = report["datasets"]["d"]
    assert (counts["records"], counts["skipped"], counts["examples"], counts["dropped"]) == (3, 2, 1, 0)
    assert counts["skip_reasons"] == {"the conversation ends without a reply": 2}
    assert counts["skipped_at"][0].endswith("d.json record 0") and counts["skipped_at"][1].endswith("record 2")
    assert sources(train) == [("d", 1)]
    assert "d: 2 skipped (2 the conversation ends without a reply), e.g." in format_report(report)
    with pytest.raises(DataError, match=r"dataset 'none': none of its 1 records is left to train on"):
        build(root, ["d", "none"], on_bad_record="skip")


# ----------------------------------------------------------------------------------------------------------------
# packing and collation
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_setup(tmp_path_factory, tiny_dir):
    root = write_datasets(tmp_path_factory.mktemp("pack"), {"d": ({}, [alpaca(i, history=i % 3) for i in range(9)])})
    train, _, _ = build(root, ["d"], tokenizer=tiny_dir, train_on_prompt=True)  # every first label is trained
    capacity = int(train.lengths().max()) + 40
    return train, PackedDataset(train, capacity), capacity


def test_packing_rows_positions_labels_efficiency(packed_setup):
    train, packed, capacity = packed_setup
    lengths = train.lengths()
    assert len(packed) < len(train)  # some rows hold several examples
    assert sorted(j for row in packed.rows for j in row) == list(range(len(train)))
    for i, row in enumerate(packed.rows):
        item = packed[i]
        assert len(item["input_ids"]) == sum(lengths[j] for j in row) <= capacity
        assert item["position_ids"].tolist() == [p for j in row for p in range(lengths[j])]
        start = 0
        for j in row:
            ex = train[j]
            n = len(ex["input_ids"])
            assert item["input_ids"][start : start + n].tolist() == ex["input_ids"].tolist()
            assert ex["labels"][0] != IGNORE and item["labels"][start] == IGNORE  # nothing learns the next start
            assert item["labels"][start + 1 : start + n].tolist() == ex["labels"][1:].tolist()
            start += n
    assert packed.efficiency() == pytest.approx(lengths.sum() / (len(packed) * capacity))
    assert 0.5 < packed.efficiency() <= 1


def test_packed_and_padding_free_batches_give_per_example_logits(packed_setup, tiny_dir):
    from telechat_lab.model import Telechat2ForCausalLM

    train, packed, _ = packed_setup
    model = Telechat2ForCausalLM.from_pretrained(tiny_dir).eval()
    multi = [i for i, row in enumerate(packed.rows) if len(row) > 1]
    shortest = min(range(len(packed)), key=lambda i: len(packed[i]["input_ids"]))
    rows = [multi[0], shortest]  # the shorter row is padded by the collator
    assert len(packed[shortest]["input_ids"]) < len(packed[multi[0]]["input_ids"])
    batch = Collator()([packed[i] for i in rows])
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 2
    loose = [train[j] for j in packed.rows[rows[0]]]
    flat = Collator(padding_free=True)(loose)
    assert flat["input_ids"].shape == (1, sum(len(ex["input_ids"]) for ex in loose))
    assert "attention_mask" not in flat and (flat["input_ids"] != PAD_ID).all()
    assert flat["position_ids"][0].tolist() == [p for ex in loose for p in range(len(ex["input_ids"]))]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        flat_logits = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits
        alone = {
            j: model(input_ids=torch.as_tensor(train[j]["input_ids"], dtype=torch.long)[None]).logits[0]
            for i in rows
            for j in packed.rows[i]
        }
    for b, i in enumerate(rows):
        start = 0
        for j in packed.rows[i]:
            n = len(train[j]["input_ids"])
            torch.testing.assert_close(logits[b, start : start + n], alone[j], atol=1e-4, rtol=1e-4)
            if b == 0:
                torch.testing.assert_close(flat_logits[0, start : start + n], alone[j], atol=1e-4, rtol=1e-4)
            start += n
    # padding-free over packed rows keeps each row's own restarting positions
    joined = Collator(padding_free=True)([packed[i] for i in rows])
    assert joined["position_ids"][0].tolist() == [p for i in rows for p in packed[i]["position_ids"].tolist()]


# ----------------------------------------------------------------------------------------------------------------
# parallel encoding and the cache
# ----------------------------------------------------------------------------------------------------------------


def test_parallel_tokenization_gives_identical_arrays(tmp_path, monkeypatch):
    records = []
    for i in range(300):
        conv = [{"from": "human", "value": f"Message {i} " + "word " * (i % 17)}]
        if i % 37:  # every 37th record has no reply: a bad record, skipped in both shares
            conv.append({"from": "gpt", "value": f"Reply {i}." + " more" * (i % 11)})
        records.append({"conversations": conv, "system": "S." if i % 5 else ""})
    root = write_datasets(tmp_path, {"big": ({"file_name": "big.jsonl", "formatting": "sharegpt"}, records)})
    contexts = []
    real_get_context = preprocess_mod.mp.get_context
    monkeypatch.setattr(
        preprocess_mod.mp, "get_context", lambda method=None: contexts.append(method) or real_get_context(method)
    )
    # some records truncated, some prompts too long (dropped), the 9 without a reply skipped
    opts = {"cutoff_len": 60, "default_system": "", "on_bad_record": "skip"}
    one, _, report1 = build(root, ["big"], cache_dir=str(tmp_path / "c1"), **opts)
    assert contexts == []
    two, _, report2 = build(root, ["big"], cache_dir=str(tmp_path / "c2"), preprocessing_num_workers=2, **opts)
    assert len(contexts) == 1  # the worker pool was used
    assert report1 == report2 and report1["dropped"] > 0 and report1["truncated"] > 0 and report1["skipped"] == 9
    assert report1["datasets"]["big"]["skip_reasons"] == {"the conversation ends without a reply": 9}
    kept = {r for _, r in sources(two)}
    assert len(kept) == 300 - report1["dropped"] - 9 and not kept & {i + 1 for i in range(0, 300, 37)}
    for attr in ("tokens", "labels", "offsets", "source", "index"):
        np.testing.assert_array_equal(getattr(one, attr), getattr(two, attr), err_msg=attr)


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = write_datasets(tmp_path, {"d": ({"file_name": "d.jsonl"}, [alpaca(i, history=1) for i in range(8)])})
    reads = []
    real_read = preprocess_mod.iter_records
    monkeypatch.setattr(
        preprocess_mod, "iter_records", lambda spec, skip, **kw: reads.append(spec.name) or real_read(spec, skip, **kw)
    )

    first, _, report = build(root, ["d"], cutoff_len=200)
    assert reads == ["d"] and not report["datasets"]["d"].get("cached")
    assert [p for p in (tmp_path / "cache" / "datasets").glob("d-*") if (p / "meta.json").is_file()]
    second, _, report2 = build(root, ["d"], cutoff_len=200)
    assert reads == ["d"] and report2["datasets"]["d"]["cached"] is True  # nothing re-read
    assert examples(second) == examples(first) and report2["train"] == report["train"]

    def rebuilt(**opts) -> bool:
        before = len(reads)
        _, _, rep = build(root, ["d"], **{"cutoff_len": 200, **opts})
        return len(reads) == before + 1 and not rep["datasets"]["d"].get("cached")

    assert rebuilt(cutoff_len=100)
    assert rebuilt(mask_history=True)
    assert rebuilt(overwrite_cache=True)
    assert not rebuilt()  # all of those are cached now
    with open(root / "d.jsonl", "a", encoding="utf-8") as f:  # a changed data file
        f.write(json.dumps(alpaca(99)) + "\n")
    assert rebuilt()
    assert build(root, ["d"], cutoff_len=200)[2]["datasets"]["d"]["records"] == 9


def test_cache_is_invalidated_by_another_tokenizer(tmp_path, monkeypatch, real_model_file):
    root = write_datasets(tmp_path, {"d": ({}, [alpaca(i) for i in range(3)])})
    tiny_train, _, _ = build(root, ["d"])
    monkeypatch.setattr(preprocess_mod, "iter_records", lambda spec, skip, **kw: pytest.fail("cache not used"))
    assert build(root, ["d"])[2]["datasets"]["d"]["cached"] is True
    monkeypatch.undo()
    real_train, _, report = build(root, ["d"], tokenizer=real_model_file)
    assert not report["datasets"]["d"].get("cached") and examples(real_train) != examples(tiny_train)


# ----------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------

GOOD = {"good": ({}, [alpaca(1)])}
BAD_INPUT = {
    "malformed_jsonl_line": (
        {"bad": ({"file_name": "bad.jsonl"}, json.dumps(alpaca(1)) + '\n\n{"instruction": \n')},
        ["dataset 'bad'", "bad.jsonl line 3", "malformed JSON"],
    ),
    "jsonl_line_not_an_object": (
        {"bad": ({"file_name": "bad.jsonl"}, json.dumps(alpaca(1)) + "\n[1, 2]\n")},
        ["dataset 'bad'", "bad.jsonl line 2", "not a JSON object"],
    ),
    "malformed_json_file": (
        {"bad": ({}, '[\n {"instruction": "a",\n  "output": "b"},\n {"instruction" "c"}\n]')},
        ["dataset 'bad'", "bad.json", "line 4", "malformed JSON"],
    ),
    "missing_column": (
        {"bad": ({}, [alpaca(1), {"instruction": "no output"}])},
        ["dataset 'bad'", "bad.json record 1", "missing column 'output'"],
    ),
    "missing_renamed_column_csv": (
        {"bad": ({"file_name": "bad.csv", "columns": {"response": "answer"}}, "instruction,output\nq,a\n")},
        ["dataset 'bad'", "bad.csv line 2", "'answer'"],
    ),
    "csv_line_after_a_multiline_field": (
        {"bad": ({"file_name": "bad.csv"}, 'instruction,output,history\n"two\nlines",a,\nq,a,not a list\n')},
        ["dataset 'bad'", "bad.csv line 4", "history is not a list"],
    ),
    "json_lines_in_a_json_file": (
        {"bad": ({}, json.dumps(alpaca(1)) + "\n" + json.dumps({"instruction": "no output"}) + "\n")},
        ["dataset 'bad'", "bad.json line 2", "missing column 'output'"],
    ),
    # bad records that used to train silently
    "output_null": ({"bad": ({}, [alpaca(1), {**alpaca(2), "output": None}])}, ["bad.json record 1", "output is null"]),
    "instruction_null": (
        {"bad": ({"file_name": "bad.jsonl"}, [alpaca(1), {**alpaca(2), "instruction": None}])},
        ["bad.jsonl line 2", "instruction is null"],
    ),
    "empty_output": ({"bad": ({}, [{**alpaca(2), "output": "  "}])}, ["bad.json record 0", "empty reply"]),
    "csv_row_missing_a_field": (
        {"bad": ({"file_name": "bad.csv"}, "instruction,input,output\nq,,a\nq2,only two\n")},
        ["bad.csv line 3", "fewer fields than the header (2 for 3)"],
    ),
    "csv_row_with_an_extra_field": (
        {"bad": ({"file_name": "bad.csv"}, "instruction,output\nq,a,surplus\n")},
        ["bad.csv line 2", "more fields than the header (3 for 2)"],
    ),
    "sharegpt_two_user_messages": (
        {
            "bad": (
                {"formatting": "sharegpt"},
                [
                    {
                        "conversations": [
                            {"from": "human", "value": "a"},
                            {"from": "human", "value": "b"},
                            {"from": "gpt", "value": "c"},
                        ]
                    }
                ],
            )
        },
        ["bad.json record 0: message 1", "turns do not alternate (two user messages in a row)"],
    ),
    "sharegpt_two_assistant_replies": (
        {
            "bad": (
                {"formatting": "sharegpt"},
                [
                    {
                        "conversations": [
                            {"from": "human", "value": "a"},
                            {"from": "gpt", "value": "b"},
                            {"from": "gpt", "value": "c"},
                        ]
                    }
                ],
            )
        },
        ["bad.json record 0: message 2", "turns do not alternate (two assistant messages in a row)"],
    ),
    "telechat_trailing_user": (
        {
            "bad": (
                {"file_name": "bad.jsonl", "formatting": "telechat"},
                [
                    {
                        "dialog": [
                            {"role": "user", "content": "q"},
                            {"role": "bot", "content": "a"},
                            {"role": "user", "content": "q2"},
                        ]
                    }
                ],
            )
        },
        ["bad.jsonl line 1", "the conversation ends without a reply"],
    ),
    "unknown_sharegpt_role": (
        {
            "bad": (
                {"formatting": "sharegpt"},
                [
                    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
                    {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
                ],
            )
        },
        ["dataset 'bad'", "bad.json record 1", "message 1", "unknown role 'robot'"],
    ),
    "unknown_telechat_role": (
        {
            "bad": (
                {"file_name": "bad.jsonl", "formatting": "telechat"},
                [{"dialog": [{"role": "user", "content": "q"}, {"role": "narrator", "content": "a"}]}],
            )
        },
        ["dataset 'bad'", "bad.jsonl line 1", "unknown role 'narrator'"],
    ),
    "tags_not_matching_records": (
        {"bad": (SHAREGPT_ENTRY, [{"conversations": [{"role": "user", "content": "q"}]}])},
        ["dataset 'bad'", "bad.json record 0", "'from'"],
    ),
    "unknown_tag_key": (
        {"bad": ({"formatting": "sharegpt", "tags": {"speaker_tag": "who"}}, [])},
        ["dataset_info.json", "dataset 'bad'", "unknown tag key(s) ['speaker_tag']"],
    ),
    "unknown_column_key": (
        {"bad": ({"columns": {"answer": "output"}}, [])},
        ["dataset_info.json", "dataset 'bad'", "unknown column key(s) ['answer']"],
    ),
    "unknown_entry_key": (
        {"bad": ({"colums": {"prompt": "q"}}, [])},
        ["dataset_info.json", "dataset 'bad'", "unknown key(s) ['colums']"],
    ),
    "missing_file": (
        {"bad": ({"file_name": "absent.jsonl"}, None)},
        ["dataset 'bad'", "absent.jsonl", "does not exist"],
    ),
    "empty_file": ({"bad": ({"file_name": "bad.jsonl"}, "\n")}, ["dataset 'bad'", "bad.jsonl", "no records"]),
    "bad_history": (
        {"bad": ({}, [{"instruction": "q", "output": "a", "history": [["only one"]]}])},
        ["dataset 'bad'", "bad.json record 0", "history[0]"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_raises_data_error_naming_dataset_file_and_record(tmp_path, case):
    datasets, expected = BAD_INPUT[case]
    root = write_datasets(tmp_path, {**GOOD, **datasets})
    with pytest.raises(DataError) as err:  # never a silent drop of the bad dataset
        build(root, ["good", "bad"])
    for part in expected:
        assert part in str(err.value), (part, str(err.value))
    assert examples(build(root, ["good"])[0])  # the good one alone is fine


def test_unknown_dataset_name_and_mix_name(tmp_path):
    root = write_datasets(tmp_path, GOOD)
    with pytest.raises(DataError, match=r"unknown dataset\(s\) \['nope'\].*dataset_info.json"):
        build(root, ["good", "nope"])
    with pytest.raises(DataError, match="data.mix names dataset"):
        build(root, ["good"], mix={"other": 2.0})
    with pytest.raises(DataError, match="dataset_info.json does not exist"):
        build(tmp_path / "nowhere", ["good"])
    problems = config_problems({"datasets": ["good"], "cutof_len": 5}, DataConfig)
    assert problems == ["cutof_len: unknown key (known: " + ", ".join(sorted(DataConfig.__dataclass_fields__)) + ")"]


def test_bad_records_skipped_and_reported_per_dataset(tmp_path):
    """data.on_bad_record=skip: every bad record is left out, counted by reason and shown in the report, and the
    good ones train exactly as they would alone."""
    bad_jsonl = "\n".join(
        [json.dumps(alpaca(1)), '{"instruction": ', json.dumps({**alpaca(2), "output": None}), json.dumps(alpaca(3))]
    )
    root = write_datasets(
        tmp_path,
        {
            "mixed": ({"file_name": "mixed.jsonl"}, bad_jsonl),
            "clean": ({"file_name": "clean.jsonl"}, [alpaca(1), alpaca(3)]),
        },
    )
    train, _, report = build(root, ["mixed"], on_bad_record="skip")
    counts = report["datasets"]["mixed"]
    assert (counts["records"], counts["examples"], counts["skipped"]) == (4, 2, 2)
    assert counts["skip_reasons"] == {"malformed JSON": 1, "output is null": 1}
    assert examples(train) == examples(build(root, ["clean"])[0])
    text = format_report(report)
    lines = [int(place.rsplit(" ", 1)[1]) for place in counts["skipped_at"]]
    assert counts["skipped_at"][0] == f"dataset 'mixed': {root / 'mixed.jsonl'} line {lines[0]}"
    # one file's places said once: its path, then the lines
    said = f"mixed: 2 skipped (1 malformed JSON, 1 output is null), e.g. {root / 'mixed.jsonl'} lines {lines[0]} and"
    assert f"{said} {lines[1]}\n" in text + "\n", text


def test_encoding_a_large_dataset_reports_progress(tmp_path, capsys):
    records = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(10_000)]
    root = write_datasets(tmp_path, {"big": ({"file_name": "big.jsonl"}, records)})
    build(root, ["big"])
    assert "encoding big: 10,000 records" in capsys.readouterr().err  # a line where no terminal shows a bar


def test_inspect_report_is_not_wrapped_when_piped(tmp_path, tiny_dir):
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(Path(__file__).parents[1])}
    args = [f"model.path={tiny_dir}", "data.datasets=[identity]", "show=0", f"data.cache_dir={tmp_path}"]
    proc = subprocess.run(
        [sys.executable, "-m", "telechat_lab.data.inspect", *args], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("dataset"))
    assert header.split() == "dataset records examples tokens trained tokens truncated dropped skipped".split()


# ----------------------------------------------------------------------------------------------------------------
# oddly encoded or malformed dataset_info.json and data files
# ----------------------------------------------------------------------------------------------------------------

BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("file_name", ["d.jsonl", "d.json", "d.csv"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, file_name):
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    plain = write_datasets(tmp_path / "plain", {"d": ({"file_name": file_name}, None)})
    if file_name == "d.csv":
        text = "instruction,output\n" + "".join(f"{r['instruction']},{r['output']}\n" for r in records)
    elif file_name == "d.jsonl":
        text = "".join(json.dumps(r) + "\n" for r in records)
    else:
        text = json.dumps(records)
    (plain / file_name).write_text(text, encoding="utf-8")
    marked = write_datasets(tmp_path / "marked", {"d": ({"file_name": file_name}, None)})
    (marked / file_name).write_bytes(BOM + text.encode())
    info = marked / "dataset_info.json"
    info.write_bytes(BOM + info.read_bytes())
    assert examples(build(marked, ["d"])[0]) == examples(build(plain, ["d"])[0])


def _raw(root: Path, name: str, data: bytes, entry: dict | None = None) -> Path:
    write_datasets(root, {"d": ({"file_name": name, **(entry or {})}, None)})
    (root / name).write_bytes(data)
    return root


DEEP = b"[" * 100_000 + b"]" * 100_000
RAW_BAD_INPUT = {
    "latin1_in_jsonl": (
        lambda r: _raw(r, "d.jsonl", json.dumps(alpaca(1)).encode() + b'\n{"instruction": "caf\xe9", "output": "x"}\n'),
        ["dataset 'd'", "d.jsonl: line 2, byte offset", "(0xe9) is not UTF-8 text", "save the file as UTF-8"],
    ),
    "jsonl_line_cut_short": (  # the column is within the line, not past its newline
        lambda r: _raw(r, "d.jsonl", json.dumps(alpaca(1)).encode() + b'\n{"instruction": "x", "output": \n'),
        ["d.jsonl line 2: malformed JSON (Expecting value at column 32)"],
    ),
    "jsonl_integer_too_long": (  # json's own refusal, not a traceback
        lambda r: _raw(r, "d.jsonl", b'{"instruction": "x", "output": "y", "n": ' + b"1" * 5000 + b"}\n"),
        ["d.jsonl line 1: unreadable JSON (Exceeds the limit"],
    ),
    "json_integer_too_long": (
        lambda r: _raw(r, "d.json", b'[{"instruction": "x", "output": "y", "n": ' + b"1" * 5000 + b"}]"),
        ["d.json: unreadable JSON (Exceeds the limit"],
    ),
    "latin1_in_json": (
        lambda r: _raw(r, "d.json", b'[{"instruction": "\xe0", "output": "x"}]'),
        ["d.json: line 1, byte offset 18 (0xe0) is not UTF-8"],
    ),
    "latin1_in_dataset_info": (
        lambda r: _raw(r, "dataset_info.json", b'{"d": {"file_name": "d\xe9.json"}}'),
        ["dataset_info.json: line 1, byte offset 22 (0xe9) is not UTF-8"],
    ),
    "deeply_nested_json_file": (lambda r: _raw(r, "d.json", DEEP), ["dataset 'd'", "d.json", "nested too deeply"]),
    "deeply_nested_jsonl_line": (
        lambda r: _raw(r, "d.jsonl", json.dumps(alpaca(1)).encode() + b'\n{"a": ' + DEEP + b"}\n"),
        ["dataset 'd'", "d.jsonl line 2", "JSON nested too deeply"],
    ),
    "deeply_nested_dataset_info": (
        lambda r: _raw(r, "dataset_info.json", b'{"d": ' + DEEP + b"}"),
        ["dataset_info.json", "nested too deeply"],
    ),
    "duplicate_dataset_in_dataset_info": (
        lambda r: _raw(r, "dataset_info.json", b'{"d": {"file_name": "a.json"},\n "d": {"file_name": "b.json"}}'),
        ["dataset_info.json", "key 'd' is given twice"],
    ),
    "duplicate_key_in_an_entry": (
        lambda r: _raw(r, "dataset_info.json", b'{"d": {"file_name": "a.json", "file_name": "b.json"}}'),
        ["dataset_info.json", "key 'file_name' is given twice"],
    ),
    "file_name_empty": (
        lambda r: write_datasets(r, {"d": ({"file_name": ""}, None)}),
        ["dataset 'd'", "file_name must name a data file"],
    ),
    "file_name_a_folder_without_data": (
        lambda r: (write_datasets(r, {"d": ({"file_name": "sub"}, None)}), (r / "sub").mkdir())[0],
        ["dataset 'd'", "folder", "holds no"],
    ),
    "file_name_not_a_regular_file": (
        lambda r: (write_datasets(r, {"d": ({"file_name": "fifo.jsonl"}, None)}), os.mkfifo(r / "fifo.jsonl"))[0],
        ["dataset 'd'", "fifo.jsonl is not a regular file"],
    ),
    "mix_leaves_no_example": (
        lambda r: write_datasets(r, {"d": ({}, [alpaca(1)])}),
        ["no training examples", "data.mix", "ratio above 0"],
    ),
}


@pytest.mark.parametrize("case", list(RAW_BAD_INPUT))
def test_odd_bytes_and_shapes_of_files_end_in_one_message(tmp_path, case):
    make, expected = RAW_BAD_INPUT[case]
    root = make(tmp_path / "data")
    with pytest.raises(DataError) as err:
        build(root, ["d"], **({"mix": {"d": 0}} if case == "mix_leaves_no_example" else {}))
    for part in expected:
        assert part in str(err.value), (part, str(err.value))


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.txt"])
def test_a_file_that_is_not_utf8_says_skip_does_not_skip_it(tmp_path, name):
    """data.on_bad_record=skip skips records; a file whose text cannot be read is one error saying so."""
    data = b"caf\xe9\n" if name == "d.txt" else b'{"instruction": "caf\xe9", "output": "x"}\n'
    root = _raw(tmp_path / "data", name, b"[" + data + b"]" if name == "d.json" else data)
    kind = "pt" if name == "d.txt" else "sft"
    for skip, said in ((False, False), (True, True)):
        cfg = DataConfig(
            dataset_dir=str(root),
            datasets=["d"],
            val_size=0,
            on_bad_record="skip" if skip else "error",
            cache_dir=str(tmp_path / "cache"),
        )
        with pytest.raises(DataError, match="is not UTF-8 text") as err:
            build_datasets(cfg, TINY, kind=kind)
        assert ("data.on_bad_record=skip skips records, not a file" in str(err.value)) == said, str(err.value)


def test_the_report_names_a_files_records_once_in_order():
    from telechat_lab.data.pipeline import _places

    places = [f"dataset 'd': /p/d.jsonl line {n}" for n in (9, 51)] + ["dataset 'd': /p/d.jsonl line 7: messages[2]"]
    places += ["dataset 'd': /p/x.json record 3: chosen", "somewhere else"]
    said = _places(places, "d")
    assert said == "/p/d.jsonl lines 7: messages[2], 9 and 51; /p/x.json record 3: chosen; somewhere else"


def test_max_samples_reads_no_line_past_the_records_it_takes(tmp_path):
    """The first N records are lines 1-N: a bad line N+1 is never read (no error, nothing skipped)."""
    root = write_datasets(tmp_path / "data", {"d": ({"file_name": "d.jsonl"}, [alpaca(i) for i in range(4)])})
    with open(root / "d.jsonl", "a", encoding="utf-8") as f:
        f.write("{broken\n")
    for skip in ("error", "skip"):
        train, _, report = build(root, ["d"], max_samples=4, on_bad_record=skip, cache_dir=str(tmp_path / skip))
        counts = report["datasets"]["d"]
        assert len(train) == 4 and counts["records"] == 4 and counts["skipped"] == 0, counts


def test_an_unreadable_data_file_is_named(tmp_path, monkeypatch):
    from telechat_lab.data import content_hash

    root = write_datasets(tmp_path, {"d": ({}, [alpaca(1)])})

    def refused(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(content_hash, "open", refused, raising=False)
    with pytest.raises(DataError, match=r"dataset 'd': cannot read .*d\.json \(Permission denied\)"):
        build(root, ["d"])

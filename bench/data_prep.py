#!/usr/bin/env python
"""Encode speed of the data pipeline on the release's SFT demo data (../shared/data/telechat2_sft_demo,
1800 telechat-format records), side by side in one run with:

- raw SentencePiece encoding the same text segments in a plain loop (no framework around it), and in one batch
  call on one thread returning int32 arrays (what the pipeline calls); the faster of the two is "raw SP" below,
- a plain loop of `tokenizer.apply_chat_template(...)` calls (the usual way to encode chats).

The pipeline is timed without its cache (a fresh cache dir every run), with one process and with
workers. Best of --repeat runs each, the ways run in rounds (each once a round). Then one more run of the pipeline
each way gives its CPU seconds: this process's and, with workers, theirs together (where the time of the workers'
run goes: the main process reading and writing, the workers encoding and starting), and a worker's own speed, the
examples the workers encode a CPU second of theirs (their starts included) against raw SP: what scaling with more
cores than 2 would give each worker, where here the main process and the workers share 2 cores.

    python bench/data_prep.py [--data DIR] [--tokenizer tokenizer.model] [--workers 2] [--repeat 3] [--scale 1]
    python bench/data_prep.py --smoke    # CI: the tiny tokenizer and the bundled telechat-format demo data, once
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TELECHAT_SHARED") or ROOT.parent / "shared")
sys.path.insert(0, str(ROOT))


def best_of_rounds(ways: dict[str, tuple[int, object]]) -> dict[str, float]:
    """The best time of each way, {name: (runs, fn)}, run in rounds (one run of each way a round, in turn) so that a
    machine that slows down or speeds up mid-way shifts every way alike, not the ones timed last."""
    best = {name: float("inf") for name in ways}
    for round_ in range(max(runs for runs, _ in ways.values())):
        for name, (runs, fn) in ways.items():
            if round_ < runs:
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def cpu_seconds(fn) -> dict[str, float]:
    """The CPU seconds (user + system) of one run of `fn`: this process's, and its child processes' (the encoding
    workers, counted once the pool has shut them down and reaped them)."""
    before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    fn()
    after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    main, workers = (a.ru_utime + a.ru_stime - (b.ru_utime + b.ru_stime) for b, a in zip(before, after))
    return {"main": round(main, 2), "workers": round(workers, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "telechat2_sft_demo")
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "telechat2" / "tokenizer.model")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", type=int, default=1, help="repeat the data K times (scaling on more data)")
    parser.add_argument("--smoke", action="store_true", help="CI: tiny tokenizer, bundled demo data, 1 repeat")
    args = parser.parse_args()
    if args.smoke:
        from telechat_lab.tokenizer import TINY_TOKENIZER_PATH

        args.data, args.tokenizer = ROOT / "telechat_lab" / "demo_data", TINY_TOKENIZER_PATH
        args.repeat, args.workers = 1, 2
    if not args.data.is_dir() or not args.tokenizer.is_file():
        sys.exit(f"needs {args.data} and {args.tokenizer} (../shared beside the checkout)")

    import sentencepiece as spm

    from telechat_lab.data import DataConfig, build_datasets
    from telechat_lab.tokenizer import DEFAULT_SYSTEM_PROMPT, load_tokenizer, split_tool_tags

    # the telechat format's files only (the bundled data also hold a raw-text corpus as JSON lines)
    files = [
        f for f in sorted(args.data.glob("*.jsonl")) if "dialog" in json.loads(f.open(encoding="utf-8").readline())
    ]
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    atexit.register(shutil.rmtree, work, True)  # its copies of the data and every run's cache
    if args.scale > 1:  # K copies of each file, each copy's texts made distinct (no free de-duplication)
        scaled = []
        for f in files:
            lines = []
            for k in range(args.scale):
                for line in f.open(encoding="utf-8"):
                    rec = json.loads(line)
                    if k:
                        rec["system"] = f"[{k}] " + (rec.get("system") or "")
                        for m in rec["dialog"]:
                            m["content"] = f"[{k}] " + m["content"]
                    lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
            (work / f.name).write_text("".join(lines), encoding="utf-8")
            scaled.append(work / f.name)
        files = scaled
    records = [json.loads(line) for f in files for line in f.open(encoding="utf-8") if line.strip()]
    n = len(records)

    info = {f.stem: {"file_name": str(f), "formatting": "telechat"} for f in files}
    (work / "dataset_info.json").write_text(json.dumps(info))

    def pipeline(workers: int):
        def run():
            cfg = DataConfig(
                dataset_dir=str(work),
                datasets=list(info),
                cutoff_len=1_000_000,
                val_size=0,
                preprocessing_num_workers=workers,
                cache_dir=tempfile.mkdtemp(dir=work),
            )
            train, _, report = build_datasets(cfg, args.tokenizer)
            assert report["train"]["examples"] == n, report

        return run

    # raw SentencePiece over the same segments: system+"\n", each message, the "\n" between turns, each cut at the
    # tool tags (they are control ids, not text: SPEC section 4)
    sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer))
    texts = []
    for rec in records:
        texts.append((rec.get("system") or DEFAULT_SYSTEM_PROMPT) + "\n")
        texts += [m["content"] for m in rec["dialog"]]
        texts += ["\n"] * (len(rec["dialog"]) // 2 - 1)
    segments = [part for text in texts for part in split_tool_tags(text) if isinstance(part, str)]

    def raw_sp():
        for s in segments:
            sp.encode(s)

    def raw_sp_batch():  # one call, int32 arrays out (what the pipeline calls), on one thread
        sp.encode(segments, num_threads=1, return_type="numpy")

    tok = load_tokenizer(args.tokenizer)
    chats = [
        [{"role": "system", "content": rec.get("system") or ""}]
        + [{"role": "user" if m["role"] == "user" else "assistant", "content": m["content"]} for m in rec["dialog"]]
        for rec in records
    ]

    def chat_template_loop():
        for messages in chats:
            tok.apply_chat_template(messages, tokenize=True)

    results = best_of_rounds(
        {
            "raw SentencePiece, same segments (1 process)": (args.repeat, raw_sp),
            "raw SentencePiece, one batch call (1 thread)": (args.repeat, raw_sp_batch),
            "pipeline, 1 process": (args.repeat, pipeline(1)),
            f"pipeline, {args.workers} workers": (args.repeat, pipeline(args.workers)),
            "loop of apply_chat_template (1 process)": (max(1, args.repeat - 1), chat_template_loop),
        }
    )
    # the faster way of calling SentencePiece is the baseline (the stricter ratio)
    base = min(
        results["raw SentencePiece, same segments (1 process)"], results["raw SentencePiece, one batch call (1 thread)"]
    )
    loop = results["loop of apply_chat_template (1 process)"]
    print(f"{n} examples, {len(segments)} text segments, {os.cpu_count()} CPUs")
    print(f"{'':48s} {'examples/s':>11s} {'vs raw SP':>10s} {'vs chat-template loop':>22s}")
    for name, seconds in results.items():
        print(f"{name:48s} {n / seconds:11.0f} {base / seconds:9.2f}x {loop / seconds:21.2f}x")
    cpu = {
        name: cpu_seconds(pipeline(workers))
        for name, workers in (("1 process", 1), (f"{args.workers} workers", args.workers))
    }
    # what each worker spends before its first record: an interpreter, the imports, the tokenizer loaded
    code = "from telechat_lab.data.preprocess import get_encoder, TemplateOptions; get_encoder(%r, TemplateOptions())"
    cpu["a worker's start"] = cpu_seconds(
        lambda: subprocess.run([sys.executable, "-c", code % str(args.tokenizer)], cwd=ROOT, check=True)
    )
    one, many, start = cpu.values()
    print(
        f"CPU seconds of one more run: 1 process {one['main']}; {args.workers} workers: this process {many['main']},"
        f" the workers {many['workers']} together (a worker's start: {start['workers']})"
    )
    rates = {k: round(n / v, 1) for k, v in results.items()}
    record = {"examples": n, "examples_per_s": rates, "cpu_seconds": cpu}
    if many["workers"]:  # a worker's own speed, whatever else shares its core: examples a CPU second of the workers
        per_worker = n / many["workers"]
        record["worker_examples_per_cpu_s"] = round(per_worker, 1)
        record["worker_vs_raw_sp"] = round(per_worker * base / n, 3)
        print(f"a worker encodes {per_worker:.0f} examples a CPU second: {per_worker * base / n:.2f}x raw SP")
    print(json.dumps(record))


if __name__ == "__main__":
    main()

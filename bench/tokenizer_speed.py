#!/usr/bin/env python
"""Encode throughput: telechat_lab's fast tokenizer vs raw SentencePiece, on the same text segments.

The segments are every system prompt and every message content of the release's SFT demo data
(../shared/data/telechat2_sft_demo, or --data DIR). Each way of encoding runs over all segments --repeat times,
and the best run is reported, side by side, with the ratio to single-thread SentencePiece. The ids of every way
are checked to be identical first.

    python bench/tokenizer_speed.py [--model PATH/tokenizer.model] [--data DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TELECHAT_SHARED") or ROOT.parent / "shared")


def load_segments(data_dir: Path) -> list[str]:
    segments = []
    for path in sorted(data_dir.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                segments.append(record.get("system") or "")
                segments += [turn["content"] for turn in record["dialog"]]
    return [s for s in segments if s]


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHARED / "telechat2" / "tokenizer.model")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "telechat2_sft_demo")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if not args.model.is_file() or not args.data.is_dir():
        sys.exit(f"need --model ({args.model}) and --data ({args.data}); set TELECHAT_SHARED or pass them")

    import sentencepiece as spm

    from telechat_lab.tokenizer import load_tokenizer

    segments = load_segments(args.data)
    n_bytes = sum(len(s.encode("utf-8")) for s in segments)
    sp = spm.SentencePieceProcessor(model_file=str(args.model))
    tok = load_tokenizer(args.model)
    backend = tok.backend_tokenizer

    reference = [sp.encode(s) for s in segments]
    n_tokens = sum(len(ids) for ids in reference)
    ways = {
        "sentencepiece encode, 1 thread (loop)": lambda: [sp.encode(s) for s in segments],
        "sentencepiece encode(list), all threads": lambda: sp.encode(segments),
        "fast backend encode, 1 thread (loop)": lambda: [
            backend.encode(s, add_special_tokens=False).ids for s in segments
        ],
        "fast tokenizer __call__, 1 thread (loop)": lambda: [
            tok(s, add_special_tokens=False)["input_ids"] for s in segments
        ],
        "fast backend encode_batch, all threads": lambda: [
            e.ids for e in backend.encode_batch(segments, add_special_tokens=False)
        ],
        "fast tokenizer __call__(list), all threads": lambda: tok(segments, add_special_tokens=False)["input_ids"],
    }
    for name, fn in ways.items():
        if fn() != reference:
            sys.exit(f"{name}: ids differ from SentencePiece")

    print(
        f"model {args.model} ({sp.get_piece_size()} pieces), {len(segments)} segments, "
        f"{n_bytes / 1e6:.2f} MB UTF-8, {n_tokens} tokens, {os.cpu_count()} CPUs, best of {args.repeat}"
    )
    print("ids identical for every way below")
    base = None
    rows = []
    print(f"{'':44s} {'seconds':>8s} {'segments/s':>11s} {'MB/s':>7s} {'tokens/s':>11s} {'vs sp 1-thr':>11s}")
    for name, fn in ways.items():
        seconds = best_time(fn, args.repeat)
        base = base or seconds
        row = {
            "way": name,
            "seconds": seconds,
            "segments_per_s": len(segments) / seconds,
            "mb_per_s": n_bytes / 1e6 / seconds,
            "tokens_per_s": n_tokens / seconds,
            "speedup": base / seconds,
        }
        rows.append(row)
        print(
            f"{name:44s} {seconds:8.3f} {row['segments_per_s']:11,.0f} {row['mb_per_s']:7.2f} "
            f"{row['tokens_per_s']:11,.0f} {row['speedup']:10.2f}x"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": " ".join(sys.argv),
                    "segments": len(segments),
                    "bytes": n_bytes,
                    "tokens": n_tokens,
                    "cpus": os.cpu_count(),
                    "results": rows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

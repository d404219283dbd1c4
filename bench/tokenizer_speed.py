#!/usr/bin/env python
"""Encode throughput: telechat_lab's fast tokenizer vs raw SentencePiece, on the same text segments.

The segments are every system prompt and every message content of the release's SFT demo data
(../shared/data/telechat2_sft_demo, or --data DIR). Each way of encoding runs over all segments --repeat times,
and the best run is reported, side by side, with the ratio to single-thread SentencePiece. The ids of every way
are checked first against SPEC section 4's encoding: the tool tags (<tool_call>, </tool_call>, <tool_response>,
</tool_response>) are the control ids 9-12, and the text on each side of a tag is encoded by SentencePiece as a
segment of its own. Raw SentencePiece knows nothing of the tags (it encodes "<tool_call>" as text): its ids are
checked on the segments without a tag.

    python bench/tokenizer_speed.py [--model PATH/tokenizer.model] [--data DIR] [--repeat 3]
    python bench/tokenizer_speed.py --smoke      # CI: the tiny tokenizer, the bundled demo data, a few tool calls
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TELECHAT_SHARED") or ROOT.parent / "shared")
sys.path.insert(0, str(ROOT))
SPEC_TOOL_TAGS = {"<tool_call>": 9, "</tool_call>": 10, "<tool_response>": 11, "</tool_response>": 12}  # SPEC 4
TAG = re.compile("(" + "|".join(re.escape(tag) for tag in SPEC_TOOL_TAGS) + ")")


def spec_encode(sp, text: str) -> list[int]:
    """SPEC section 4: each tool tag is its control id; each text part between them is encoded on its own."""
    ids = []
    for part in TAG.split(text):
        if part in SPEC_TOOL_TAGS:
            ids.append(SPEC_TOOL_TAGS[part])
        elif part:
            ids += sp.encode(part)
    return ids


def load_segments(data_dir: Path) -> list[str]:
    segments = []
    for path in sorted(data_dir.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if "dialog" not in record:  # the telechat format's files only (not a raw-text corpus)
                    break
                segments.append(record.get("system") or "")
                segments += [turn["content"] for turn in record["dialog"]]
    return [s for s in segments if s]


def smoke_segments(data_dir: Path) -> list[str]:
    """The bundled telechat-format demo data, and the same texts as tool calls and tool results (which the demo
    data lack), for a CI run on the tiny tokenizer."""
    from telechat_lab.tokenizer import format_tool_call

    segments = load_segments(data_dir)
    calls = [format_tool_call("search", {"query": s[:40]}) for s in segments[:20]]
    results = [f"<tool_response>\n{s[:60]}\n</tool_response>" for s in segments[:20]]
    return segments + calls + results


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
    parser.add_argument("--smoke", action="store_true", help="CI: tiny tokenizer, bundled demo data, 1 repeat")
    args = parser.parse_args()
    if args.smoke:
        from telechat_lab.tokenizer import TINY_TOKENIZER_PATH

        args.model, args.data, args.repeat = TINY_TOKENIZER_PATH, ROOT / "telechat_lab" / "demo_data", 1
    if not args.model.is_file() or not args.data.is_dir():
        sys.exit(f"need --model ({args.model}) and --data ({args.data}); set TELECHAT_SHARED or pass them")

    import sentencepiece as spm

    from telechat_lab.tokenizer import load_tokenizer

    segments = smoke_segments(args.data) if args.smoke else load_segments(args.data)
    n_bytes = sum(len(s.encode("utf-8")) for s in segments)
    sp = spm.SentencePieceProcessor(model_file=str(args.model))
    tok = load_tokenizer(args.model)
    backend = tok.backend_tokenizer

    reference = [spec_encode(sp, s) for s in segments]
    n_tokens = sum(len(ids) for ids in reference)
    untagged = [n for n, s in enumerate(segments) if not TAG.search(s)]
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
        got = fn()
        if name.startswith("sentencepiece"):  # the tags are text to it: compared where there is none
            got, expected, what = [got[n] for n in untagged], [reference[n] for n in untagged], "segments without a tag"
        else:
            expected, what = reference, "segments"
        wrong = next((n for n, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        if wrong is not None or len(got) != len(expected):
            sys.exit(f"{name}: ids differ from SPEC section 4's encoding on {what} (the first: #{wrong})")

    print(
        f"model {args.model} ({sp.get_piece_size()} pieces), {len(segments)} segments "
        f"({len(segments) - len(untagged)} with tool tags), "
        f"{n_bytes / 1e6:.2f} MB UTF-8, {n_tokens} tokens, {os.cpu_count()} CPUs, best of {args.repeat}"
    )
    print("ids as SPEC section 4 encodes them for every way below (SentencePiece: on the segments without a tag)")
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

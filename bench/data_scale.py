#!/usr/bin/env python
"""Memory and time of the data pipeline against the number of records: synthetic alpaca sets (instruction 20-200
characters, reply 100-1500, half English and half Chinese, generated deterministically from --seed), each size
encoded cold (a fresh cache directory) and then started warm (the cache of the cold run), each run in its own
process, which reports its peak RSS (/proc/self/status VmHWM) and its time from start to the first training
batch (build_datasets, then the first batch of a DataLoader over the training set, as train.py's data module
builds it). Wall is measured around the whole process (interpreter start and imports included). Then (on by
default; --no-train-first-step: not) a real `python train.py` on the same data, the same data options and the warm
cache (the tiny random model the demo trains, or, with --tokenizer, a tiny one written with that tokenizer; one
step; no validation pass; its output_dir under --work, removed after): its wall seconds from the process's start
to the end of its first training step and its peak RSS (train_first_step.py: the main process's peak as
os.wait4 reports it; DataLoader workers, if data.dataloader_num_workers were set, would be processes of their own
and are not counted; the default is none). The cache must come through untouched (every entry under its
datasets/ with the same mtime and size): a train.py that encoded the data again fails the bench.

    python bench/data_scale.py --sizes 10000 100000 [--workers 1] [--tokenizer tokenizer.model]
    python bench/data_scale.py --smoke      # CI: 300 records, once (the train.py start too)
    python bench/data_scale.py --sizes 10000 --code /path/to/another/checkout   # the same on other code (before)

Writes bench/results/data_scale_cpu.json (the rows and the exact command) and prints a table like issue 23's.
The tokenizer defaults to the tiny one shipped with the package (the release's is not on every machine).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from train_first_step import to_first_step

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = (
    "the model data train step loss token batch layer weight value answer question explain because which "
    "would could should every number small large first second result method system simple example between"
).split()
HAN = [chr(c) for c in range(0x4E00, 0x4E00 + 2500)]  # the first 2,500 CJK unified ideographs


def _text(rng: random.Random, chars: int, chinese: bool) -> str:
    if chinese:
        out = "".join(rng.choice(HAN) for _ in range(chars))
        return "，".join(out[i : i + 15] for i in range(0, len(out), 15))[:chars]
    words: list[str] = []
    size = 0
    while size < chars:
        words.append(rng.choice(WORDS))
        size += len(words[-1]) + 1
    return " ".join(words)[:chars]


def generate(path: Path, records: int, seed: int) -> None:
    """`records` alpaca records as JSON lines, the same for the same (records, seed)."""
    if path.is_file():
        return
    rng = random.Random(seed)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(records):
            chinese = i % 2 == 1
            record = {
                "instruction": _text(rng, rng.randint(20, 200), chinese),
                "input": "",
                "output": _text(rng, rng.randint(100, 1500), chinese),
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def child(args: argparse.Namespace) -> None:
    """One start: the data built (from the cache when it is there) and the first training batch taken."""
    start = time.perf_counter()
    sys.path.insert(0, os.environ["PYTHONPATH"])  # the checkout measured (--code)
    import numpy as np
    import torch

    from telechat_lab.data import DataConfig, build_datasets
    from telechat_lab.data.packing import Collator
    from telechat_lab.tokenizer import TINY_TOKENIZER_PATH

    cfg = DataConfig(
        dataset_dir=str(args.data_dir),
        datasets=["synthetic"],
        cache_dir=str(args.cache),
        preprocessing_num_workers=args.workers,
        cutoff_len=args.cutoff_len,
        max_samples=None,
        val_size=0.01,
    )
    train, val, report = build_datasets(cfg, args.tokenizer or TINY_TOKENIZER_PATH)
    built = time.perf_counter() - start
    loader = torch.utils.data.DataLoader(
        train, batch_size=4, collate_fn=Collator(cutoff_len=args.cutoff_len), shuffle=True, num_workers=0
    )
    batch = next(iter(loader))
    first = time.perf_counter() - start
    out = {
        "cached": bool(report["datasets"]["synthetic"].get("cached")),
        "records": report["datasets"]["synthetic"]["records"],
        "examples": report["train"]["examples"] + (report["val"] or {"examples": 0})["examples"],
        "tokens": int(np.sum(train.lengths())) + (int(np.sum(val.lengths())) if val is not None else 0),
        "build_s": round(built, 2),
        "first_batch_s": round(first, 2),
        "batch_shape": list(batch["input_ids"].shape),
        "peak_rss_gb": round(peak_rss_gb(), 3),
    }
    print("RESULT " + json.dumps(out), flush=True)


def run_one(args: argparse.Namespace, data_dir: Path, cache: Path) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--data-dir",
        str(data_dir),
        "--cache",
        str(cache),
        "--workers",
        str(args.workers),
        "--cutoff-len",
        str(args.cutoff_len),
    ]
    if args.tokenizer:
        command += ["--tokenizer", str(args.tokenizer)]
    env = {**os.environ, "PYTHONPATH": str(args.code.resolve()), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"the run failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return {**json.loads(lines[-1].removeprefix("RESULT ")), "wall_s": round(wall, 2)}


WRITE_TINY = (
    "import sys; from telechat_lab.tiny import default_tiny_checkpoint, write_tiny_checkpoint; "
    "write_tiny_checkpoint(*sys.argv[1:]) if sys.argv[1:] else default_tiny_checkpoint()"
)


def tiny_model(args: argparse.Namespace) -> list[str]:
    """train.py's model overrides, its checkpoint written beforehand (so that no timed start writes it): none for
    the demo's own tiny model (the default tokenizer), else model.path= a tiny model with --tokenizer's."""
    target = [] if args.tokenizer is None else [str(args.work / "tiny_model"), str(args.tokenizer.resolve())]
    env = {**os.environ, "PYTHONPATH": str(args.code.resolve()), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", WRITE_TINY, *target], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"writing the tiny model failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return [f"model.path={target[0]}"] if target else []


def _cache_entries(cache: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(cache)): (p.stat().st_mtime_ns, p.stat().st_size) for p in (cache / "datasets").rglob("*")
    }


def warm_train(args: argparse.Namespace, data_dir: Path, cache: Path, model: list[str]) -> dict:
    """`python train.py` on the warm cache, one step: its time to the end of that step and its peak RSS."""
    run_dir = args.work / f"train_{data_dir.name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    overrides = [
        f"data.dataset_dir={data_dir}",
        "data.datasets=[synthetic]",
        f"data.cache_dir={cache}",
        f"data.cutoff_len={args.cutoff_len}",
        "data.val_size=0.01",
        "data.max_samples=null",
        f"data.preprocessing_num_workers={args.workers}",
        "trainer.max_steps=1",
        "+trainer.limit_val_batches=0",  # no validation pass after the step: the peak is the start's and the step's
        f"output_dir={run_dir / 'run'}",
        *model,
    ]
    before = _cache_entries(cache)
    result = to_first_step(args.code.resolve(), overrides, cwd=run_dir, log=run_dir / "train.log")
    written = sorted(k for k, v in _cache_entries(cache).items() if before.get(k) != v)
    if written:
        sys.exit(
            f"train.py did not start from the warm cache {cache}: it wrote {', '.join(written[:5])}\n"
            + (run_dir / "train.log").read_text()[-3000:]
        )
    shutil.rmtree(run_dir)
    return {**result, "cached": True}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _minutes(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{int(s // 60)}:{int(s % 60):02d}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workers", type=int, default=1, help="data.preprocessing_num_workers")
    parser.add_argument("--cutoff-len", type=int, default=2048)
    parser.add_argument("--tokenizer", type=Path, default=None, help="a SentencePiece model (default: the tiny one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/telechat_data_scale"), help="data and caches")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_scale_cpu.json")
    parser.add_argument(
        "--code", type=Path, default=ROOT, help="the checkout whose telechat_lab is measured (before/after)"
    )
    parser.add_argument(
        "--train-first-step",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the warm start, a `python train.py` on the warm cache to its first training step",
    )
    parser.add_argument("--smoke", action="store_true", help="CI: 300 records, nothing written under bench/")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.smoke:
        args.sizes, args.out = [300], None
    model = tiny_model(args) if args.train_first_step else None
    rows = []
    for records in args.sizes:
        data_dir = args.work / f"alpaca_{records}_{args.seed}"
        data_dir.mkdir(parents=True, exist_ok=True)
        generate(data_dir / "synthetic.jsonl", records, args.seed)
        (data_dir / "dataset_info.json").write_text(json.dumps({"synthetic": {"file_name": "synthetic.jsonl"}}))
        cache = args.work / f"cache_{records}_{args.seed}_w{args.workers}"
        shutil.rmtree(cache, ignore_errors=True)
        cold = run_one(args, data_dir, cache)
        warm = run_one(args, data_dir, cache)
        if cold["cached"] or not warm["cached"]:
            sys.exit(f"{records} records: the cold run found a cache or the warm one none ({cold}, {warm})")
        train = warm_train(args, data_dir, cache, model) if model is not None else None
        row = {
            "records": records,
            "cold": cold,
            "warm": warm,
            "warm_train": train,
            "cache_bytes": _size(cache / "datasets"),
        }
        rows.append(row)
        shutil.rmtree(cache, ignore_errors=True)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(
        "| records | cold wall | cold peak RSS | warm wall | warm to first batch | warm peak RSS "
        "| warm train.py to first step | its peak RSS | cache |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cold, warm, train = row["cold"], row["warm"], row["warm_train"]
        print(
            f"| {row['records']:,} | {_minutes(cold['wall_s'])} | {cold['peak_rss_gb']:.2f} GB | "
            f"{_minutes(warm['wall_s'])} | {warm['first_batch_s']:.1f} s | {warm['peak_rss_gb']:.2f} GB | "
            + (f"{train['first_step_s']:.1f} s | {train['peak_rss_gb']:.2f} GB | " if train else "- | - | ")
            + f"{row['cache_bytes'] / 1e6:.0f} MB |"
        )
    if args.out is not None:
        result = {
            "command": "python bench/data_scale.py " + " ".join(sys.argv[1:]),
            "workers": args.workers,
            "cutoff_len": args.cutoff_len,
            "tokenizer": str(args.tokenizer or "tiny (package)"),
            "code": str(args.code.resolve()),
            "cpus": os.cpu_count(),
            "rows": rows,
        }
        previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
        runs = previous.get("runs", []) if isinstance(previous, dict) else []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": [*runs, result]}, indent=1) + "\n")
        print(f"written {args.out}")


if __name__ == "__main__":
    main()

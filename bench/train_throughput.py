#!/usr/bin/env python
"""Training throughput, memory and loss of this project next to Hugging Face Trainer + PEFT, in one process, on a
TeleChat2 of a release's shape with random weights (bench/shapes/), the real tokenizer and the release's SFT demo
data (../shared), measured side by side:

- ours, padded: train.py's path (bench/stacks.py) with padded batches;
- HF Trainer + PEFT, padded: the very same batches, sdpa, the whole logits (the stack a user would otherwise run);
- ours, packed: rows of `--cutoff` tokens holding several examples (a document-masked kernel on a GPU), as many
  rows a batch as carry the padded batches' tokens on average.

For each: tokens/s (real tokens, and trained ones), MFU (6 x parameters x tokens/s over the GPU's dense bf16
peak, as the field's anchors count it) and HFU (the FLOPs the hardware really does: what a LoRA backward skips
is not counted, attention is, see telechat_lab/training/flops.py), peak GPU memory, and the loss of every step
(the two padded runs start from the same adapter weights: their losses must agree).

    python bench/train_throughput.py --shape telechat2_7b --adapter lora --cutoff 2048       # on a GPU
    python bench/train_throughput.py --shape telechat2_7b --layers 8 --adapter qlora         # a shallower 7B
    python bench/train_throughput.py --cpu-smoke                                             # CI: tiny, CPU

Writes bench/results/<name>.json (device, versions, the exact command, every figure) and <name>.md (a table);
figures from a CPU are labelled as such. Results already there are kept: a run without --name writes <name>-2, ...
(--out DIR writes elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TELECHAT_SHARED") or ROOT.parent / "shared")
sys.path.insert(0, str(ROOT))

from random_model import parameter_count, shape_config, write_random_model  # noqa: E402
from stacks import Settings, ours_overrides, run_hf, run_ours  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="telechat2_7b", help="tiny, or a file of bench/shapes/ (telechat2_3b, ...)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first K blocks (to fit memory)")
    p.add_argument("--adapter", default="lora", choices=("lora", "dora", "qlora", "full"))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--cutoff", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4, help="padded examples per micro-batch")
    p.add_argument(
        "--packed-rows",
        type=int,
        default=None,
        help="packed rows per micro-batch (default: as many as carry the padded batches' tokens on average)",
    )
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--stacks", default="ours,hf", help="ours, hf, or both")
    p.add_argument("--layouts", default="padded,packed", help="our layouts: padded, packed, or both")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="ours with model.compile=true (torch.compile each block)")
    p.add_argument("--hardware", default="auto", help="ours: a hardware group of train.py (deepspeed_zero3, ...)")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "telechat2" / "tokenizer.model")
    p.add_argument(
        "--data",
        type=Path,
        default=SHARED / "data" / "telechat2_sft_demo",
        help="*.jsonl in the telechat format, or a directory with a dataset_info.json",
    )
    p.add_argument("--work", type=Path, default=ROOT / "bench" / ".work", help="random models, caches, runs")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument(
        "--name",
        default=None,
        help="results file name, replaced if it exists (default: from device, shape and settings, with -2, -3, ... "
        "added where such results exist: a run never replaces the committed ones unless named)",
    )
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny shape, cutoff 256, 4 steps, on CPU: what CI runs (its figures are CPU figures)",
    )
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.shape, args.cutoff, args.steps, args.warmup, args.batch_size = "tiny", 256, 4, 1, 2
    return args


def dataset_dir(data: Path, work: Path) -> tuple[Path, list[str]]:
    """(a dataset_dir for train.py, the dataset names): a directory with dataset_info.json is used as it is; a
    directory of telechat-format *.jsonl files gets one written beside the caches."""
    if (data / "dataset_info.json").is_file():  # its conversation datasets (SFT's), not its pt / preference ones
        from telechat_lab.data.registry import load_dataset_info

        return data, [name for name, spec in load_dataset_info(data).items() if spec.kind == "sft"]
    files = sorted(data.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"--data {data}: neither a dataset_info.json nor *.jsonl files")
    info = {f.stem: {"file_name": str(f.resolve()), "formatting": "telechat"} for f in files}
    target = work / "data"
    target.mkdir(parents=True, exist_ok=True)
    (target / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return target, list(info)


def environment() -> dict:
    import importlib.metadata as md

    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "peft", "lightning", "accelerate", "deepspeed", "bitsandbytes", "flash-attn"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    on_gpu = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if on_gpu else f"CPU ({platform.processor() or platform.machine()})",
        "gpu": on_gpu,
        "cpus": os.cpu_count(),
        "versions": versions,
    }


def peak_flops() -> float | None:
    """The GPU's dense bf16 peak (Lightning's table: it tells H100 SXM from PCIe); None on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(torch.device("cuda"), torch.bfloat16)


def loss_agreement(ours: list[float], theirs: list[float]) -> dict:
    pairs = list(zip(ours, theirs))
    return {
        "steps_compared": len(pairs),
        "first_step_rel_diff": abs(pairs[0][0] - pairs[0][1]) / abs(pairs[0][1]) if pairs else None,
        "max_abs_diff": max((abs(a - b) for a, b in pairs), default=None),
    }


def table(report: dict) -> str:
    rows = report["runs"]
    hf = next((r for r in rows if r["stack"] == "hf"), None)
    head = (
        "| stack | layout | attention | rows a step | tokens a step | step s | tokens/s | trained tok/s | MFU | HFU "
        "| peak GiB | tokens/s vs HF |"
    )
    lines = [head, "|---" * 12 + "|"]
    for r in rows:
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-"
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        hfu = f"{r['hfu']:.1%}" if "hfu" in r else "n/a"
        mem = peak_of(r)
        mem = "n/a" if mem is None else f"{mem:.2f}" + ("" if r["peak_mem_gib"] is not None else " RSS")
        lines.append(
            f"| {r['label']} | {r['layout']} | {r['attention']} | {r['batch_rows']} | {r['tokens_per_step']:,.0f} "
            f"| {r['step_time_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['trained_tokens_per_s']:,.0f} | {mfu} | {hfu} "
            f"| {mem} | {ratio} |"
        )
    s = report["settings"]
    where = report["environment"]["device"] + ("" if report["environment"]["gpu"] else " (CPU figures, not a GPU's)")
    caption = (
        f"{report['model']['shape']} shape ({report['model']['parameters'] / 1e9:.2f} B parameters, "
        f"{report['model']['layers']} of {report['model']['full_layers']} blocks), {s['adapter']}"
        f"{' rank ' + str(s['rank']) if s['adapter'] != 'full' else ''}, cutoff {s['cutoff']}, {s['precision']}, "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, {where}; "
        f"{s['steps']} steps, the first {s['warmup']} not timed"
    )
    agreement = report.get("loss_agreement")
    tail = ""
    if agreement:
        tail = (
            f"\nLoss, ours vs HF on the same padded batches: first step rel. diff "
            f"{agreement['first_step_rel_diff']:.2e}, max abs diff over {agreement['steps_compared']} steps "
            f"{agreement['max_abs_diff']:.2e}."
        )
    return f"{caption}\n\n" + "\n".join(lines) + tail + f"\n\n`{report['command']}`\n"


def peak_of(row: dict) -> float | None:
    """A run's peak memory: the GPU's (max_memory_allocated), or on a CPU the resident memory above its start."""
    return row["peak_mem_gib"] if row["peak_mem_gib"] is not None else row.get("peak_rss_gib")


def free_name(out: Path, name: str) -> str:
    """`name`, or name-2, name-3, ...: the first whose .json and .md are not in `out` yet."""
    taken = lambda n: (out / f"{n}.json").exists() or (out / f"{n}.md").exists()  # noqa: E731
    n = 1
    while taken(name if n == 1 else f"{name}-{n}"):
        n += 1
    return name if n == 1 else f"{name}-{n}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from telechat_lab.tokenizer import TINY_TOKENIZER_PATH, load_tokenizer

    if args.cpu_smoke and not args.tokenizer.is_file():
        args.tokenizer = TINY_TOKENIZER_PATH
    if args.cpu_smoke and not args.data.exists():
        args.data = ROOT / "telechat_lab" / "demo_data"
    for needed in (args.tokenizer, args.data):
        if not needed.exists():
            raise SystemExit(f"needs {needed} (../shared beside the checkout, or TELECHAT_SHARED=DIR)")
    on_gpu = torch.cuda.is_available()
    stacks = set(args.stacks.split(","))
    layouts = [x for x in ("padded", "packed") if x in args.layouts.split(",")]
    if "hf" in stacks and "padded" not in layouts:
        layouts.insert(0, "padded")  # HF trains on our padded run's batches

    vocab = len(load_tokenizer(args.tokenizer))
    values = shape_config(args.shape, args.layers, vocab)
    full_layers = shape_config(args.shape)["n_layer"]
    work = args.work.resolve()
    model_dir = work / f"{args.shape}-L{values['n_layer']}-v{vocab}"
    print(f"writing / re-using the random {args.shape} model in {model_dir}", flush=True)
    write_random_model(model_dir, values, args.tokenizer, "cuda" if on_gpu else "cpu")
    data_dir, datasets = dataset_dir(args.data.resolve(), work)
    settings = Settings(
        adapter=args.adapter,
        rank=args.rank,
        cutoff=args.cutoff,
        batch_rows=args.batch_size,
        accumulate=args.accumulate,
        steps=args.steps,
        warmup=args.warmup,
        precision="bf16-mixed" if on_gpu else "32-true",
        gradient_checkpointing=not args.no_gradient_checkpointing,
        compile=args.compile,
        hardware=args.hardware if on_gpu or args.hardware != "auto" else "cpu",
    )
    n_params, peak = parameter_count(values), peak_flops()
    runs, start, batches, padded = [], {}, [], None

    def record(stack: str, label: str, layout: str, rows: int, measured) -> dict:
        row = {"stack": stack, "label": label, "layout": layout, "batch_rows": rows}
        row.update(measured.summary(settings.warmup, peak, n_params))
        runs.append(row)
        print(
            f"{label:22s} {layout:7s} {row['tokens_per_s']:>12,.0f} tokens/s  peak "
            + (f"{row['peak_mem_gib']:.2f} GiB" if row["peak_mem_gib"] is not None else "")
            + (f"{row['peak_rss_gib']:.2f} GiB RSS above its start" if row["peak_rss_gib"] is not None else ""),
            flush=True,
        )
        return row

    cache = work / "cache"
    for layout in layouts:
        if "ours" not in stacks and layout == "packed":
            continue
        packed = layout == "packed"
        rows = settings.batch_rows
        if packed:
            rows = args.packed_rows or (
                max(1, round(padded["tokens_per_step"] / settings.accumulate / settings.cutoff)) if padded else rows
            )
        run_settings = Settings(**{**settings.__dict__, "batch_rows": rows})
        out_dir = work / "runs" / layout
        overrides = ours_overrides(run_settings, model_dir, data_dir, datasets, packed, out_dir, cache)
        measured, first, seen = run_ours(run_settings, overrides)
        row = record("ours", "telechat-lab", layout, rows, measured)
        if not packed:
            padded, start, batches = row, first, seen
            if "hf" in stacks:
                record("hf", "HF Trainer + PEFT", "padded", rows, run_hf(settings, model_dir, batches, start))

    report = {
        "benchmark": "train_throughput",
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
        if argv is None
        else "python bench/train_throughput.py " + " ".join(shlex.quote(a) for a in argv),
        "environment": environment(),
        "peak_flops": peak,
        "flop_formula": "MFU = 6 x parameters x real tokens/s / peak; HFU = hardware FLOPs "
        "(telechat_lab/training/flops.py: matmuls forward and backward, only trained weights' gradients, "
        "recompute, chunked loss, causal attention pairs per document) / s / peak",
        "model": {
            "shape": args.shape,
            "layers": values["n_layer"],
            "full_layers": full_layers,
            "parameters": n_params,
            "vocab_size": vocab,
            "config": values,
        },
        "data": {"dir": str(args.data), "datasets": datasets},
        "settings": settings.__dict__,
        "runs": runs,
    }
    ours_padded = next((r for r in runs if r["stack"] == "ours" and r["layout"] == "padded"), None)
    hf = next((r for r in runs if r["stack"] == "hf"), None)
    if ours_padded and hf:
        report["loss_agreement"] = loss_agreement(ours_padded["losses"], hf["losses"])
        report["ratios_vs_hf"] = {
            f"ours {r['layout']}": {
                "tokens_per_s": round(r["tokens_per_s"] / hf["tokens_per_s"], 3),
                "peak_mem": None if not peak_of(hf) or peak_of(r) is None else round(peak_of(r) / peak_of(hf), 3),
            }
            for r in runs
            if r["stack"] == "ours"
        }
    device = "cpu" if not on_gpu else report["environment"]["device"].lower().replace("nvidia ", "").split()[0]
    name = args.name or free_name(
        args.out,
        f"train_throughput_{device}_{args.shape}_L{values['n_layer']}_{args.adapter}_c{args.cutoff}"
        + ("_compile" if args.compile else ""),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = table(report)
    (args.out / f"{name}.md").write_text(markdown)
    print("\n" + markdown)
    print(f"written: {args.out / (name + '.json')} and .md")
    return report


if __name__ == "__main__":
    main()

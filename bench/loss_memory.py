#!/usr/bin/env python
"""Memory and time of the training loss over TeleChat2's 131072-token vocabulary, forward and backward, side by
side: the whole-logits path (transformers' `ForCausalLMLoss`: [tokens, vocab] logits, made fp32, then
cross-entropy) vs this project's two paths without those logits (`chunked_causal_lm_loss`, `loss_chunk_size` tokens
at a time): `chunked` (each chunk's logits recomputed in the backward) and `fused` (the gradients computed in the
forward, Liger's method, the default).

Each (path, tokens) runs in a process of its own; the memory figure is the peak above what the inputs and
`lm_head` already hold: on CUDA `torch.cuda.max_memory_allocated`, on CPU the peak resident set (VmHWM, reset
before the step); the time is the wall time of forward + backward (after one warm-up step on CUDA). The losses and
the hidden states' gradients of the three paths are checked to agree. `--trained-head`: lm_head is trained too (full
fine-tuning), so its gradient is computed as well.

    python bench/loss_memory.py [--tokens 2048 4096 8192] [--hidden 1024] [--chunk 1024] [--trained-head]
                                [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

VOCAB = 131072


def rss_peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


PATHS = ("whole", "chunked", "fused")


def one(path: str, tokens: int, hidden_size: int, chunk: int, trained_head: bool = False) -> dict:
    """One step of one path, in this process."""
    from telechat_lab.model.modeling_telechat2 import chunked_causal_lm_loss

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    lm_head = torch.nn.Linear(hidden_size, VOCAB, bias=False, device=device, dtype=dtype).requires_grad_(trained_head)
    hidden = torch.randn(1, tokens, hidden_size, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, VOCAB, (1, tokens), device=device)

    def step():
        if path == "whole":
            logits = lm_head(hidden).float()
            loss = F.cross_entropy(logits[0, :-1], labels[0, 1:])
        else:
            loss = chunked_causal_lm_loss(lm_head, hidden, labels, chunk, implementation=path)
        loss.backward()
        return loss

    if cuda:  # kernels and allocator warmed up; then the measured step starts from no gradients
        step()
        hidden.grad = lm_head.weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = rss_mib()
    start = time.perf_counter()
    loss = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else rss_peak_mib() - before
    grad = hidden.grad.float()
    return {
        "path": path,
        "tokens": tokens,
        "peak_extra_mib": round(peak, 1),
        "seconds": round(seconds, 4),
        "loss": float(loss),
        "grad_checksum": [float(grad.abs().sum()), float(grad[0, 0, :8].sum())],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (the logits do not depend on it)")
    parser.add_argument("--chunk", type=int, default=1024, help="loss_chunk_size")
    parser.add_argument("--trained-head", action="store_true", help="lm_head is trained too (its gradient computed)")
    parser.add_argument("--out", type=Path, default=None, help="write loss_memory_<device>[_trained_head].json here")
    parser.add_argument("--one", nargs=2, metavar=("PATH", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.hidden, args.chunk, args.trained_head)))
        return

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    unit = "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "peak RSS (VmHWM)"
    head = "trained" if args.trained_head else "frozen"
    print(f"loss over a {VOCAB}-token vocabulary, forward + backward, {head} lm_head, {device}; extra peak ({unit})")
    print(
        f"{'tokens':>7} | {'MiB whole':>9} {'chunked':>8} {'fused':>8} | {'s whole':>8} {'chunked':>8} {'fused':>8}"
        f" | {'fused vs chunked':>16} | {'max loss diff':>13}"
    )
    rows = []
    for tokens in args.tokens:
        got = {}
        for path in PATHS:
            cmd = [sys.executable, __file__, "--one", path, str(tokens), "--hidden", str(args.hidden)]
            cmd += ["--chunk", str(args.chunk)] + (["--trained-head"] if args.trained_head else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            got[path] = json.loads(out.stdout.strip().splitlines()[-1])
        diff = max(abs(got[p]["loss"] - got["whole"]["loss"]) for p in PATHS)
        grad_diff = max(
            abs(a - b) / max(abs(b), 1e-12)
            for p in PATHS
            for a, b in zip(got[p]["grad_checksum"], got["whole"]["grad_checksum"])
        )
        mib = {p: got[p]["peak_extra_mib"] for p in PATHS}
        sec = {p: got[p]["seconds"] for p in PATHS}
        speedup = sec["chunked"] / max(sec["fused"], 1e-9)
        rows.append(
            {
                "tokens": tokens,
                "peak_extra_mib": mib,
                "seconds": sec,
                "fused_speedup_vs_chunked": round(speedup, 3),
                "loss_abs_diff": diff,
                "grad_checksum_rel_diff": grad_diff,
            }
        )
        print(
            f"{tokens:>7} | {mib['whole']:>9.0f} {mib['chunked']:>8.0f} {mib['fused']:>8.0f} | {sec['whole']:>8.3f}"
            f" {sec['chunked']:>8.3f} {sec['fused']:>8.3f} | {speedup:>15.2f}x | {diff:>13.2e}"
        )
    if args.out:
        name = ("cuda" if torch.cuda.is_available() else "cpu") + ("_trained_head" if args.trained_head else "")
        record = {
            "command": "python bench/loss_memory.py " + " ".join(sys.argv[1:]),
            "device": device,
            "measure": unit,
            "torch": torch.__version__,
            "vocab": VOCAB,
            "hidden": args.hidden,
            "chunk": args.chunk,
            "lm_head": head,
            "rows": rows,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"loss_memory_{name}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

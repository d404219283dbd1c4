#!/usr/bin/env python
"""Memory of the training loss over TeleChat2's 131072-token vocabulary: the whole-logits path (transformers'
`ForCausalLMLoss`: [tokens, vocab] logits, made fp32, then cross-entropy) vs this project's chunked loss
(`chunked_causal_lm_loss`, `loss_chunk_size` tokens at a time), forward and backward, side by side.

Each (path, tokens) runs in a process of its own; the figure is the peak memory above what the inputs and
`lm_head` already hold: on CUDA `torch.cuda.max_memory_allocated`, on CPU the peak resident set (VmHWM, reset
before the step). The losses of the two paths are checked to agree.

    python bench/loss_memory.py [--tokens 2048 4096 8192] [--hidden 1024] [--chunk 1024] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
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


def one(path: str, tokens: int, hidden_size: int, chunk: int) -> dict:
    """One step of one path, in this process."""
    from telechat_lab.model.modeling_telechat2 import chunked_causal_lm_loss

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    lm_head = torch.nn.Linear(hidden_size, VOCAB, bias=False, device=device, dtype=dtype).requires_grad_(False)
    hidden = torch.randn(1, tokens, hidden_size, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, VOCAB, (1, tokens), device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = rss_mib()
    if path == "chunked":
        loss = chunked_causal_lm_loss(lm_head, hidden, labels, chunk)
    else:
        logits = lm_head(hidden).float()
        loss = F.cross_entropy(logits[0, :-1], labels[0, 1:])
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = rss_peak_mib() - before
    return {"path": path, "tokens": tokens, "peak_extra_mib": round(peak, 1), "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (the logits do not depend on it)")
    parser.add_argument("--chunk", type=int, default=1024, help="loss_chunk_size")
    parser.add_argument("--out", type=Path, default=None, help="write loss_memory_<device>.json here")
    parser.add_argument("--one", nargs=2, metavar=("PATH", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.hidden, args.chunk)))
        return

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    unit = "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "peak RSS (VmHWM)"
    print(f"loss over a {VOCAB}-token vocabulary, forward + backward, {device}; extra peak memory ({unit})")
    print(f"{'tokens':>8} {'whole logits MiB':>17} {'chunked MiB':>12} {'ratio':>7} {'loss diff':>10}")
    rows = []
    for tokens in args.tokens:
        got = {}
        for path in ("whole", "chunked"):
            cmd = [sys.executable, __file__, "--one", path, str(tokens), "--hidden", str(args.hidden)]
            out = subprocess.run([*cmd, "--chunk", str(args.chunk)], capture_output=True, text=True, check=True)
            got[path] = json.loads(out.stdout.strip().splitlines()[-1])
        whole, chunked = got["whole"]["peak_extra_mib"], got["chunked"]["peak_extra_mib"]
        diff = abs(got["whole"]["loss"] - got["chunked"]["loss"])
        rows.append({"tokens": tokens, "whole_mib": whole, "chunked_mib": chunked, "loss_abs_diff": diff})
        print(f"{tokens:>8} {whole:>17.0f} {chunked:>12.0f} {whole / max(chunked, 1e-9):>6.1f}x {diff:>10.2e}")
    if args.out:
        name = "cuda" if torch.cuda.is_available() else "cpu"
        record = {
            "command": "python bench/loss_memory.py " + " ".join(sys.argv[1:]),
            "device": device,
            "measure": unit,
            "torch": torch.__version__,
            "vocab": VOCAB,
            "hidden": args.hidden,
            "chunk": args.chunk,
            "rows": rows,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"loss_memory_{name}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

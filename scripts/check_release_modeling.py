"""Check that an export loads with the release's own modeling file and gives telechat_lab's logits.

    git clone https://github.com/Tele-AI/TeleChat2
    python scripts/check_release_modeling.py TeleChat2/llama_factory_training/modeling_telechat2.py

It writes a tiny random TeleChat2 (GQA and MHA), exports it with `telechat_lab.export`, puts a copy of the
release's file in place of the export's `modeling_telechat2.py` with the two changes a CPU needs (no `.cuda()`,
no flash-attn assertion; `--fp32-rope` also drops the fp16 rounding of cos/sin), loads it with
`AutoModelForCausalLM(trust_remote_code=True)` in a process that cannot import telechat_lab, and prints the
largest logit difference. SPEC.md section 3: the release rounds cos/sin to fp16, so about 1e-3 of the logit
scale is expected; with `--fp32-rope` the two agree to fp32 rounding. Nothing of the release is stored here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

CPU_PATCHES = [  # (what the release has, what a CPU needs)
    (").cuda()", ")"),
    (
        "        assert flash_attn_unpadded_func is not None, ('Please install FlashAttention first, '\n"
        "                                                      'e.g., with pip install flash-attn')\n"
        "        assert rearrange is not None, 'Please install einops first, e.g., with pip install einops'\n",
        "        pass\n",
    ),
]
FP32_ROPE = [
    ("emb.cos()[:, None, :].half()", "emb.cos()[:, None, :]"),
    ("emb.sin()[:, None, :].half()", "emb.sin()[:, None, :]"),
]

COMPARE = """
import sys, torch
sys.modules["telechat_lab"] = None  # the release's code alone
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
data = torch.load(sys.argv[2])
with torch.no_grad():
    theirs = model(input_ids=data["ids"], use_cache=False).logits
print((theirs - data["ours"]).abs().max().item(), data["ours"].abs().max().item(), type(model).__module__)
"""


def patched(source: str, fp32_rope: bool) -> str:
    for old, new in CPU_PATCHES + (FP32_ROPE if fp32_rope else []):
        if old not in source:
            raise SystemExit(f"the release file has changed: '{old.strip()[:60]}' not found")
        source = source.replace(old, new)
    return source


def main(argv: list[str] | None = None) -> None:
    import torch

    from telechat_lab.export import export
    from telechat_lab.model import Telechat2ForCausalLM
    from telechat_lab.tiny import write_tiny_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("release_modeling", type=Path, help="the release's modeling_telechat2.py")
    parser.add_argument("--fp32-rope", action="store_true", help="also drop the release's fp16 cos/sin")
    args = parser.parse_args(argv)
    source = patched(args.release_modeling.read_text(encoding="utf-8"), args.fp32_rope)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for case, kv_heads in (("gqa", 2), ("mha", 4)):
            base = write_tiny_checkpoint(
                work / f"tiny_{case}", n_head=4, num_key_value_heads=kv_heads, training_seqlen=64
            )
            out = export(Telechat2ForCausalLM.from_pretrained(base), base, work / f"export_{case}", dtype="float32")
            (out / "modeling_telechat2.py").write_text(source, encoding="utf-8")
            ids = torch.randint(20, 3000, (2, 40), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                ours = Telechat2ForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
            torch.save({"ids": ids, "ours": ours}, work / "ours.pt")
            proc = subprocess.run(
                [sys.executable, "-c", COMPARE, str(out), str(work / "ours.pt")], capture_output=True, text=True
            )
            if proc.returncode:
                raise SystemExit(f"{case}: the release's code failed on the export:\n{proc.stderr[-3000:]}")
            diff, scale, module = proc.stdout.split()
            print(
                f"{case}: max |logit difference| {float(diff):.3g} (logits up to {float(scale):.3g}), "
                f"release code: {module}"
            )


if __name__ == "__main__":
    main()

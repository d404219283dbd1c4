"""Write a tiny random-initialised TeleChat2 checkpoint directory (config, safetensors, tokenizer).

It is laid out like a released checkpoint, so everything that reads a real TeleChat2 directory reads
it too: the out-of-the-box demo trains it on CPU, and tests build it on the fly. Like a release (and an
export) it carries its remote-code files and `auto_map`, so the demo's adapter, whose base it is, loads with
plain transformers + PEFT (`trust_remote_code=True`).

    python -m telechat_lab.tiny OUT_DIR [--tokenizer PATH/tokenizer.model] [--hidden-size 128] ...

By default the tokenizer is the small SentencePiece model trained by this project
(`telechat_lab/assets/tiny_tokenizer.model`, same control pieces at the same ids as TeleChat2);
pass the real `tokenizer.model` to get the 131072-piece vocabulary.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from telechat_lab import cache_root
from telechat_lab.console import without_transformers_bars
from telechat_lab.errors import OutputDirError
from telechat_lab.files import staged_files
from telechat_lab.model import Telechat2Config, Telechat2ForCausalLM
from telechat_lab.model.remote_code import add_remote_code
from telechat_lab.tokenizer import TINY_TOKENIZER_PATH, load_tokenizer, save_tokenizer, tokenizer_hash

MARKER = ".telechat_tiny"  # records the arguments, so an up-to-date directory is re-used


def write_tiny_checkpoint(
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    hidden_size: int = 128,
    n_layer: int = 2,
    n_head: int = 4,
    num_key_value_heads: int = 2,
    ffn_hidden_size: int | None = None,
    training_seqlen: int = 2048,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Create (or re-use, when written with the same arguments) a tiny TeleChat2 directory."""
    if not 64 <= hidden_size <= 256 or not 2 <= n_layer <= 4:
        raise ValueError(f"a tiny model has hidden_size in 64..256 and 2..4 layers, got {hidden_size}, {n_layer}")
    out = Path(out_dir).resolve()
    tokenizer = Path(tokenizer or TINY_TOKENIZER_PATH).resolve()
    ffn_hidden_size = ffn_hidden_size or 2 * hidden_size
    token_hash = tokenizer_hash(tokenizer)[:16]  # not its path: checkouts share the directory
    signature = repr(
        (
            token_hash,
            hidden_size,
            n_layer,
            n_head,
            num_key_value_heads,
            ffn_hidden_size,
            training_seqlen,
            seed,
            str(dtype),
            "init=0.1",
            "tool-tags",
            "remote-code",
        )
    )  # bump: rewrite old dirs
    marker = out / MARKER
    if marker.exists() and marker.read_text() == signature and (out / "model.safetensors").exists():
        return out
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out} is a file: name a new or empty directory (nothing was written)")
    if not marker.exists() and out.is_dir() and any(out.iterdir()):  # only a tiny model is ever replaced
        raise OutputDirError(
            f"{out} is not empty and holds no tiny model written earlier: choose a new or empty directory "
            "(nothing was written)"
        )

    tok = load_tokenizer(tokenizer)
    config = Telechat2Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        n_layer=n_layer,
        n_head=n_head,
        num_key_value_heads=num_key_value_heads,
        ffn_hidden_size=ffn_hidden_size,
        training_seqlen=training_seqlen,
        base_seqlen=training_seqlen,
        initializer_range=0.1,  # a random model with usable logit scales: LoRA visibly learns on it
        architectures=["Telechat2ForCausalLM"],
    )
    torch.manual_seed(seed)
    model = Telechat2ForCausalLM(config).to(dtype)
    with staged_files(out) as staging:  # each file moved into place whole: a reader never sees half of one
        with without_transformers_bars():  # a tiny model is written at once
            model.save_pretrained(staging)
        add_remote_code(staging)  # an adapter of the demo loads with plain transformers + PEFT, as an export does
        save_tokenizer(tok, staging)
        model.generation_config.save_pretrained(staging)
        (staging / MARKER).write_text(signature)
    return out


def default_tiny_checkpoint() -> Path:
    """The tiny model of the demo (model.path null), written on first use under the cache root."""
    return write_tiny_checkpoint(cache_root() / "tiny-telechat2")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the tiny one shipped)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--training-seqlen", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_tiny_checkpoint(
        args.out_dir,
        args.tokenizer,
        args.hidden_size,
        args.n_layer,
        args.n_head,
        args.kv_heads,
        training_seqlen=args.training_seqlen,
        seed=args.seed,
    )
    print(f"tiny TeleChat2 checkpoint written to {out}")


if __name__ == "__main__":  # python -m telechat_lab.tiny DIR: the same as telechat-lab tiny DIR
    import sys

    from telechat_lab.console import quiet_libraries
    from telechat_lab.errors import reported

    quiet_libraries()
    with reported():
        main(sys.argv[1:])

"""A TeleChat2 checkpoint directory of a release's shape (bench/shapes/*.json) with random weights and a given
tokenizer, laid out as a release is, so that every stack loads it with `from_pretrained`. `layers` keeps the first
K blocks of the shape (to fit a GPU's memory; figures say so). Written once per shape and re-used."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

SHAPES = Path(__file__).resolve().parent / "shapes"
MARKER = ".bench_random_model"


def shape_config(shape: str, layers: int | None = None, vocab_size: int | None = None) -> dict:
    """The config.json values of `shape` ("telechat2_7b", ..., or "tiny": hidden 128, 2 blocks), depth cut to
    `layers`, vocabulary set to the tokenizer's."""
    if shape == "tiny":
        values = {"hidden_size": 128, "n_layer": 2, "n_head": 4, "num_key_value_heads": 2, "ffn_hidden_size": 256}
        values.update(training_seqlen=8192, base_seqlen=8192, initializer_range=0.02, vocab_size=131072)
    else:
        path = SHAPES / f"{shape}.json"
        if not path.is_file():
            names = sorted(p.stem for p in SHAPES.glob("*.json"))
            raise SystemExit(f"--shape {shape}: no {path}; shapes: tiny, {', '.join(names)}")
        values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    if layers:
        if not 0 < layers <= values["n_layer"]:
            raise SystemExit(f"--layers {layers}: the {shape} shape has {values['n_layer']} blocks")
        values["n_layer"] = layers
    if vocab_size:
        values["vocab_size"] = vocab_size
    return values


def parameter_count(values: dict) -> int:
    """Parameters of a TeleChat2 of this config (embeddings and lm_head untied)."""
    h, f, v, n = values["hidden_size"], values["ffn_hidden_size"], values["vocab_size"], values["n_layer"]
    kv = values.get("num_key_value_heads") or values["n_head"]
    head_dim = h // values["n_head"]
    block = h * h + h * 2 * kv * head_dim + h * h + h + 3 * h * f + h + 2 * h  # attention, mlp (+biases), norms
    return 2 * v * h + n * block + h


def write_random_model(out: Path, values: dict, tokenizer: Path, device: str, seed: int = 0) -> Path:
    """`out` holding config.json, bf16 safetensors (normal init, std 0.02) and the tokenizer; re-used when it was
    written with the same values."""
    from telechat_lab.model import Telechat2Config, Telechat2ForCausalLM
    from telechat_lab.tokenizer import load_tokenizer, save_tokenizer, tokenizer_hash

    signature = json.dumps({**values, "tokenizer": tokenizer_hash(tokenizer), "seed": seed}, sort_keys=True)
    if (out / MARKER).is_file() and (out / MARKER).read_text() == signature:
        return out
    if out.exists():
        shutil.rmtree(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    config = Telechat2Config(**values, architectures=["Telechat2ForCausalLM"])
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it is fast (a 7B shape on a GPU in seconds)
        model = Telechat2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(staging)
    model.generation_config.save_pretrained(staging)
    save_tokenizer(load_tokenizer(tokenizer), staging)
    (staging / MARKER).write_text(signature)
    del model
    os.replace(staging, out)
    return out

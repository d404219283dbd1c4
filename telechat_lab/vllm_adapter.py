"""A LoRA adapter in the module layout vLLM's TeleChat2 serves (`vllm serve BASE --enable-lora --lora-modules
NAME=DIR`, and chat.py's `infer_backend=vllm`).

vLLM's TeleChat2 is its Llama model with TeleChat2's weight names mapped onto it: it takes LoRA on `q_proj`,
`k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj` and `down_proj` and maps the adapter's key prefix
(`transformer.h.N.self_attention.` -> `model.layers.N.self_attn.`) as it maps the base's, but it never splits
an adapter's `key_value`. So the conversion renames `query` -> `q_proj` and `dense` -> `o_proj` and splits
`key_value` exactly: its `lora_A` is shared by K and V, its `lora_B` rows are split as the weight's rows are
(per KV head, that head's K rows then its V rows; SPEC section 2). B_k @ A and B_v @ A are then exactly the K and
V rows of B @ A. vLLM serves neither DoRA's magnitude vectors, `modules_to_save` copies nor trained biases: such
adapters are refused here, before vLLM is started (merge them with merge.py and serve the export instead)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from telechat_lab.errors import CheckpointError, ConfigError

RENAMED = {"query": ["q_proj"], "key_value": ["k_proj", "v_proj"], "dense": ["o_proj"]}
SERVED = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
MARKER = "telechat_lab_vllm_adapter.json"  # names the adapter a directory was converted from
WEIGHTS = "adapter_model.safetensors"


def vllm_module_names(modules) -> list[str]:
    """TeleChat2 module names as vLLM's TeleChat2 names them."""
    return [new for name in modules for new in RENAMED.get(name, [name])]


def vllm_lora_rank(config: dict) -> int:
    """The smallest `--max-lora-rank` vLLM accepts (one of its fixed sizes) that holds the adapter's ranks."""
    rank = max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])
    return next((size for size in (8, 16, 32, 64, 128, 256, 320, 512) if size >= rank), rank)


def check_servable(adapter: Path, config: dict) -> None:
    """ConfigError, naming the adapter and what to do, for an adapter vLLM's LoRA support cannot serve."""
    where = adapter / "adapter_config.json"
    merge = f"merge it instead (python merge.py adapter_path={adapter} export_dir=OUT) and serve the export"
    if config.get("use_dora"):
        raise ConfigError(f"{where}: a DoRA adapter (use_dora=true) cannot be served by vLLM's LoRA support: {merge}")
    if config.get("modules_to_save"):
        raise ConfigError(
            f"{where}: modules_to_save={config['modules_to_save']} are trained copies of whole modules, which "
            f"vLLM's LoRA support cannot serve: {merge}"
        )
    if config.get("bias", "none") != "none":
        raise ConfigError(
            f"{where}: bias={config['bias']!r} trains biases, which vLLM's LoRA support cannot serve: {merge}"
        )
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unserved = sorted(set(vllm_module_names(targets)) - SERVED)
        if unserved:
            raise ConfigError(
                f"{where}: LoRA on {unserved} cannot be served by vLLM's TeleChat2 (it serves LoRA on "
                f"{sorted(SERVED)}): {merge}"
            )


def split_key_value_rows(tensor: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K rows and the V rows of a `key_value`-shaped tensor (per KV head: head_dim K rows, head_dim V rows)."""
    rows = tensor.shape[0]
    if rows % (2 * kv_heads):
        raise CheckpointError(f"a key_value lora_B with {rows} rows cannot hold {kv_heads} KV heads' K and V rows")
    per_head = tensor.reshape(kv_heads, 2, rows // (2 * kv_heads), *tensor.shape[1:])
    return per_head[:, 0].reshape(rows // 2, *tensor.shape[1:]), per_head[:, 1].reshape(rows // 2, *tensor.shape[1:])


def convert_tensors(tensors: dict[str, torch.Tensor], kv_heads: int, source: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under vLLM's module names, `key_value` split into `k_proj` and `v_proj`."""
    out = {}
    for key, tensor in tensors.items():
        parts = key.split(".")
        if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
            raise ConfigError(
                f"{source}: {key} is not a LoRA A/B weight, which vLLM's LoRA support cannot serve "
                "(a DoRA magnitude, a bias or a modules_to_save copy): merge the adapter with merge.py instead"
            )
        module, prefix = parts[-3], ".".join(parts[:-3])
        if module == "key_value":
            halves = (tensor, tensor) if parts[-2] == "lora_A" else split_key_value_rows(tensor, kv_heads)
            for name, half in zip(RENAMED[module], halves):
                out[f"{prefix}.{name}.{parts[-2]}.weight"] = half.contiguous().clone()
        else:
            out[f"{prefix}.{RENAMED.get(module, [module])[0]}.{parts[-2]}.weight"] = tensor
    return out


def renamed_pattern(pattern: str) -> list[str]:
    """A peft rank/alpha pattern key (`key_value`, `transformer.h.0.self_attention.query`, ...) under vLLM's names."""
    *head, module = pattern.split(".")
    return [".".join([*head, name]) for name in RENAMED.get(module, [module])]


def convert_config(config: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """adapter_config.json for the converted tensors: `target_modules` lists the modules they hold, per-module
    ranks and alphas are renamed the same way."""
    config = dict(config)
    config["target_modules"] = sorted({key.split(".")[-3] for key in tensors})
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            config[key] = {new: value for pattern, value in config[key].items() for new in renamed_pattern(pattern)}
    return config


def load_adapter_tensors(adapter: Path) -> dict[str, torch.Tensor]:
    if (adapter / WEIGHTS).is_file():
        from safetensors.torch import load_file

        return load_file(adapter / WEIGHTS)
    return torch.load(adapter / "adapter_model.bin", map_location="cpu", weights_only=True)


def convert_adapter(adapter: Path, base: Path, out: Path) -> Path:
    """Write `adapter` (a LoRA adapter of `base`, both checked) into the empty directory `out` in vLLM's layout."""
    from safetensors.torch import save_file

    from telechat_lab.files import read_json

    config = read_json(adapter / "adapter_config.json", "the adapter config")
    check_servable(adapter, config)
    base_config = read_json(base / "config.json", "the base config")
    kv_heads = base_config.get("num_key_value_heads") or base_config["n_head"]
    tensors = convert_tensors(load_adapter_tensors(adapter), kv_heads, str(adapter))
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    config = convert_config(config, tensors)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / MARKER).write_text(json.dumps({"converted_from": str(adapter), "base": str(base)}, indent=2) + "\n")
    return out


def is_vllm_adapter(directory: Path) -> bool:
    """Whether `directory` holds an earlier conversion (which a new one may replace)."""
    return (directory / MARKER).is_file() and (directory / "adapter_config.json").is_file()

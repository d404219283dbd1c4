"""Merge adapters into their base and write a checkpoint directory that transformers
(`trust_remote_code=True`, with only torch + transformers installed) and vLLM load."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from telechat_lab.model import DTYPES

log = logging.getLogger(__name__)
MODEL_DIR = Path(__file__).resolve().parent / "model"
REMOTE_CODE = ("configuration_telechat2.py", "modeling_telechat2.py")
AUTO_MAP = {"AutoConfig": "configuration_telechat2.Telechat2Config",
            "AutoModel": "modeling_telechat2.Telechat2Model",
            "AutoModelForCausalLM": "modeling_telechat2.Telechat2ForCausalLM"}


def adapter_base(adapter_dir: Path) -> Path:
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"adapter_path={adapter_dir}: no adapter_config.json there")
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config} names no base_model_name_or_path: set model.path")
    return Path(base)


def base_dtype(base: Path) -> str:
    config = json.loads((base / "config.json").read_text())
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return dtype if dtype in DTYPES else "float32"


def merge_adapters(model_path: str | Path | None, adapter_paths: list[str | Path], device: str = "cpu"):
    """The base (model.path, else the first adapter's base) with each adapter merged in, in order,
    in the base's own dtype (no fp32 copy of a large model)."""
    from peft import PeftModel

    from telechat_lab.model import Telechat2ForCausalLM

    adapters = [Path(p).expanduser().resolve() for p in adapter_paths]
    base = Path(model_path).expanduser().resolve() if model_path else adapter_base(adapters[0])
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"base model {base}: no config.json there (set model.path)")
    model = Telechat2ForCausalLM.from_pretrained(str(base), dtype=DTYPES[base_dtype(base)],
                                                 device_map=None if device == "cpu" else device)
    if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
        raise ValueError(f"{base} is a quantized checkpoint: LoRA weights cannot be merged into 4/8-bit weights "
                         "exactly. Merge into the unquantized base (set model.path to it); a QLoRA adapter "
                         "is merged that way.")
    for adapter in adapters:
        config = json.loads((adapter / "adapter_config.json").read_text())
        if config.get("peft_type") != "LORA":
            raise ValueError(f"{adapter}: only LoRA / DoRA adapters can be merged (got {config.get('peft_type')})")
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        log.info("merged %s", adapter)
    return model.eval(), base


def _save_bin(state_dict: dict, out: Path, max_shard: str) -> None:
    """pytorch_model.bin (or -0000N-of-0000M.bin shards + index): transformers 5 writes safetensors only."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state_dict, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size=max_shard)
    for filename, names in split.filename_to_tensors.items():
        torch.save({n: state_dict[n].contiguous().clone() for n in names}, out / filename)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")


def export(model, tokenizer_dir: str | Path, export_dir: str | Path, dtype: str = "auto",
           export_size: float = 5.0, legacy_format: bool = False) -> Path:
    """Write `model` as a TeleChat2 checkpoint directory: TeleChat2's parameter names, config.json for
    transformers and vLLM, the remote-code files, the tokenizer with its chat template and
    generation_config.json."""
    from telechat_lab.tokenizer import load_tokenizer, save_tokenizer

    out = Path(export_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors*"), *out.glob("pytorch_model*.bin*")]:
        stale.unlink()  # weights of an earlier export would be loaded instead of these
    if dtype == "auto":  # bf16 for an fp32 base, else the base's own dtype
        dtype = "bfloat16" if model.dtype == torch.float32 else str(model.dtype).replace("torch.", "")
    model = model.to(DTYPES[dtype])
    config = model.config
    config.architectures = ["TeleChat2ForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    config.use_cache = True
    max_shard = f"{int(export_size * 1000)}MB"
    if legacy_format:
        model.config.save_pretrained(out)
        _save_bin(model.state_dict(), out, max_shard)
    else:
        model.save_pretrained(out, max_shard_size=max_shard)
    # config.json: explicit num_key_value_heads (vLLM reads it), model_type telechat, the dtype saved, and
    # flash_attn, which the release's own modeling files read on every forward (SPEC section 7)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(architectures=["TeleChat2ForCausalLM"], model_type="telechat", auto_map=dict(AUTO_MAP),
               num_key_value_heads=config.num_key_value_heads, torch_dtype=dtype, dtype=dtype,
               flash_attn=bool(getattr(config, "flash_attn", False)))
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in REMOTE_CODE:
        shutil.copy(MODEL_DIR / name, out / name)
    tokenizer = load_tokenizer(tokenizer_dir)
    save_tokenizer(tokenizer, out)
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "do_sample": False,
                  "max_new_tokens": 1024, "repetition_penalty": 1.0}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out

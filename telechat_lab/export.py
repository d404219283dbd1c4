"""Merge adapters into their base and write a checkpoint directory that transformers
(`trust_remote_code=True`, with only torch + transformers installed) and vLLM load."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import torch

from telechat_lab.errors import CheckpointError, ConfigError, OutputDirError
from telechat_lab.files import path_relation
from telechat_lab.model import DTYPES
from telechat_lab.model.remote_code import AUTO_MAP, REMOTE_CODE, add_remote_code


def check_export_dir(export_dir: str | Path, base: Path, adapters: list[Path]) -> Path:
    """The export directory, refused (OutputDirError, nothing written) when it is, contains or lies inside the
    base or an adapter directory: merged weights would replace what they were made from."""
    out = Path(export_dir).expanduser().resolve()
    for name, path in [("the base model", base), *(("an adapter", a) for a in adapters)]:
        path = path.resolve()
        if relation := path_relation(out, path):
            raise OutputDirError(
                f"export_dir={out} {relation} {name} ({path}): choose another export_dir; nothing was written"
            )
    check_replaceable(out)
    return out


def check_replaceable(final: Path) -> None:
    """An export replaces an earlier export, or fills a new or empty directory; anything else is refused."""
    from telechat_lab.vllm_adapter import is_vllm_adapter

    if final.exists() and any(final.iterdir()) and not (is_export(final) or is_vllm_adapter(final)):
        raise OutputDirError(
            f"export_dir={final} is not empty and holds no earlier export: choose another "
            "export_dir (nothing was written)"
        )


def merge_adapters(base: Path, adapters: list[Path], device: str = "cpu"):
    """`base` with each adapter merged in, in order, in the base's own dtype (no fp32 copy of a large model).
    `base` and `adapters` as `telechat_lab.resolve.base_and_adapters` gives them (checked)."""
    from peft import PeftModel

    from telechat_lab.model.loading import checkpoint_dtype, load_model

    model = load_model(base, checkpoint_dtype(base), device_map=None if device == "cpu" else device)
    if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
        raise ConfigError(
            f"{base} is a quantized checkpoint: LoRA weights cannot be merged into 4/8-bit weights "
            "exactly. Merge into the unquantized base (set model.path to it); a QLoRA adapter "
            "is merged that way."
        )
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval()


def _save_bin(state_dict: dict, out: Path, max_shard: str) -> None:
    """pytorch_model.bin (or -0000N-of-0000M.bin shards + index): transformers 5 writes safetensors only."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=max_shard
    )
    for filename, names in split.filename_to_tensors.items():
        torch.save({n: state_dict[n].contiguous().clone() for n in names}, out / filename)
    if split.is_sharded:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
            "weight_map": split.tensor_to_filename,
        }
        (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")


def is_export(directory: Path) -> bool:
    """Whether `directory` holds an earlier export of this project (which a new export may replace); a tiny
    checkpoint carries the same files but is not one."""
    from telechat_lab.tiny import MARKER

    files = ("config.json", *REMOTE_CODE)
    return all((directory / name).is_file() for name in files) and not (directory / MARKER).exists()


def export(
    model,
    tokenizer_dir: str | Path,
    export_dir: str | Path,
    dtype: str = "auto",
    export_size: float = 5.0,
    legacy_format: bool = False,
    flash_attn: bool = False,
    seq_length: int | None = None,
    generation: dict | None = None,
    default_system: str | None = None,
) -> Path:
    """Write `model` as a TeleChat2 checkpoint directory: TeleChat2's parameter names, config.json for
    transformers and vLLM, the remote-code files, the tokenizer with its chat template and
    generation_config.json (`generation`'s sampling, else the release's recommended one); the chat template's
    default system prompt is `default_system` (None: TeleChat's). `seq_length` (vLLM's
    max_model_len; default: the base's, else its training_seqlen) and `flash_attn` (for the release's modeling
    files) go into config.json. Written beside `export_dir` and renamed into place: an earlier export there is
    replaced whole only once the new one is complete; a non-empty directory that is not an export is refused."""
    from telechat_lab.console import show_loading_progress, without_transformers_bars
    from telechat_lab.files import staged_dir
    from telechat_lab.tokenizer import BOS_ID, EOS_ID, PAD_ID, chat_template, load_tokenizer, save_tokenizer

    final = Path(export_dir).expanduser().resolve()
    check_replaceable(final)
    if dtype == "auto":  # bf16 for an fp32 base, else the base's own dtype
        dtype = "bfloat16" if model.dtype == torch.float32 else str(model.dtype).replace("torch.", "")
    model = model.to(DTYPES[dtype])
    config = model.config
    config.architectures = ["TeleChat2ForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    config.use_cache = True
    max_shard = f"{int(export_size * 1000)}MB"
    with staged_dir(final) as out:
        if legacy_format:
            model.config.save_pretrained(out)
            _save_bin(model.state_dict(), out, max_shard)
        else:
            weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            with without_transformers_bars(off=not show_loading_progress(weights)):  # a tiny model: at once
                model.save_pretrained(out, max_shard_size=max_shard)
        # config.json: explicit num_key_value_heads (vLLM reads it), model_type telechat, the dtype saved, and
        # flash_attn, which the release's own modeling files read on every forward (SPEC section 7)
        add_remote_code(
            out,
            architectures=["TeleChat2ForCausalLM"],
            model_type="telechat",
            num_key_value_heads=config.num_key_value_heads,
            torch_dtype=dtype,
            dtype=dtype,
            flash_attn=flash_attn,
            seq_length=seq_length or getattr(config, "seq_length", None) or config.training_seqlen,
        )
        tokenizer = load_tokenizer(tokenizer_dir, chat_template=chat_template(default_system))
        save_tokenizer(tokenizer, out, release_special_tokens=True)
        generation = {
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
            **(generation or release_sampling()),
        }
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return final


def release_sampling() -> dict:
    """The TeleChat2 release's recommended sampling (conf/merge.yaml's `generation` defaults)."""
    from telechat_lab.config.schema import ExportGenerationConfig

    return dataclasses.asdict(ExportGenerationConfig())


def merge_and_export(settings) -> Path:
    """merge.py: check the base, the adapters and the export directory before loading anything, merge, export."""
    from telechat_lab.adapter_origin import holds
    from telechat_lab.resolve import base_and_adapters
    from telechat_lab.trained_prompt import default_system_for

    try:
        base, adapters = base_and_adapters(settings.model.path, settings.adapter_path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}: refusing to merge (nothing was written)") from None
    check_export_dir(settings.export_dir, base, adapters)
    for line in filter(None, map(holds, adapters)):  # a preference run's adapter stacked onto its SFT one
        print(line)
    if settings.export_mode == "vllm_adapter":
        return export_vllm_adapter(base, adapters, settings.export_dir)
    model = merge_adapters(base, adapters, device=settings.export_device)
    out = export(
        model,
        base,
        settings.export_dir,
        dtype=settings.dtype,
        export_size=settings.export_size,
        legacy_format=settings.export_legacy_format,
        flash_attn=settings.flash_attn,
        seq_length=settings.seq_length,
        generation=dataclasses.asdict(settings.generation),
        default_system=default_system_for(adapters, settings.default_system, "merge"),
    )
    print(
        f"wrote {out}: {base} with {len(adapters)} adapter{'s' if len(adapters) != 1 else ''} merged\n"
        f"serve it: vllm serve {shlex.quote(str(out))} --trust-remote-code"
    )
    return out


def export_vllm_adapter(base: Path, adapters: list[Path], export_dir: str | Path) -> Path:
    """merge.py export_mode=vllm_adapter: the one adapter in vLLM's module layout (telechat_lab/vllm_adapter.py)."""
    from telechat_lab.files import read_json, staged_dir
    from telechat_lab.vllm_adapter import check_servable, convert_adapter, vllm_lora_rank

    if len(adapters) != 1:
        raise ConfigError(
            f"export_mode=vllm_adapter converts one adapter, got {len(adapters)}: vLLM applies one LoRA per "
            "request; merge the others into the base first (export_mode=merged) and convert the last one"
        )
    config = read_json(adapters[0] / "adapter_config.json", "the adapter config")
    check_servable(adapters[0], config)
    final = Path(export_dir).expanduser().resolve()
    with staged_dir(final) as out:
        convert_adapter(adapters[0], base, out)
    print(
        f"wrote {final}: {adapters[0]} in vLLM's LoRA layout\n"
        f"serve it: vllm serve {shlex.quote(str(base))} --trust-remote-code --enable-lora "
        f"--max-lora-rank {vllm_lora_rank(config)} --lora-modules {shlex.quote(f'{adapters[0].name}={final}')}"
    )
    return final

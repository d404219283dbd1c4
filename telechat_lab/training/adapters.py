"""The adapter group -> a trainable model: LoRA / DoRA / QLoRA through peft, full fine-tuning, or
freezing all but the last N blocks. QLoRA and DoRA are flags on one LoRA path, not classes; what each kind
implies is telechat_lab/adapter_kinds.py's table."""

from __future__ import annotations

from typing import Any

import torch

from telechat_lab.adapter_kinds import adapter_kind
from telechat_lab.config import AdapterConfig
from telechat_lab.config.schema import BLOCK_LINEAR_MODULES as ALL_TARGETS
from telechat_lab.model import DTYPES


def target_modules(target: Any) -> list[str]:
    if target == "all":
        return list(ALL_TARGETS)
    names = [t.strip() for t in target.split(",")] if isinstance(target, str) else list(target)
    unknown = sorted(set(names) - set(ALL_TARGETS) - {"lm_head"})
    if unknown:
        raise ValueError(f"adapter.target: unknown module(s) {unknown}; TeleChat2 has {ALL_TARGETS} (or 'all')")
    return names


def quantization_config(adapter: AdapterConfig):
    """bitsandbytes config for adapter.quantization (QLoRA), else None."""
    quant = adapter.quantization
    if not adapter_kind(adapter.type).quantized:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "adapter=qlora needs bitsandbytes: install the `qlora` extra (pip install 'telechat-lab[qlora]')"
        ) from err
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
    )


def apply_adapter(model: torch.nn.Module, adapter: AdapterConfig) -> torch.nn.Module:
    kind = adapter_kind(adapter.type)
    if kind.trains_whole_base:
        model.requires_grad_(True)
        return model
    if kind.trains_last_blocks:
        return _freeze_all_but(model, adapter.trainable_layers, adapter.modules_to_save or [])
    from peft import LoraConfig, get_peft_model

    if kind.quantized:
        # not peft's prepare_model_for_kbit_training: it also makes every weight left unquantised fp32, the
        # embeddings and lm_head of a 131072-token vocabulary included (4.3 GB for a frozen 7B)
        model.requires_grad_(False)
    config = LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=target_modules(adapter.target),
        use_rslora=adapter.rslora,
        use_dora=kind.dora,
        modules_to_save=adapter.modules_to_save,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _freeze_all_but(model: torch.nn.Module, n_layers: int, extra: list[str]) -> torch.nn.Module:
    n_total = model.config.n_layer
    if not 0 < n_layers <= n_total:
        raise ValueError(f"adapter.trainable_layers={n_layers}: the model has {n_total} blocks")
    blocks = tuple(f"transformer.h.{i}." for i in range(n_total - n_layers, n_total))
    names = [n for n, _ in model.named_parameters()]
    extra_matches = {}
    for module in extra:  # a module name anywhere in the tree: ln_f, lm_head, word_embeddings, ...
        key = "." + module.strip(".") + "."
        extra_matches[module] = {n for n in names if key in "." + n}
        if not extra_matches[module]:
            raise ValueError(f"adapter.modules_to_save: no module named '{module}' in TeleChat2")
    chosen = set().union(*extra_matches.values()) if extra_matches else set()
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(blocks) or name in chosen)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count as their unpacked number of elements, ZeRO-3 slices as the whole."""
    from .zero import full_numel

    trainable = total = 0
    for p in model.parameters():
        n = full_numel(p) * (2 if p.dtype == torch.uint8 else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def describe(adapter: AdapterConfig) -> str:
    """One line on what is trained, for the console."""
    kind = adapter_kind(adapter.type)
    if kind.trains_whole_base:
        return "full fine-tuning"
    if kind.trains_last_blocks:
        extra = f" and {', '.join(adapter.modules_to_save)}" if adapter.modules_to_save else ""
        return f"the last {adapter.trainable_layers} blocks{extra}"
    quant = f", base in {adapter.quantization.bits}-bit {adapter.quantization.quant_type}" if kind.quantized else ""
    targets = "every linear layer" if adapter.target == "all" else ", ".join(target_modules(adapter.target))
    return f"{adapter.type} rank {adapter.rank}, alpha {adapter.alpha:g} on {targets}{quant}"


def weight_dtypes(model: torch.nn.Module) -> str:
    """ "bfloat16 frozen, float32 trained weights" (or "float32 weights" when all are alike), for the console; 4-bit
    weights are named as such."""

    def name(p: torch.nn.Parameter) -> str:
        return "4-bit" if p.dtype == torch.uint8 else str(p.dtype).replace("torch.", "")

    frozen = {name(p) for p in model.parameters() if not p.requires_grad}
    trained = {name(p) for p in model.parameters() if p.requires_grad}
    if not frozen or frozen == trained:
        return f"{'/'.join(sorted(trained or frozen))} weights"
    return f"{'/'.join(sorted(frozen))} frozen, {'/'.join(sorted(trained))} trained weights"

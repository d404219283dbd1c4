"""The adapter kinds (`adapter.type`) and what each implies, in one table: callers ask the kind (`kind.uses_peft`,
`kind.quantized`, ...) instead of comparing its name. A new kind is one more row of `ADAPTER_KINDS`; the settings
that contradict a kind are found from the table by `contradictions`, so each row is checked the same way.

(The training stages of a later issue, sft / pt / dpo / kto, fit the same pattern: one frozen row per stage.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterKind:
    name: str
    uses_peft: bool  # a peft LoRA model is trained and saved (an adapter directory), not the base itself
    quantized: bool = False  # the frozen base is loaded quantised by bitsandbytes (adapter.quantization)
    dora: bool = False  # peft's weight-decomposed LoRA (adapter.use_dora)
    trains_whole_base: bool = False  # every weight of the base is trained (fp32 master weights, HF checkpoints)
    trains_last_blocks: bool = False  # the base is frozen but for its last adapter.trainable_layers blocks


ADAPTER_KINDS: dict[str, AdapterKind] = {
    kind.name: kind
    for kind in (
        AdapterKind("lora", uses_peft=True),
        AdapterKind("dora", uses_peft=True, dora=True),
        AdapterKind("qlora", uses_peft=True, quantized=True),
        AdapterKind("full", uses_peft=False, trains_whole_base=True),
        AdapterKind("freeze", uses_peft=False, trains_last_blocks=True),
    )
}


def adapter_kind(name: str) -> AdapterKind:
    """The row of `adapter.type` (a name the schema accepts: one of ADAPTER_KINDS)."""
    return ADAPTER_KINDS[name]


def contradictions(adapter: dict) -> list[str]:
    """One line for each setting of `adapter` (the adapter group, as plain values) that its kind contradicts:
    one that would train something other than what the run is named."""
    kind = ADAPTER_KINDS.get(adapter.get("type"))
    if kind is None:  # an unknown type: the schema's choices already name it
        return []
    problems = []
    quantization, use_dora = adapter.get("quantization"), adapter.get("use_dora")
    if quantization and not kind.quantized:
        what = "directly" if not kind.uses_peft else f"under the name {kind.name}"
        problems.append(
            f"adapter.quantization with adapter.type={kind.name}: a quantised base cannot be trained {what}; "
            "use adapter=qlora (or remove adapter.quantization)"
        )
    if kind.quantized and not quantization:
        problems.append(f"adapter={kind.name} needs adapter.quantization (bits, quant_type, ...)")
    if isinstance(use_dora, bool) and use_dora != kind.dora and (kind.uses_peft or use_dora):
        if kind.dora:
            problems.append(
                f"adapter.use_dora=false with adapter.type={kind.name}: that trains plain LoRA; use adapter=lora"
            )
        else:
            hint = " over an unquantised base" if kind.quantized else ""
            problems.append(
                f"adapter.use_dora=true with adapter.type={kind.name}: that is DoRA; use adapter=dora{hint}"
            )
    return problems

"""The training stages (`stage.name`) and what each implies, in one table, as adapter_kinds.py does for adapters:
callers ask the stage (`stage.data`, `stage.paired`, ...) instead of comparing its name. Data, adapters, hardware,
loggers, checkpoints and resume are one mechanism for every stage; the stage decides which records a dataset must
hold and what the training step computes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    data: str  # the records it reads: "sft" (conversations), "pt" (raw text), "pairwise" (chosen / rejected), "kto"
    paired: bool = False  # a batch holds chosen and rejected sequences of the same prompts (one forward)
    preference: bool = False  # a preference loss against a reference policy (or reference-free: stage.loss)
    help: str = ""


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("sft", "sft", help="supervised fine-tuning: the loss on the replies of conversations"),
        Stage("pt", "pt", help="continued pre-training: the loss on every token of raw text"),
        Stage("dpo", "pairwise", paired=True, preference=True, help="preference alignment on chosen/rejected pairs"),
        Stage("kto", "kto", preference=True, help="preference alignment on replies marked desirable or undesirable"),
    )
}
DATA_KINDS = ("sft", "pt", "pairwise", "kto")


def stage_of(name: str) -> Stage:
    """The row of `stage.name` (a name the schema accepts: one of STAGES)."""
    return STAGES[name]


def stages_reading(data: str) -> list[str]:
    """The stages whose data are of kind `data` (for messages: "a ranking dataset fits stage=dpo")."""
    return [stage.name for stage in STAGES.values() if stage.data == data]

"""The training stages (`stage.name`) and what each implies, in one table, as adapter_kinds.py does for adapters:
callers ask the stage (`stage.data`, `stage.paired`, ...) instead of comparing its name. Data, adapters, hardware,
loggers, checkpoints and resume are one mechanism for every stage; the stage decides which records a dataset must
hold and what the training step computes.

The preference settings (`stage.loss`, `stage.beta`, ...) are one schema (config/schema.py StageConfig) whose
fields default to null, "the stage's default": `settings()` fills them in from the tables below, and the validator
refuses a setting given to a stage or loss that does not use it (`contradictions()`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str
    data: str  # the records it reads: "sft" (conversations), "pt" (raw text), "pairwise" (chosen / rejected), "kto"
    paired: bool = False  # a batch holds chosen and rejected sequences of the same prompts (one forward)
    preference: bool = False  # a preference loss against a reference policy (or reference-free: stage.loss)
    defaults: dict[str, Any] = field(default_factory=dict)  # the stage.* settings it takes, and their defaults
    help: str = ""


@dataclass(frozen=True)
class Loss:
    """A paired preference loss (stage.loss); the formulas are in config/schema.py and training/preference.py."""

    name: str
    uses_reference: bool  # compares the policy with a reference policy (log-ratios); else reference-free
    mean_logps: bool  # the sequence log-probability is the mean over its tokens (else the sum), as TRL computes it
    settings: tuple[str, ...]  # the loss-specific stage.* settings it reads (besides beta)
    help: str = ""


LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        Loss("sigmoid", True, False, ("label_smoothing", "sft_weight"), "DPO, Rafailov et al. 2023"),
        Loss("ipo", True, False, ("sft_weight",), "IPO, Azar et al. 2023 (log-ratios per token, as TRL)"),
        Loss("orpo", False, True, (), "ORPO, Hong et al. 2024 (reference-free, its own SFT term)"),
        Loss("simpo", False, True, ("label_smoothing", "simpo_gamma", "sft_weight"), "SimPO, Meng et al. 2024"),
    )
}

_REFERENCE = {"reference": None, "precompute_reference": False}
# TRL's defaults: DPOConfig / KTOConfig beta 0.1, CPOConfig simpo_gamma 0.5, KTOConfig weights 1.0
_DPO = {"loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "simpo_gamma": 0.5, "sft_weight": 0.0, **_REFERENCE}
_KTO = {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0, **_REFERENCE}  # precompute: refused

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("sft", "sft", help="supervised fine-tuning: the loss on the replies of conversations"),
        Stage("pt", "pt", help="continued pre-training: the loss on every token of raw text"),
        Stage(
            "dpo",
            "pairwise",
            paired=True,
            preference=True,
            defaults=_DPO,
            help="preference alignment on chosen/rejected pairs",
        ),
        Stage(
            "kto",
            "kto",
            preference=True,
            defaults=_KTO,
            help="preference alignment on replies marked desirable or undesirable",
        ),
    )
}
DATA_KINDS = ("sft", "pt", "pairwise", "kto")
STAGE_SETTINGS = ("loss", "beta", "label_smoothing", "simpo_gamma", "sft_weight", "reference", "precompute_reference")
STAGE_SETTINGS += ("desirable_weight", "undesirable_weight")


def stage_of(name: str) -> Stage:
    """The row of `stage.name` (a name the schema accepts: one of STAGES)."""
    return STAGES[name]


def stages_reading(data: str) -> list[str]:
    """The stages whose data are of kind `data` (for messages: "a ranking dataset fits stage=dpo")."""
    return [stage.name for stage in STAGES.values() if stage.data == data]


def _given(value: Any) -> bool:
    return value is not None and value is not False


def contradictions(stage: dict) -> list[str]:
    """Each stage.* setting given (not null / false) to a stage or loss that does not read it, one line each."""
    row = STAGES.get(stage.get("name"))
    if row is None:
        return []
    problems = []
    for key in STAGE_SETTINGS:
        if _given(stage.get(key)) and key not in row.defaults:
            users = [s.name for s in STAGES.values() if key in s.defaults]
            problems.append(
                f"stage.{key}={stage[key]}: stage={row.name} has no {key} (it is for stage={'|'.join(users)})"
            )
    loss = LOSSES.get(stage.get("loss") or row.defaults.get("loss"))
    if row.paired and loss is not None:
        for key in ("label_smoothing", "simpo_gamma", "sft_weight"):
            if _given(stage.get(key)) and key not in loss.settings:
                users = [name for name, other in LOSSES.items() if key in other.settings]
                why = " (ORPO's loss holds its own SFT term)" if key == "sft_weight" and loss.name == "orpo" else ""
                problems.append(
                    f"stage.{key}={stage[key]}: stage.loss={loss.name} does not use it "
                    f"(it is for stage.loss={'|'.join(users)}){why}"
                )
        if not loss.uses_reference and _given(stage.get("precompute_reference")):
            problems.append(
                f"stage.precompute_reference=true: stage.loss={loss.name} is reference-free (there are no reference "
                "log-probabilities to precompute)"
            )
    if row.name == "kto" and _given(stage.get("precompute_reference")):
        problems.append(
            "stage.precompute_reference=true: stage=kto's KL rows pair each prompt with another example's completion "
            "of the same batch, which changes every epoch, so their reference cannot be computed beforehand"
        )
    smoothing = stage.get("label_smoothing")
    if isinstance(smoothing, (int, float)) and not isinstance(smoothing, bool) and smoothing >= 0.5:
        problems.append(
            f"stage.label_smoothing={smoothing}: must be below 0.5 (the chance that a pair's labels are flipped)"
        )
    return problems


def settings(stage: Any) -> dict[str, Any]:
    """The stage's settings with its defaults where they are null: {name, loss, beta, ...} (only those it reads)."""
    get = stage.get if isinstance(stage, dict) else lambda key, default=None: getattr(stage, key, default)
    row = STAGES[get("name")]
    values = {"name": row.name}
    for key, default in row.defaults.items():
        value = get(key)
        values[key] = default if value is None else value
    return values

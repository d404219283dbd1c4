"""What an adapter a run saved holds besides its own training, for the commands that use it (merge): a preference
stage trained from an SFT adapter (`stage.reference=SFT_RUN`) saves the two stacked into one adapter on the
original base (training/objectives.stack_onto_reference), and records that in `stacked.json` beside it. An
adapter without the file holds only its own run's training."""

from __future__ import annotations

import json
from pathlib import Path

from telechat_lab.files import write_json

STACKED = "stacked.json"


def record_stacked(directory: Path, reference: Path, stage: str) -> None:
    """`directory`'s adapter holds the adapter `reference` and, trained on top of it, this run's `stage`."""
    write_json(
        directory / STACKED, {"reference": str(reference), "reference_stage": _stage_of(reference), "stage": stage}
    )


def _stage_of(run: Path) -> str | None:
    """The stage the run that saved `run`'s adapter trained (its config.yaml), None where it recorded none."""
    from telechat_lab.trained_prompt import recorded_setting

    return recorded_setting(run, "stage.name", None)


def holds(adapter: Path) -> str | None:
    """One line saying what `adapter` holds when it is stacked (None otherwise, or where its record is unreadable:
    the line is information, merging does not depend on it)."""
    try:
        record = json.loads((adapter / STACKED).read_text(encoding="utf-8"))
        reference, stage = record["reference"], record["stage"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    earlier = record.get("reference_stage")
    first = f"the {earlier.upper()} run {reference}" if isinstance(earlier, str) else f"the adapter {reference}"
    return (
        f"{adapter} holds {first} and the {str(stage).upper()} training on top of it "
        "(the two stacked as one adapter on the original base)"
    )

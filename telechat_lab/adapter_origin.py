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


def _record(adapter: Path) -> dict | None:
    """`adapter`'s stacked.json (None where it has none, or one that cannot be read: what it says is information
    and a check, merging does not depend on it)."""
    try:
        record = json.loads((adapter / STACKED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("reference"), str) else None


def held_reference(adapter: Path) -> Path | None:
    """The adapter that `adapter` holds stacked under its own training, None when it holds none."""
    record = _record(adapter)
    return Path(record["reference"]) if record else None


def holds(adapter: Path) -> str | None:
    """One line saying what `adapter` holds when it is stacked (None otherwise)."""
    record = _record(adapter)
    if record is None:
        return None
    earlier, reference = record.get("reference_stage"), record["reference"]
    first = f"the {earlier.upper()} run {reference}" if isinstance(earlier, str) else f"the adapter {reference}"
    return (
        f"{adapter} holds {first} and the {str(record.get('stage')).upper()} training on top of it "
        "(the two stacked as one adapter on the original base)"
    )


def check_not_applied_twice(adapters: list[Path]) -> None:
    """CheckpointError when the adapters listed (to be applied one on top of another) name one twice, or include
    one that another of them already holds stacked."""
    from telechat_lab.errors import CheckpointError

    seen: dict[Path, Path] = {}
    for adapter in adapters:
        same = seen.setdefault(adapter.resolve(), adapter)
        if same is not adapter:
            raise CheckpointError(f"adapter_path lists {same} twice: it would be applied twice; give it once")
    for adapter in adapters:
        reference = held_reference(adapter)
        if reference is not None and reference.resolve() in seen and reference.resolve() != adapter.resolve():
            raise CheckpointError(
                f"adapter_path lists {seen[reference.resolve()]} and {adapter}, but {holds(adapter)}: it would be "
                f"applied twice; give adapter_path={adapter} alone"
            )

"""A run's output directory: what may be written there, what `resume=true` continues, and which run a
checkpoint belongs to.

- A directory that already holds a run is never written over: `resume=true` continues that run, `overwrite=true`
  clears it first (only a directory a telechat-lab run wrote), anything else is refused before anything is
  written. No output directory may be, contain or lie inside the model or the dataset directory.
- A run is identified by the hash of the settings that define it (`run_identity`: model, data, adapter,
  optimisation, seed, batch geometry; every field whose `on_resume` is "fixed" in telechat_lab.config).
  `run.json` records it with the command's overrides; every resumable checkpoint records it too.
- `resume=true` takes the run's own saved `config.yaml`; settings given with it are applied only where they do
  not change the run (logging, speed, and limits that may only grow such as `trainer.max_steps`), otherwise the
  resume is refused with the list of keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from telechat_lab.config import field_meta
from telechat_lab.errors import ConfigError, OutputDirError
from telechat_lab.files import TEMP_PREFIX, path_relation, read_json, remove_entry, write_json
from telechat_lab.training.runlock import LOCK_FILE

RUN_RECORD = "run.json"
REPLACED = ".replaced-run"  # overwrite=true: the earlier run, kept until the new one has a checkpoint
REPLACING = ".replacing-run"  # ... while it is being set aside
RESTORING = ".restoring-run"  # ... while it is being put back
ABANDONED = f"{TEMP_PREFIX}abandoned-run"  # ... the new run's files, while they are being removed
CONFIG_FILE = "config.yaml"
ENV_INTERPOLATION = re.compile(r"\$\{\s*oc\.env\s*:")
REFERENCE = re.compile(r"\$\{\s*([\w.]+)\s*\}")
HYDRA_FILES = (".hydra",)  # what Hydra writes into the run directory before the run starts (and *.log)
TRAINER_FIXED = {"accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm"}
TRAINER_GROW = {"max_steps", "max_epochs"}


# ------------------------------------------------------------------------------------------------ run identity


def on_resume(path: str) -> str:
    """How the setting at a dotted path may change on resume: "fixed", "free" or "grow"."""
    group, _, rest = path.partition(".")
    if group == "trainer":
        key = rest.split(".")[0]
        return "fixed" if key in TRAINER_FIXED else "grow" if key in TRAINER_GROW else "free"
    meta = field_meta(path)
    if meta is None:  # inside a free-form mapping (deepspeed.overrides, a logger): its field decides
        parent = path.rsplit(".", 1)[0]
        return on_resume(parent) if "." in path else "fixed"
    return meta.get("on_resume", "fixed")


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def run_identity(values: dict) -> dict:
    """The settings that define a run (every leaf whose change would make it another run)."""
    return {
        path: value
        for path, value in sorted(_leaves(values, "").items())
        if path.split(".")[0] != "hydra" and on_resume(path) == "fixed"
    }


def run_id(values: dict) -> str:
    return hashlib.sha256(json.dumps(run_identity(values), sort_keys=True, default=str).encode()).hexdigest()[:16]


_ABSENT = object()


def _get(values: dict, path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def resume_changes(saved: dict, given: dict, explicit: list[str], every: bool = False) -> tuple[dict, list[str]]:
    """Apply to the run's `saved` settings each explicitly given key (`explicit`: dotted paths or groups) whose
    value in `given` differs (a key absent from `given` is removed); returns (settings, refused), `refused`
    listing each change that would make it another run (applied too when `every`: the settings asked for)."""
    merged = json.loads(json.dumps(saved, default=str))
    refused: list[str] = []
    for key in explicit:
        old, new = _get(saved, key), _get(given, key)
        if old == new:
            continue
        old_leaves = _leaves(old, key) if old is not _ABSENT else {}
        new_leaves = _leaves(new, key) if new is not _ABSENT else {}
        wrong = []
        for path in sorted(set(old_leaves) | set(new_leaves)):
            before, after = old_leaves.get(path), new_leaves.get(path)
            if before == after:
                continue
            rule = on_resume(path)
            if rule == "fixed":
                wrong.append(f"{path}: {before} -> {after}")
            elif rule == "grow" and not _grows(before, after):
                wrong.append(f"{path}: {before} -> {after} (may only grow when resuming)")
        refused += wrong
        if wrong and not every:
            continue
        if new is _ABSENT:
            _delete(merged, key)
        else:
            _set(merged, key, new)
    return merged, refused


def _delete(values: dict, path: str) -> None:
    *parents, name = path.split(".")
    node = _get(values, ".".join(parents)) if parents else values
    if isinstance(node, dict):
        node.pop(name, None)


def _grows(old: Any, new: Any) -> bool:
    unlimited = (None, -1)
    if new in unlimited:
        return True
    return old not in unlimited and isinstance(new, (int, float)) and new >= old


def _set(values: dict, path: str, value: Any) -> None:
    *parents, name = path.split(".")
    node = values
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[name] = value


# ------------------------------------------------------------------------------------------------ the directory


def run_files(directory: Path) -> list[str]:
    """What a run (or anything else) left in `directory`: every entry but Hydra's own files."""
    if not directory.is_dir():
        return []
    own = {*HYDRA_FILES, LOCK_FILE, REPLACED, REPLACING, RESTORING, ABANDONED}
    return sorted(p.name for p in directory.iterdir() if p.name not in own and p.suffix != ".log")


def check_outside(directory: Path, protected: dict[str, Path]) -> None:
    """Refuse (OutputDirError) an output directory that is, contains or lies inside a protected one."""
    directory = directory.resolve()
    for name, path in protected.items():
        relation = path_relation(directory, path.resolve())
        if relation:
            raise OutputDirError(
                f"output_dir={directory} {relation} {name}={path}: choose an output_dir outside it "
                "(nothing was written)"
            )


def check_output_dir(directory: Path, *, resume: bool, overwrite: bool, protected: dict[str, Path]) -> None:
    """Refuse (OutputDirError) an output directory whose contents the run would destroy; see the module doc."""
    directory = directory.resolve()
    check_outside(directory, protected)
    used = run_files(directory)
    if resume:
        if not (directory / RUN_RECORD).is_file() and not (directory / CONFIG_FILE).is_file():
            raise OutputDirError(
                f"resume=true but output_dir={directory} holds no run to continue "
                f"({'it does not exist' if not directory.exists() else 'no run.json or config.yaml'})"
            )
        return
    if not used:
        return
    listed = ", ".join(used[:6]) + (", ..." if len(used) > 6 else "")
    if not overwrite:
        raise OutputDirError(
            f"output_dir={directory} already holds a run ({listed}). Continue it with resume=true, "
            "start it again with overwrite=true (which deletes it), or choose another output_dir; "
            "nothing was written"
        )
    if not (directory / RUN_RECORD).is_file() and not (directory / CONFIG_FILE).is_file():
        raise OutputDirError(
            f"overwrite=true: output_dir={directory} is not empty ({listed}) and was not written by "
            "telechat-lab; remove it yourself or choose another output_dir"
        )


def set_aside_run(directory: Path) -> Path:
    """overwrite=true: the earlier run's files (not Hydra's files of this one) move into REPLACED, deleted once the
    new run has a checkpoint (`discard_replaced_run`), put back if it fails before (`restore_replaced_run`).

    Crash-safe at every point: they move one by one into REPLACING, which becomes REPLACED by one rename when
    all are there; until then `recover_interrupted_overwrite` puts them back (the new run writes nothing before)."""
    partial = directory / REPLACING
    partial.mkdir()
    for name in run_files(directory):
        os.replace(directory / name, partial / name)
    os.replace(partial, directory / REPLACED)
    return directory / REPLACED


def restore_replaced_run(directory: Path) -> None:
    """The new run failed before its first checkpoint: its files go, the earlier run's come back. Crash-safe: the
    new run's files move into a temporary directory first, then REPLACED becomes RESTORING by one rename (from
    then on the directory holds only the earlier run's files), whose entries then move back."""
    aside = directory / REPLACED
    if aside.is_dir():
        abandoned = directory / ABANDONED
        abandoned.mkdir(exist_ok=True)
        for name in run_files(directory):
            if (abandoned / name).exists() or (abandoned / name).is_symlink():
                remove_entry(abandoned / name)
            os.replace(directory / name, abandoned / name)
        os.replace(aside, directory / RESTORING)
    for name in (RESTORING, REPLACING):  # REPLACING: a set-aside interrupted before the new run wrote anything
        back = directory / name
        if back.is_dir():
            for item in back.iterdir():
                os.replace(item, directory / item.name)
            back.rmdir()
    shutil.rmtree(directory / ABANDONED, ignore_errors=True)


def discard_replaced_run(directory: Path) -> None:
    """The new run has a checkpoint: the earlier one, set aside, goes (renamed first, so that a crash while it is
    deleted leaves a temporary directory, never a half REPLACED)."""
    aside = directory / REPLACED
    if aside.is_dir():
        trash = directory / f"{TEMP_PREFIX}replaced-run-{os.getpid()}"
        os.replace(aside, trash)
        shutil.rmtree(trash, ignore_errors=True)


def has_checkpoint(directory: Path) -> bool:
    """The run in `directory` wrote a resumable checkpoint (each is renamed into place whole)."""
    found = (directory / "checkpoints").glob("step-*.ckpt")
    return any(not p.name.startswith(TEMP_PREFIX) for p in found)


def interrupted_overwrite(directory: Path) -> bool:
    return any((directory / name).is_dir() for name in (REPLACING, REPLACED, RESTORING))


def recover_interrupted_overwrite(directory: Path) -> str | None:
    """An overwrite=true that was killed: put the earlier run back when the new one never wrote a checkpoint,
    else keep the new one (resumable) and discard the earlier. Returns what was done (None: nothing to do)."""
    if not interrupted_overwrite(directory):
        return None
    if (directory / REPLACED).is_dir() and has_checkpoint(directory):
        discard_replaced_run(directory)
        return f"an interrupted overwrite=true had started a new run in {directory}: kept (it has a checkpoint)"
    restore_replaced_run(directory)
    return f"an interrupted overwrite=true was undone: the earlier run in {directory} is back"


def from_environment(raw: dict) -> dict[str, Any]:
    """The settings of `raw` (unresolved) whose value comes from the environment, by dotted path, unresolved: an
    ${oc.env:...} interpolation, or an interpolation of such a setting. The run writes and logs these as they are
    (a secret is not copied into its files), and a resume resolves them again."""
    leaves = {path: value for path, value in _leaves(raw, "").items() if "${" in json.dumps(value, default=str)}
    found = {path: value for path, value in leaves.items() if ENV_INTERPOLATION.search(json.dumps(value, default=str))}
    grown = True
    while grown:
        grown = False
        for path, value in leaves.items():
            refs = REFERENCE.findall(json.dumps(value, default=str))
            if path not in found and any(_overlaps(ref, other) for ref in refs for other in found):
                found[path], grown = value, True
    return found


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def recorded_values(values: dict, raw: dict) -> dict:
    """`values` as the run writes and logs them: the settings from the environment left unresolved."""
    recorded = json.loads(json.dumps(values, default=str))
    for path, value in from_environment(raw).items():
        if _get(recorded, path) is not _ABSENT:
            _set(recorded, path, value)
    return recorded


def resolved_values(recorded: dict, source: Path) -> dict:
    """Settings read back from a run's file, their interpolations (from the environment) resolved again."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.create(recorded), resolve=True)
    except Exception as err:
        raise ConfigError(
            f"{source} reads a setting from the environment that does not resolve now ({err}); set it and resume again"
        ) from err


def write_run_record(directory: Path, values: dict, overrides: list[str]) -> dict:
    record = {
        "run_id": run_id(values),
        "overrides": list(overrides),
        "created": datetime.now().isoformat(timespec="seconds"),
        "pid": os.getpid(),
    }
    write_json(directory / RUN_RECORD, record)
    return record


def write_json_record(directory: Path, record: dict) -> None:
    write_json(directory / RUN_RECORD, record)


def read_run_record(directory: Path) -> dict:
    path = directory / RUN_RECORD
    return read_json(path, "the run record") if path.is_file() else {}


def saved_settings(directory: Path) -> dict:
    """The run's own settings (its config.yaml)."""
    from omegaconf import OmegaConf

    path = directory / CONFIG_FILE
    if not path.is_file():
        raise OutputDirError(f"resume=true: {path} does not exist, so the run's settings are unknown")
    try:
        values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:
        raise OutputDirError(f"resume=true: {path} is not readable YAML ({err})") from err
    if not isinstance(values, dict):
        raise OutputDirError(f"resume=true: {path} does not hold a run's settings")
    return values


def explicit_keys(overrides: list[str]) -> list[str]:
    """The keys (or groups) a command line sets, except where the run is and whether it resumes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = []
    for override in OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")]):
        key = override.key_or_group.lstrip("+~")
        if key.split(".")[0] not in ("hydra", "output_dir", "resume", "overwrite"):
            keys.append(key.replace("/", "."))
    return keys


def resumed_settings(directory: Path, given: dict, overrides: list[str], check=None) -> dict:
    """The settings a resumed run continues with (the saved ones, plus the allowed changes); ConfigError listing
    the changes that would make it another run. `check(settings)`: called first with the settings the command asks
    for (every change applied), to report all their problems (validation) before the refused changes."""
    saved, explicit = saved_settings(directory), explicit_keys(overrides)
    if check is not None:
        check(_resumed_in(resume_changes(saved, given, explicit, every=True)[0], directory))
    merged, refused = resume_changes(saved, given, explicit)
    if refused:
        raise ConfigError(
            "resume=true continues the run as it was set up; these settings would change it:\n  - "
            + "\n  - ".join(refused)
            + "\nstart a new run (another output_dir) to change them"
        )
    return _resumed_in(merged, directory)


def _resumed_in(settings: dict, directory: Path) -> dict:
    settings["output_dir"], settings["resume"], settings["overwrite"] = str(directory), True, False
    return settings

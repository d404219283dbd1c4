"""A checkpoint never runs code (issue 17, item 1): what resume reads from `checkpoints/` is loaded weights-only,
its step and run come from a JSON record beside it, and a crafted pickle is refused before anything of it runs."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import losses, run_train

from telechat_lab.errors import CheckpointError


class _Payload:
    """Unpickling this writes a marker file: proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _crafted(path: Path, marker: Path) -> None:
    """A file that torch.load(weights_only=False) would unpickle into running code, shaped like a checkpoint."""
    torch.save({"global_step": 99, "telechat_run": {"run_id": None}, "payload": _Payload(marker)}, path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "run"
    run_train(out, "trainer.max_steps=2", "save_steps=1", "save_total_limit=null")
    return out


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    return out


def test_each_checkpoint_has_a_record_of_its_step_and_run_beside_it(run_dir):
    from telechat_lab.training.rundir import read_run_record

    run_id = read_run_record(run_dir)["run_id"]
    for step in (1, 2):
        record = json.loads((run_dir / "checkpoints" / f"step-{step:07d}.json").read_text())
        assert {k: record[k] for k in ("step", "run_id", "final")} == {
            "step": step,
            "run_id": run_id,
            "final": step == 2,
        }
        assert record["trainer"]["max_steps"] == 2  # the limits its last step was the last of


@pytest.mark.parametrize("with_record", [False, True])
def test_a_crafted_checkpoint_is_refused_on_resume_and_runs_nothing(run_dir, tmp_path, with_record):
    out = _copy(run_dir, tmp_path)
    marker = tmp_path / "pwned"
    crafted = out / "checkpoints" / "step-0000099.ckpt"
    _crafted(crafted, marker)
    if with_record:  # a record that claims it is this run's newest: the file itself is still checked
        run_id = json.loads((out / "run.json").read_text())["run_id"]
        (out / "checkpoints" / "step-0000099.json").write_text(json.dumps({"step": 99, "run_id": run_id}))
    with pytest.raises(CheckpointError, match=r"step-0000099\.ckpt is not a checkpoint telechat-lab wrote"):
        run_train(out, "resume=true", "trainer.max_steps=3")
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the oracle: a weights-only load refuses it too
        torch.load(crafted, weights_only=True)


def test_a_crafted_checkpoint_is_refused_on_the_command_line(run_dir, tmp_path):
    from helpers import QUICK, train_cli

    out = _copy(run_dir, tmp_path)
    marker = tmp_path / "pwned"
    _crafted(out / "checkpoints" / "step-0000099.ckpt", marker)
    proc = train_cli(
        [*QUICK, f"data.cache_dir={tmp_path}/cache", f"output_dir={out}", "resume=true", "trainer.max_steps=3"],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is not a checkpoint telechat-lab wrote" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_resume_reads_records_not_checkpoints_to_choose(run_dir, tmp_path, monkeypatch):
    """Only the chosen checkpoint is opened (weights-only): the others' steps come from their records."""
    from telechat_lab.training import checkpoints

    out = _copy(run_dir, tmp_path)
    opened = []
    real = checkpoints.load_checkpoint_file
    monkeypatch.setattr(checkpoints, "load_checkpoint_file", lambda path, *a: opened.append(path.name) or real(path))
    chosen = checkpoints.newest_checkpoint(out / "checkpoints", json.loads((out / "run.json").read_text())["run_id"])
    assert chosen.name == "step-0000002.ckpt" and opened == ["step-0000002.ckpt"]


def test_a_resume_from_a_checkpoint_with_its_record_continues_exactly(run_dir, tmp_path):
    out = _copy(run_dir, tmp_path)
    (out / "checkpoints" / "step-0000002.json").unlink()  # an older version's checkpoint: no record beside it
    run_train(out, "resume=true", "trainer.max_steps=3")
    assert len(losses(out)) == 3
    assert json.loads((out / "checkpoints" / "step-0000003.json").read_text())["step"] == 3


def test_deepspeed_files_are_checked_with_only_its_own_classes_allowed(tmp_path):
    """A DeepSpeed checkpoint is a directory its engine loads with weights_only=False: each file is loaded
    weights-only first, with only DeepSpeed's own classes allowed."""
    from telechat_lab.training.checkpoints import verify_checkpoint

    good = tmp_path / "step-0000004.ckpt" / "checkpoint"
    good.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "global_steps": 4}, good / "mp_rank_00_model_states.pt")
    verify_checkpoint(good.parent)
    marker = tmp_path / "pwned"
    _crafted(good / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(CheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt is not a checkpoint"):
        verify_checkpoint(good.parent)
    assert not marker.exists()

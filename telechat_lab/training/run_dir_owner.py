"""The one owner of a run's output directory in this process, from the claim to the release:

- `RunDir.claim`: where the directory lies (never in the model or the dataset), whose it is (runlock: one live
  process at a time), an interrupted overwrite=true finished, then the output directory's rules (rundir:
  nothing the user has is overwritten). Once per process: `telechat-lab train` claims before Hydra starts (so
  that Hydra writes `.hydra/` and `train.log` only into a directory the run may use, `claim_for_command_line`);
  `prepare` then finds the claim held and checks nothing again. The Python API's `train(cfg)` claims in prepare.
- `set_aside`: overwrite=true moves the earlier run aside; `commit` (DiscardReplacedRun, once the new run has a
  checkpoint) deletes it; `undo` (a run that failed before its first step) puts it back and removes what this
  process created; `leave_unchanged` (a completed run resumed: nothing to do) leaves not even the lock's record;
  `release` lets the directory go.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from telechat_lab.errors import reported
from telechat_lab.hydra_runtime import job_dir

from . import rundir
from .process import OUTPUT_ENV, launched_worker, requeued_by_slurm
from .runlock import Claim, check_free, claim

log = logging.getLogger(__name__)
_owned: dict[Path, RunDir] = {}


@dataclass(eq=False)
class RunDir:
    """A run directory this process holds; `resume`: the run continues the one there (given, or a SLURM requeue)."""

    path: Path
    lock: Claim
    resume: bool
    overwrite: bool
    settings_checked: bool = False  # resume: the run's settings with the command's changes validated (before Hydra)

    @classmethod
    def claim(
        cls, path: Path, protected: dict[str, Path], *, resume: bool, overwrite: bool, run_id: str | None = None
    ) -> RunDir:
        """Take `path` for this run and check its rules (OutputDirError, the directory left as it was: what the
        lock made goes again). `run_id`: under a SLURM requeue, the command's run, which a run there with that id
        resumes. A directory this process holds already is returned as it was claimed (checked once)."""
        path = Path(path)
        if path in _owned:
            return _owned[path]
        rundir.check_outside(path, protected)
        check_free(path)  # another live holder: refused before anything is written, not even the lock file
        lock = claim(path)
        try:
            note = rundir.recover_interrupted_overwrite(path)
            if note:
                print(f"note: {note}", file=sys.stderr, flush=True)
            if run_id is not None and not resume and rundir.read_run_record(path).get("run_id") == run_id:
                log.warning("SLURM requeued this job: resuming the run in %s", path)
                resume = True
            rundir.check_output_dir(path, resume=resume, overwrite=overwrite, protected={})  # under the lock
        except BaseException:
            lock.undo()
            lock.release()
            raise
        owner = _owned[path] = cls(path, lock, resume, overwrite)
        return owner

    def set_aside(self) -> None:
        """overwrite=true: the earlier run's files move aside (rundir.set_aside_run) until `commit` or `undo`."""
        if self.overwrite and not self.resume and rundir.run_files(self.path):
            rundir.set_aside_run(self.path)

    @staticmethod
    def commit(path: Path) -> None:
        """The new run has a checkpoint: the run it replaces goes for good. (Static: a rank that a launcher such as
        torchrun started holds no claim, and rank 0 commits all the same.)"""
        rundir.discard_replaced_run(path)

    def undo(self) -> None:
        """The run failed before its first step: the directory as the claim found it (a replaced run put back,
        what this process created removed, the whole directory when the claim made it)."""
        rundir.restore_replaced_run(self.path)
        self.lock.undo()

    def leave_unchanged(self) -> None:
        """Nothing was done (a completed run resumed): the lock file's record of its earlier holder back."""
        self.lock.restore_record()

    def release(self) -> None:
        _owned.pop(self.path, None)
        self.lock.release()


def owned() -> list[RunDir]:
    """The run directories this process holds."""
    return list(_owned.values())


def undo_unstarted() -> None:
    """A run that failed before its first step (a bad dataset, a model that does not load) leaves its output
    directory as it found it, so that the corrected command can use it (a launched rank holds nothing)."""
    for owner in owned():
        owner.undo()


def resolve_output_dir(output_dir: str) -> Path:
    """The run's directory: output_dir, or in a Hydra multirun the job's own directory (a launched rank: its
    parent's, pinned in OUTPUT_ENV)."""
    import os

    if os.environ.get(OUTPUT_ENV) and launched_worker():
        return Path(os.environ[OUTPUT_ENV])
    return job_dir() or Path(str(output_dir)).expanduser().resolve()  # str: a resume's is validated later


def protected_dirs(values: dict) -> dict[str, Path]:
    """What no output directory may be, contain or lie in: the model's and the dataset's directories."""
    from telechat_lab.data.pipeline import resolved_dataset_dir
    from telechat_lab.resolve import model_dir

    return {
        "model.path": model_dir(values["model"]["path"]),  # the demo's tiny model too
        "data.dataset_dir": resolved_dataset_dir(values["data"]["dataset_dir"]),
    }


def claim_sweep_dir(path: Path) -> Claim:
    """A sweep's directory holds its jobs' own: it is locked for the sweep (one sweep at a time), never undone."""
    return claim(Path(path).resolve(), "hydra.sweep.dir")


def claim_for_command_line(cfg: DictConfig | None, argv: list[str]) -> RunDir | None:
    """Before Hydra starts (and writes into the output directory): claim the run directory, held until the process
    ends; for a sweep, only where its directory (given) lies is checked and it is locked (each job claims its own).
    A refusal is printed and exits 2. The claim (None: none was taken here)."""
    from telechat_lab.config import config_values

    if cfg is None or launched_worker():
        return None
    values = config_values(cfg)
    with reported():
        protected = protected_dirs(values)
        if {"-m", "--multirun"} & set(argv):
            given = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.sweep.dir=")]
            if given and "${" not in given[-1]:
                rundir.check_outside(resolve_output_dir(given[-1]), protected)
                claim_sweep_dir(resolve_output_dir(given[-1]))
            return None
        if requeued_by_slurm() and not values["resume"]:
            return None  # prepare() resumes the run when it is this command's own (its id needs the resolved paths)
        directory = resolve_output_dir(values["output_dir"])
        owner = RunDir.claim(directory, protected, resume=values["resume"] is True, overwrite=bool(values["overwrite"]))
    sys.stdout.flush()
    return owner

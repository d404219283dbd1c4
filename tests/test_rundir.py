"""The run directory's life (issue 17, items 2, 3 and 9): one live process owns a run (or sweep) directory, an
interrupted overwrite=true is recoverable from every point, settings from the environment are not copied into
what a run writes, printed commands paste back into a shell, and outputs get the usual file modes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import QUICK, REPO, run_train, train_cli, tree_snapshot
from hydra.core.override_parser.overrides_parser import OverridesParser

from telechat_lab.errors import OutputDirError
from telechat_lab.training import rundir
from telechat_lab.training.rundir import (
    REPLACED,
    interrupted_overwrite,
    recover_interrupted_overwrite,
    restore_replaced_run,
    run_files,
    set_aside_run,
)
from telechat_lab.training.runlock import claim

HOLD = (
    "import sys, time; from pathlib import Path; from telechat_lab.training.runlock import claim; "
    "claim(Path(sys.argv[1])); (Path(sys.argv[1]) / 'weights.bin').write_bytes(b'w' * 64); "
    "print('held', flush=True); time.sleep(300)"
)


@contextmanager
def held_by_another_process(directory: Path):
    """A live process that claimed `directory` (made it) and wrote a file there."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def train_in(out: Path, *overrides: str) -> dict:
    """run_train for any path (quoted for Hydra)."""
    from helpers import compose_train

    from telechat_lab.training.process import override_value
    from telechat_lab.training.run import train

    overrides = [*QUICK, *overrides, f"output_dir={override_value(str(out))}", f"data.cache_dir={out.parent}/cache"]
    return train(compose_train(overrides), overrides)


def cli(tmp_path, *args):
    return train_cli([*QUICK, f"data.cache_dir={tmp_path}/cache", *args], tmp_path, check=False)


# ------------------------------------------------------------------------ 2. one owner at a time


def test_a_held_directory_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    with held_by_another_process(out) as proc:
        before = tree_snapshot(out)
        with pytest.raises(OutputDirError, match=rf"output_dir={out} is in use by another command \(pid {proc.pid} on"):
            claim(out)
        assert tree_snapshot(out) == before  # the refused claim wrote nothing (not even the lock file)
        proc.kill()  # kill -9: the OS releases its lock
        proc.wait()
        owner = claim(out)
    assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    owner.release()


def test_undo_removes_only_what_this_process_created(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    owner = claim(mine)
    (mine / "config.yaml").write_text("new")
    (mine / "logs").mkdir()
    owner.undo()
    owner.release()
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    nested = tmp_path / "a" / "b" / "run"
    owner = claim(nested)
    (nested / "run.json").write_text("{}")
    owner.undo()
    owner.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # the parents it made went too


@pytest.mark.slow
def test_a_second_command_on_a_run_directory_in_use_is_refused_and_deletes_nothing(tmp_path):
    out = tmp_path / "run"
    with held_by_another_process(out) as proc:
        before = tree_snapshot(out)
        for extra in ([], ["resume=true"]):
            result = cli(tmp_path, f"output_dir={out}", "trainer.max_steps=1", *extra)
            assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
            assert f"is in use by another command (pid {proc.pid} on" in result.stderr
            assert tree_snapshot(out) == before  # the winner's directory, untouched


@pytest.mark.slow
def test_a_launched_ddp_worker_does_not_take_the_lock_its_parent_holds(tmp_path, monkeypatch):
    from helpers import compose_train

    from telechat_lab.training.process import OUTPUT_ENV
    from telechat_lab.training.run import prepare
    from telechat_lab.training.runlock import held

    out = tmp_path / "run"
    overrides = [*QUICK, f"data.cache_dir={tmp_path}/cache", f"output_dir={out}"]
    with held_by_another_process(out):  # as rank 0 holds it
        monkeypatch.setenv("LOCAL_RANK", "1")
        monkeypatch.setenv(OUTPUT_ENV, str(out))
        assert prepare(compose_train(overrides), overrides).output_dir == out
        assert held() == []


@pytest.mark.slow
def test_a_second_sweep_into_a_sweep_directory_in_use_is_refused(tmp_path):
    from omegaconf import OmegaConf

    from telechat_lab.training.sweep import SweepSummary

    sweep = tmp_path / "sweep"
    with held_by_another_process(sweep) as proc:
        result = cli(tmp_path, "-m", f"hydra.sweep.dir={sweep}", "trainer.max_steps=1", "seed=1,2")
        assert result.returncode == 2 and f"hydra.sweep.dir={sweep} is in use" in result.stderr, result.stderr
        assert f"pid {proc.pid}" in result.stderr
        with pytest.raises(SystemExit) as stopped:  # a sweep directory named by interpolations: when it starts
            SweepSummary().on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
        assert stopped.value.code == 2
        assert sorted(p.name for p in sweep.iterdir()) == [".lock", "weights.bin"]


# ------------------------------------------------------------------------ 3. overwrite=true, interrupted


def earlier_run(directory: Path) -> dict[str, bytes]:
    (directory / "checkpoints").mkdir(parents=True)
    (directory / "logs").mkdir()
    (directory / "checkpoint-2").mkdir()
    for name, text in {
        "config.yaml": "seed: 0\n",
        "run.json": '{"run_id": "old"}\n',
        "adapter_model.safetensors": "old weights",
        "checkpoints/step-0000002.ckpt": "old checkpoint",
        "logs/metrics.csv": "step,loss\n1,9\n",
        "checkpoint-2/config.yaml": "seed: 0\n",
    }.items():
        (directory / name).write_text(text)
    return snapshot(directory)


def new_run_starts(directory: Path) -> None:
    """What a killed overwrite=true run had written before its first checkpoint."""
    (directory / "logs").mkdir()
    for name in ("config.yaml", "run.json", "logs/metrics.csv"):
        (directory / name).write_text("the killed attempt's")


def snapshot(directory: Path) -> dict[str, bytes]:
    own = set(run_files(directory))
    return {k: v for k, v in tree_snapshot(directory).items() if k.split("/")[0] in own}


class Crash(BaseException):
    pass


@contextmanager
def crash_at_rename(monkeypatch, n: int):
    """Every rename in rundir succeeds until the n-th (0-based), which 'kills' the process."""
    calls, real = {"n": 0}, os.replace

    def replace(src, dst):
        if calls["n"] == n:
            raise Crash
        calls["n"] += 1
        real(src, dst)

    monkeypatch.setattr(rundir.os, "replace", replace)
    try:
        yield
    except Crash:
        pass
    finally:
        monkeypatch.setattr(rundir.os, "replace", real)


def test_an_overwrite_interrupted_at_any_rename_is_recovered_byte_for_byte(tmp_path, monkeypatch):
    earlier_run(tmp_path / "count")
    renames = len(run_files(tmp_path / "count")) + 1
    for n in range(renames + 1):  # killed while the earlier run is set aside (n == renames: not killed)
        out = tmp_path / f"aside-{n}"
        old = earlier_run(out)
        with crash_at_rename(monkeypatch, n):
            set_aside_run(out)
            new_run_starts(out)
        recover_interrupted_overwrite(out)
        assert snapshot(out) == old and not interrupted_overwrite(out), n
    for n in range(2 * renames + 2):  # killed while the new run (no checkpoint yet) is undone
        out = tmp_path / f"restore-{n}"
        old = earlier_run(out)
        set_aside_run(out)
        new_run_starts(out)
        with crash_at_rename(monkeypatch, n):
            restore_replaced_run(out)
        recover_interrupted_overwrite(out)
        assert snapshot(out) == old and not interrupted_overwrite(out), n
    out = tmp_path / "trained"  # killed after the new run's first checkpoint: the new run is kept, resumable
    earlier_run(out)
    set_aside_run(out)
    new_run_starts(out)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-0000001.ckpt").write_text("new checkpoint")
    new = snapshot(out)
    recover_interrupted_overwrite(out)
    assert snapshot(out) == new and not (out / REPLACED).exists()


@pytest.mark.slow
def test_after_an_interrupted_overwrite_both_overwrite_and_resume_work(tmp_path):
    """The issue's case: killed after the earlier run was set aside, having written its own config.yaml and logs."""
    first = tmp_path / "first"
    run_train(first, "trainer.max_steps=2")
    for mode in ("overwrite", "resume"):
        out = tmp_path / mode
        shutil.copytree(first, out)
        old = snapshot(out)
        set_aside_run(out)
        new_run_starts(out)
        if mode == "overwrite":
            metrics = run_train(out, "trainer.max_steps=1", "seed=3", "overwrite=true")
            assert metrics["steps"] == 1 and not interrupted_overwrite(out)
            assert "seed: 3" in (out / "config.yaml").read_text()
        else:  # the earlier run is back first (its config.yaml, not the killed attempt's), then continued
            assert run_train(out, "trainer.max_steps=3", "resume=true")["steps"] == 3
            assert (out / "run.json").read_bytes() == old["run.json"]  # not the killed attempt's
            assert (out / "checkpoints" / "step-0000003.ckpt").is_file() and not interrupted_overwrite(out)


# ------------------------------------------------------------------------ 9, printed commands, file modes


@pytest.mark.slow
def test_settings_from_the_environment_stay_unresolved_in_what_the_run_writes(tmp_path, monkeypatch, capsys):
    token = "s3cr3t-t0ken-4711"
    monkeypatch.setenv("MYTOKEN", token)
    out = tmp_path / "run's $HOME dir"
    secret = "logger.csv.name=${oc.env:MYTOKEN}"
    mask = os.umask(0o027)
    try:
        train_in(out, "trainer.max_steps=2", secret)
    finally:
        os.umask(mask)
    written = tree_snapshot(out)
    assert not [name for name, data in written.items() if token.encode() in data]
    for name in ("config.yaml", "checkpoint-2/config.yaml", f"{token}/hparams.yaml"):
        assert "${oc.env:MYTOKEN}" in (out / name).read_text(), name
    modes = {oct(p.stat().st_mode & 0o777) for p in [out, *out.rglob("*")] if p.is_dir()}
    assert modes == {"0o750"}
    assert {oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()} == {"0o640"}

    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("resume:"))
    command = shlex.split(line.split(":", 1)[1])  # as a shell reads the line pasted
    assert command[:2] == ["python", "train.py"] and command[3] == "resume=true"
    assert OverridesParser.create().parse_override(command[2]).value() == str(out)  # and Hydra the override
    assert train_in(out, "trainer.max_steps=3", "resume=true")["steps"] == 3  # resolved again
    assert not [name for name, data in tree_snapshot(out).items() if token.encode() in data]


# ------------------------------------------------------------------------ where the output directory cannot be


def test_an_output_dir_that_cannot_be_one_is_one_message_and_changes_nothing(tmp_path):
    from helpers import compose_train

    from telechat_lab.training.run import prepare

    taken = tmp_path / "taken"
    taken.write_text("a file")
    long = tmp_path / ("x" * 250)
    for where, message in ((taken, "is a file, not a directory"), (long, "the name is too long")):
        overrides = [*QUICK, f"data.cache_dir={tmp_path}/cache"]
        cfg = compose_train([*overrides, f"output_dir={where}"])
        with pytest.raises(OutputDirError, match=message):
            prepare(cfg, overrides)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and taken.read_text() == "a file"


def test_a_read_only_location_is_one_message_and_changes_nothing(tmp_path, monkeypatch):
    import errno

    def refused(self, *args, **kwargs):  # what a read-only parent gives (these tests may run as root)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(OutputDirError, match=r"output_dir=.*/a/run cannot be created \(Permission denied: .*/a\)"):
        claim(tmp_path / "a" / "run")
    monkeypatch.undo()
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(OutputDirError, match=rf"output_dir={tmp_path} is not writable"):
        claim(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ checked once, by one owner


@pytest.fixture
def counted(monkeypatch):
    """Calls of the output directory's rules, of validation (command-line check and run) and of Hydra's compose
    in the command-line check; the claims this process takes are let go after the test."""
    import hydra

    from telechat_lab.config import command_line
    from telechat_lab.training import run, run_dir_owner

    calls = {"rules": 0, "validate": 0, "compose": 0}

    def counting(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(rundir, "check_output_dir", counting("rules", rundir.check_output_dir))
    monkeypatch.setattr(run, "validate", counting("validate", run.validate))
    monkeypatch.setattr(command_line, "config_problems", counting("validate", command_line.config_problems))
    monkeypatch.setattr(hydra, "compose", counting("compose", hydra.compose))
    yield calls
    for owner in run_dir_owner.owned():
        owner.release()


def _command(argv: list[str]):
    """What `telechat-lab train ARGV` does before and inside Hydra: the config check and the claim (cli.run), then
    prepare() with the config Hydra composes (as cli.train passes it: validated)."""
    from helpers import CONF, compose_train

    from telechat_lab.config import check_command_line
    from telechat_lab.training.run import before_hydra, prepare

    cfg = check_command_line(argv, CONF, "train")
    before_hydra(cfg, argv)
    return prepare(compose_train(argv), argv, validated=cfg is not None)


def test_a_command_composes_validates_and_checks_the_directory_once(tmp_path, counted):
    out = tmp_path / "run"
    argv = [*QUICK, f"data.cache_dir={tmp_path}/cache", f"output_dir={out}", "trainer.max_steps=1"]
    run = _command(argv)
    assert run.output_dir == out and run.owner is not None and (out / "run.json").is_file()
    assert counted == {"rules": 1, "validate": 1, "compose": 1}


def test_the_python_api_path_checks_the_directory_in_prepare(tmp_path, counted):
    from helpers import compose_train

    from telechat_lab.training.run import prepare

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    argv = [*QUICK, f"data.cache_dir={tmp_path}/cache", f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(OutputDirError, match="already holds a run"):
        prepare(compose_train(argv), argv)
    assert counted["rules"] == 1 and counted["validate"] == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]  # not even a lock file


def test_a_resume_validates_the_runs_own_settings_once_and_builds_its_own_model(tmp_path, counted, capsys):
    from helpers import CONF

    from telechat_lab.config import check_command_line
    from telechat_lab.resolve import model_dir
    from telechat_lab.training.run import before_hydra

    base, out = tmp_path / "base", tmp_path / "run"
    shutil.copytree(model_dir(None), base)
    run_train(out, f"model.path={base}", "trainer.max_steps=1")
    before = tree_snapshot(out)
    resume = [*QUICK, f"data.cache_dir={out}/cache", f"output_dir={out}", "resume=true", "trainer.max_steps=2"]

    bad = [*resume, "optim.lr=-1", "save_steps=0"]  # a value out of range, and a change that makes another run
    with pytest.raises(SystemExit) as exit_:
        before_hydra(check_command_line(bad, CONF, "train"), bad)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "optim.lr=-1: must be" in error and "save_steps=0: must be" in error, error
    assert tree_snapshot(out) == before  # refused before Hydra: the directory as it was, the lock's record too

    counted.update(rules=0, validate=0)
    run = _command(resume)
    assert counted["rules"] == 1 and counted["validate"] == 1  # the run's own settings with the changes, once
    assert run.model_dir == base  # the run's own model, not the command's default (the tiny one)
    assert run.values["trainer"]["max_steps"] == 2 and run.checkpoint is not None

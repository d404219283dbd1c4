"""What the user sees around a run: the install prints no warning block, a sweep prints the dataset table once and
where its plot is, a signal's message is printed once, and a finished run resumed says so and does nothing."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import warnings

import lightning as L
import pytest
from helpers import REPO, run_train, tree_snapshot

from telechat_lab.errors import Interrupted


def test_an_editable_install_raises_no_build_backend_warning(tmp_path, monkeypatch):
    """pip shows every UserWarning of the build backend's hooks as a BuildBackendWarning block: building the
    editable wheel of a copy of the project emits none (setuptools' meta-path-finder layout emits one)."""
    from setuptools import build_meta

    project = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("telechat_lab", "hydra_plugins"):
        shutil.copytree(REPO / name, project / name, ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    monkeypatch.chdir(project)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wheel = build_meta.build_editable(str(tmp_path / "dist"))
    assert wheel.endswith(".whl")
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []


class SignalAt(L.Callback):
    """Sends this process `signum` after optimizer step `step`, as Ctrl+C would."""

    def __init__(self, step: int, signum: int = signal.SIGINT):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_a_signal_prints_its_stop_message_and_resume_hint_once(tmp_path, capsys):
    with pytest.raises(Interrupted) as stopped:
        run_train(
            tmp_path, "trainer.max_steps=6", "+callbacks.sig._target_=test_console.SignalAt", "+callbacks.sig.step=2"
        )
    shown = capsys.readouterr().out + str(stopped.value)  # the message is what the command prints on stderr
    assert "stopped by SIGINT after step 2" in shown
    assert shown.count("resume=true") == 1 and shown.count(str(tmp_path / "checkpoints")) == 1, shown
    assert "loss plot:" in shown  # the rest of the report stays


def test_resuming_a_completed_run_says_so_and_changes_nothing(tmp_path, capsys):
    first = run_train(tmp_path, "trainer.max_steps=2")
    before = tree_snapshot(tmp_path)
    capsys.readouterr()
    again = run_train(tmp_path, "trainer.max_steps=2", "resume=true")
    out = capsys.readouterr().out
    assert f"{tmp_path} is a completed run (2 steps): nothing to resume" in out
    assert "dataset" not in out and "Epoch" not in out  # nothing loaded, nothing trained
    assert again == first and tree_snapshot(tmp_path) == before
    # with a higher limit it trains on
    assert run_train(tmp_path, "trainer.max_steps=3", "resume=true")["steps"] == 3


def test_in_a_sweep_a_report_is_printed_once_unless_it_differs(tmp_path, monkeypatch, capsys):
    from telechat_lab import console, hydra_runtime

    console.print_once_per_sweep("table A")
    console.print_once_per_sweep("table A")  # not in a sweep: every run prints its own
    monkeypatch.setattr(hydra_runtime, "sweep_dir", lambda: tmp_path / "sweep")
    for table in ("table A", "table A", "table B", "table B", "table A"):  # the jobs of one sweep
        console.print_once_per_sweep(table)
    monkeypatch.setattr(hydra_runtime, "sweep_dir", lambda: tmp_path / "another")
    console.print_once_per_sweep("table A")
    assert capsys.readouterr().out.split("\n") == ["table A"] * 3 + ["table B", "table A", "table A", ""]


def test_the_tests_filter_the_warnings_the_commands_filter(tmp_path):
    """A test that meets one of the libraries' warnings the commands filter (console.NOT_OURS) reports no warning;
    any other warning is still reported."""
    from telechat_lab.console import NOT_OURS

    test = tmp_path / "test_warns.py"
    lines = ["import warnings", "", "", "def test_warns():"]
    for pattern, category, _why in NOT_OURS:  # each pattern's own text, as the library writes it
        text = re.sub(r"\\(.)", r"\1", pattern) + " ..."
        lines.append(f"    warnings.warn({text!r}, {category.__name__})")
    lines += ["    warnings.warn('a warning of ours', UserWarning)"]
    test.write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-c", str(REPO / "setup.cfg"), str(test)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert "1 passed, 1 warning" in proc.stdout and "a warning of ours" in proc.stdout, proc.stdout + proc.stderr


def test_the_demo_is_two_epochs_and_the_long_demo_the_same_for_ten():
    from helpers import compose_train

    demo, long = compose_train([]), compose_train(["experiment=tiny_long"])
    assert demo.trainer.max_epochs == 2 and long.trainer.max_epochs == 10
    same = lambda cfg: (cfg.optim.lr, cfg.adapter.rank, cfg.adapter.alpha, cfg.data)  # noqa: E731
    assert same(long) == same(demo)
    assert "make demo ARGS=experiment=tiny_long" in (REPO / "Makefile").read_text()


def test_a_run_stopped_early_by_a_callback_is_not_complete_and_resumes(tmp_path, capsys):
    stop = ["+callbacks.stop._target_=helpers.StopAfter", "+callbacks.stop.step=2"]
    run_train(tmp_path, "trainer.max_steps=4", "save_steps=1", *stop)
    metrics = run_train(tmp_path, "trainer.max_steps=4", "save_steps=1", "resume=true", "+callbacks.stop=null")
    assert metrics["steps"] == 4 and "nothing to resume" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_sweep_prints_the_dataset_table_once_and_where_its_plot_is(tmp_path):
    from helpers import QUICK, train_cli

    sweep = tmp_path / "sweep"
    args = ["-m", *QUICK, "adapter=lora,dora", "trainer.max_steps=1", f"hydra.sweep.dir={sweep}"]
    out = train_cli([*args, f"data.cache_dir={tmp_path}/cache"], tmp_path).stdout
    assert out.count("trained tokens") == 1 and "(lora rank 16" in out and "(dora rank 16" in out, out
    assert f"loss plot: {sweep / 'sweep_loss.png'}" in out and (sweep / "sweep_loss.png").is_file()


def test_a_non_finite_loss_is_reported_without_an_autograd_warning():
    from types import SimpleNamespace

    import torch

    from telechat_lab.errors import NonFiniteLoss
    from telechat_lab.training.module import TelechatLitModule

    trainer = SimpleNamespace(global_step=4)
    module = SimpleNamespace(trainer=trainer, nan_policy="stop", skipped_steps=0, nan_max_skips=1)
    loss = torch.tensor(float("nan"), requires_grad=True) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NonFiniteLoss, match="the loss is nan at step 5"):
            TelechatLitModule._non_finite(module, "loss", loss)

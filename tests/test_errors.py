"""How a command reports what a user can cause or meet: one message naming the path and what to do, an exit code,
no traceback (telechat_lab.errors.reported)."""

from __future__ import annotations

import errno
import os

import lightning as L
import pytest

from telechat_lab.errors import reported


def _exit_of(action, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stopped:
        with reported():
            action()
    return stopped.value.code, capsys.readouterr().err


def test_a_file_where_a_directory_should_be_is_named(tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory")
    code, err = _exit_of(lambda: (blocker / "x.txt").write_text("y"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {blocker / 'x.txt'}: Not a directory") and "move it or choose another" in err


@pytest.mark.parametrize(
    "number, advice",
    [(errno.ENOSPC, "free space on that disk"), (errno.EROFS, "read-only"), (errno.ENAMETOOLONG, "shorter name")],
)
def test_system_errors_name_the_path_and_what_to_do(tmp_path, capsys, number, advice):
    def fail():
        raise OSError(number, os.strerror(number), str(tmp_path / "out" / "model.safetensors"))

    code, err = _exit_of(fail, capsys)
    assert code == 2 and str(tmp_path / "out" / "model.safetensors") in err and advice in err


def test_a_rename_names_both_paths(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "kept").write_text("x")
    code, err = _exit_of(lambda: os.rename(tmp_path / "a", tmp_path / "b"), capsys)
    assert code == 2 and f"{tmp_path / 'a'} -> {tmp_path / 'b'}" in err
    assert (tmp_path / "b" / "kept").read_text() == "x"


def test_an_os_error_without_a_path_is_not_hidden():
    """An error that names no file is not the user's to fix: it stays an exception (a bug report's traceback)."""
    with pytest.raises(OSError):
        with reported():
            raise OSError("something inside a library")


@pytest.mark.parametrize("seed, message", [(-5, "seed=-5: must be at least 0"), (2**32, "seed=4294967296")])
def test_a_seed_out_of_numpys_range_is_a_config_error(seed, message):
    from helpers import compose_train

    from telechat_lab.config import validate
    from telechat_lab.errors import ConfigError

    for key in ("seed", "data.seed"):
        with pytest.raises(ConfigError, match=message.replace("seed", key, 1).replace(".", r"\.")):
            validate(compose_train([f"{key}={seed}"]))


# ------------------------------------------------------------------------ settings that train nothing


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.max_epochs=0", "trainer.max_steps=-1"], r"trainer\.max_epochs=0: trains nothing"),
        (["+trainer.limit_train_batches=0"], r"trainer\.limit_train_batches=0: trains nothing"),
    ],
)
def test_settings_that_train_nothing_are_config_errors(overrides, message):
    from helpers import compose_train

    from telechat_lab.config import validate
    from telechat_lab.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        validate(compose_train(overrides))


class StopAtStart(L.Callback):
    """Ends training before its first step (what settings that give no batch amount to)."""

    def on_train_start(self, trainer, pl_module):
        trainer.should_stop = True


def test_a_run_that_trains_no_step_is_an_error_and_keeps_nothing(tmp_path):
    from helpers import run_train

    from telechat_lab.errors import ConfigError

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="no training step ran"):
        run_train(out, "+callbacks.stop._target_=test_errors.StopAtStart")
    assert not out.exists()  # not an untrained adapter that reads as a result


def test_lightnings_word_on_the_trainer_settings_is_one_message(tmp_path):
    from helpers import QUICK, train_cli

    out = tmp_path / "run"
    proc = train_cli(
        [*QUICK, f"data.cache_dir={tmp_path}/cache", f"output_dir={out}", "+trainer.limit_train_batches=0.01"],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "trainer: You requested to check 0.01 of the `train_dataloader`" in proc.stderr
    assert not out.exists()


def test_a_config_error_carries_its_problems_as_a_list():
    """Callers pass lists and read `problems`; the header and one line per problem are written in one place."""
    from telechat_lab.errors import ConfigError

    err = ConfigError(["data.batch_size=0: must be at least 1", "optim.lr=-1: must be greater than 0"])
    assert err.problems == ["data.batch_size=0: must be at least 1", "optim.lr=-1: must be greater than 0"]
    assert str(err) == (
        "invalid configuration:\n  - data.batch_size=0: must be at least 1\n  - optim.lr=-1: must be greater than 0"
    )
    single = ConfigError("output=x exists: add overwrite=true to replace it")
    assert str(single) == "output=x exists: add overwrite=true to replace it" and single.problems == [str(single)]


def test_a_resumes_csv_logs_never_go_into_a_folder_that_exists(tmp_path):
    """Two resumes within one second got the same logs/resumed-<time>, and Lightning's CSVLogger deletes the
    files it finds in its folder: the earlier resume's metrics were lost."""
    from datetime import datetime, timedelta

    from telechat_lab.training.loggers import _resumed_version

    logs = tmp_path / "logs"
    now = datetime.now()
    for seconds in range(3):  # whatever second the call falls in
        folder = logs / (now + timedelta(seconds=seconds)).strftime("resumed-%Y%m%d-%H%M%S")
        folder.mkdir(parents=True)
        (folder / "metrics.csv").write_text("kept\n")
    version = _resumed_version({"save_dir": str(tmp_path), "name": "logs"})
    assert version.startswith("resumed-") and not (logs / version).exists()


def test_every_error_crosses_a_process_boundary_as_itself():
    """An encoding worker's error is pickled back to the main process: each kind keeps its class, message and
    fields (a kind rebuilt from its message alone broke the pool, and read as a worker that died)."""
    import pickle

    from telechat_lab import errors

    made = [
        errors.BadRecord("dataset 'd': d.jsonl line 3", "empty reply", " (nothing would be trained)"),
        errors.ConfigError(["data.cutoff_len: must be positive", "seed: too large"]),
        errors.ConfigError("one message"),
        errors.Interrupted("stopped by SIGTERM", 15),
        errors.DataError("dataset 'd': no file"),
        errors.CheckpointError("x: missing"),
        errors.FileSystemError("y: no permission"),
    ]
    for error in made:
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)
        assert {k: v for k, v in vars(again).items()} == vars(error)


def test_ctrl_c_before_a_commands_own_handling_is_one_line(monkeypatch, capsys):
    """A Ctrl+C while the command line is checked (before the command's own handling starts) ends the command as
    one inside it does: one line and exit code 130, not a traceback."""
    from telechat_lab import cli, config

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(config, "check_command_line", interrupted)
    with pytest.raises(SystemExit) as ended:
        cli.run("inspect", ["data.datasets=[identity]"])
    assert ended.value.code == 130
    assert capsys.readouterr().err == "stopped by Ctrl+C (SIGINT)\n"

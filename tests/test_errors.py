"""How a command reports what a user can cause or meet: one message naming the path and what to do, an exit code,
no traceback (telechat_lab.errors.reported)."""

from __future__ import annotations

import errno
import os

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

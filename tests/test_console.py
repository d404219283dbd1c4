"""What the user sees around a run: the install prints no warning block, a sweep prints the dataset table once and
where its plot is, a signal's message is printed once, and a finished run resumed says so and does nothing."""

from __future__ import annotations

import shutil
import warnings

from helpers import REPO


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

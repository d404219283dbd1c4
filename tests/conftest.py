"""Shared fixtures. `../shared` (reference material beside the checkout) is optional: tests that
need it skip with a reason where it is absent. TELECHAT_SHARED overrides its location.

The tests never touch the user's cache: TELECHAT_LAB_CACHE (the tiny model, encoded datasets) points at a
directory of this test session, inherited by the processes the tests start."""

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TELECHAT_SHARED", REPO.parent / "shared"))
os.environ["TELECHAT_LAB_CACHE"] = tempfile.mkdtemp(prefix="telechat-lab-test-cache-")


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the calling test with the reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference material {path} is absent (../shared beside the checkout)")
    return path


@pytest.fixture(autouse=True)
def _quiet_hf(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    # how the command was started: telechat_lab.cli records it for the process (and its DDP ranks); a test that
    # runs the command line in pytest's own process must not leave "python __main__.py" to the tests after it
    # and Lightning's seed_everything leaves PL_GLOBAL_SEED in the process's environment: a later test's DDP
    # subprocess (ddp_spawn) would re-seed its ranks from it and initialise adapters unlike its one-process twin
    for name in ("TELECHAT_LAB_COMMAND", "PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny TeleChat2 checkpoint with the project's own tiny tokenizer."""
    from telechat_lab.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), hidden_size=64, training_seqlen=256)


@pytest.fixture(scope="session")
def tiny_real_vocab_dir(tmp_path_factory):
    """A tiny TeleChat2 checkpoint with the real 131072-piece tokenizer (skips without ../shared)."""
    from telechat_lab.tiny import write_tiny_checkpoint

    tokenizer = shared_path("telechat2", "tokenizer.model")
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_real"), tokenizer=tokenizer, hidden_size=64)


def pytest_configure(config):
    """The libraries' warnings that the commands filter (telechat_lab/console.py NOT_OURS, each with the reason it
    is not shown) are filtered in the tests too, which call the training code without a command around it."""
    from telechat_lab.console import NOT_OURS

    for pattern, category, _why in NOT_OURS:
        config.addinivalue_line("filterwarnings", f"ignore:{pattern}:{category.__module__}.{category.__qualname__}")

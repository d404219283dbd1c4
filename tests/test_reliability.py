"""Nothing a user has is destroyed or silently wrong (issue 9), one test per case: exports and runs that would
overwrite what they come from, resume semantics, checkpoint choice, faults (NaN, signals, kills and corrupt
files) and strict inputs (config values, chat input)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    QUICK,
    REPO,
    adapter_weights,
    losses,
    run_script,
    run_train,
    train_cli,
    tree_snapshot,
)

from telechat_lab.errors import CheckpointError, ConfigError, DataError, NonFiniteLoss, OutputDirError

CACHE = "data.cache_dir={}/cache"


def cli(tmp_path, *args, check=False, env=None):
    return train_cli([*QUICK, CACHE.format(tmp_path), *args], tmp_path, check=check, env=env)


# ------------------------------------------------------------------------ 1. merge never writes over its inputs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short LoRA run: its base (a copy of the tiny model) and its adapter directory."""
    import shutil

    from telechat_lab.resolve import model_dir

    work = tmp_path_factory.mktemp("trained")
    base = work / "base"
    shutil.copytree(model_dir(None), base)
    run_train(work / "run", f"model.path={base}", "trainer.max_steps=2")
    return {"base": base, "adapter": work / "run", "work": work}


@pytest.mark.parametrize("where", ["base", "inside_base", "adapter", "contains_adapter"])
def test_merge_refuses_an_export_dir_over_its_inputs(trained, where):
    base, adapter = trained["base"], trained["adapter"]
    export_dir = {"base": base, "inside_base": base / "merged", "adapter": adapter, "contains_adapter": adapter.parent}[
        where
    ]
    before = {d: tree_snapshot(d) for d in (base, adapter)}
    proc = run_script("merge.py", [f"adapter_path={adapter}", f"export_dir={export_dir}"], trained["work"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "choose another export_dir; nothing was written" in proc.stderr
    assert {d: tree_snapshot(d) for d in (base, adapter)} == before


def test_export_refuses_a_non_empty_dir_that_is_not_an_export(trained, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = run_script("merge.py", [f"adapter_path={trained['adapter']}", f"export_dir={tmp_path}"], tmp_path)
    assert proc.returncode == 2 and "is not empty and holds no earlier export" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------ 2. a used output_dir


@pytest.mark.slow
def test_second_run_into_a_used_output_dir_is_refused_and_overwrite_clears_it(tmp_path):
    out = tmp_path / "run"
    cli(tmp_path, f"output_dir={out}", "trainer.max_steps=2", check=True)
    before = tree_snapshot(out)
    proc = cli(tmp_path, f"output_dir={out}", "trainer.max_steps=3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"output_dir={out} already holds a run" in proc.stderr
    assert "resume=true" in proc.stderr and "overwrite=true" in proc.stderr
    assert tree_snapshot(out) == before  # not even Hydra's .hydra/ was rewritten
    cli(tmp_path, f"output_dir={out}", "trainer.max_steps=3", "overwrite=true", check=True)
    assert json.loads((out / "final_metrics.json").read_text())["steps"] == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-0000003.ckpt",
        "step-0000003.json",
    ]  # nothing left


def test_overwrite_refuses_a_directory_telechat_lab_did_not_write(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    proc = cli(tmp_path, f"output_dir={tmp_path}", "overwrite=true", "trainer.max_steps=1")
    assert proc.returncode == 2 and "was not written by telechat-lab" in proc.stderr
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_output_dir_may_not_hold_the_model_or_the_data(trained, tmp_path):
    import shutil

    with pytest.raises(OutputDirError, match="lies inside model.path"):
        run_train(trained["base"] / "run", f"model.path={trained['base']}", "trainer.max_steps=1")
    assert not (trained["base"] / "run").exists()
    shutil.copytree(REPO / "telechat_lab" / "demo_data", tmp_path / "work" / "data")
    with pytest.raises(OutputDirError, match="contains data.dataset_dir"):
        run_train(tmp_path / "work", f"data.dataset_dir={tmp_path / 'work' / 'data'}", "trainer.max_steps=1")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["data"]


# ------------------------------------------------------------------------ 3. resume continues the run as it was


def test_resume_takes_the_runs_own_settings(tmp_path):
    out = tmp_path / "run"
    run_train(out, "adapter=dora", "optim.lr=1e-4", "trainer.max_steps=2")
    saved = (out / "config.yaml").read_text()
    # the printed resume line, with nothing but the output dir (and a longer run)
    run_train(out, "resume=true", "trainer.max_steps=3")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["adapter"]["type"] == "dora" and config["optim"]["lr"] == 1e-4
    assert config["trainer"]["max_steps"] == 3 and saved != (out / "config.yaml").read_text()
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    assert json.loads((out / "final_metrics.json").read_text())["steps"] == 3


def test_resume_refuses_settings_that_would_change_the_run(tmp_path):
    out = tmp_path / "run"
    run_train(out, "trainer.max_steps=2")
    before = tree_snapshot(out)
    with pytest.raises(ConfigError) as err:
        run_train(out, "resume=true", "optim.lr=1e-4", "adapter=dora", "trainer.max_steps=1")
    message = str(err.value)
    for change in (
        "optim.lr: 0.005 -> 0.0001",
        "adapter.type: lora -> dora",
        "adapter.use_dora: False -> True",
        "trainer.max_steps: 2 -> 1 (may only grow when resuming)",
    ):
        assert change in message, message
    assert tree_snapshot(out) == before


def test_extending_max_steps_continues_mid_epoch_like_the_longer_run(tmp_path):
    """A run that stopped at max_steps=3 (mid-epoch: 4 batches an epoch), resumed with max_steps=7, trains on
    the same batches as a 7-step run (the constant schedule makes the whole curve comparable)."""
    run_train(tmp_path / "long", "trainer.max_steps=7", "optim.scheduler=constant")
    run_train(tmp_path / "short", "trainer.max_steps=3", "optim.scheduler=constant")
    run_train(tmp_path / "short", "resume=true", "trainer.max_steps=7")
    assert losses(tmp_path / "short") == pytest.approx(losses(tmp_path / "long"), abs=1e-6)


def _logged_lr(out_dir) -> dict[int, float]:
    rows = {}
    for path in sorted(Path(out_dir, "logs").rglob("metrics.csv")):
        with open(path) as f:
            rows.update({int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(f) if r["train/lr"]})
    return rows


def test_an_extended_run_trains_its_first_new_step_at_the_longer_schedules_rate(tmp_path):
    """A cosine run stopped at max_steps=3 ends at lr 0; extended to 6, its step 4 runs at the 6-step schedule's
    rate (the restored optimizer held the old schedule's 0: the step would not have trained). Its loss history
    keeps the validation run at the end of the first part."""
    run_train(tmp_path / "long", "trainer.max_steps=6", "data.val_size=4")
    run_train(tmp_path / "short", "trainer.max_steps=3", "data.val_size=4")
    run_train(tmp_path / "short", "resume=true", "trainer.max_steps=6", "data.val_size=4")
    # the validation at the end of the 3-step run is kept in the history, beside the one at step 6
    assert len(losses(tmp_path / "short", "val")) == 2
    short, long = _logged_lr(tmp_path / "short"), _logged_lr(tmp_path / "long")
    assert short[3] < long[3] and short[4] > 0
    assert [short[s] for s in (4, 5, 6)] == pytest.approx([long[s] for s in (4, 5, 6)], rel=1e-6)


# ------------------------------------------------------------------------ 4. the newest checkpoint by its step


def test_resume_picks_the_newest_checkpoint_by_its_step(tmp_path):
    import shutil

    from telechat_lab.training.checkpoints import newest_checkpoint
    from telechat_lab.training.rundir import read_run_record

    out = tmp_path / "run"
    run_train(out, "trainer.max_steps=5", "save_steps=1", "save_total_limit=null")
    ckpts = out / "checkpoints"
    run_id = read_run_record(out)["run_id"]
    # a legacy name sorting after the newest one, holding an older step: the step decides, not the name
    shutil.copy(ckpts / "step-0000002.ckpt", ckpts / "zzz-last.ckpt")
    assert newest_checkpoint(ckpts, run_id) == ckpts / "step-0000005.ckpt"
    moved = tmp_path / "moved"
    shutil.move(out, moved)  # a run directory moved elsewhere resumes from its own newest checkpoint
    run_train(moved, "resume=true", "trainer.max_steps=6")
    assert json.loads((moved / "final_metrics.json").read_text())["steps"] == 6
    assert len(losses(moved)) == 6


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    import shutil

    from telechat_lab.training.checkpoints import newest_checkpoint

    run_train(tmp_path / "a", "trainer.max_steps=2")
    run_train(tmp_path / "b", "trainer.max_steps=2", "optim.lr=1e-3")
    shutil.copy(
        tmp_path / "a" / "checkpoints" / "step-0000002.ckpt", tmp_path / "b" / "checkpoints" / "step-0000009.ckpt"
    )
    with pytest.raises(CheckpointError, match="belongs to another run"):
        run_train(tmp_path / "b", "resume=true", "trainer.max_steps=3")
    with pytest.raises(CheckpointError):
        newest_checkpoint(tmp_path / "b" / "checkpoints", "someone-else")


# ------------------------------------------------------------------------ 5 and 13. chat input


@pytest.fixture(scope="module")
def tiny_session(tiny_dir):
    from telechat_lab.chat.session import ChatSession

    class Echo:
        max_length = 256

        def __init__(self):
            self.prompts = []

        def stream(self, prompt_ids, generation):
            self.prompts.append(list(prompt_ids))
            yield "ok"

    return ChatSession(Echo(), tiny_dir, generation={"max_new_tokens": 16})


BAD_PROMPTS = {
    "malformed": ('{"prompt": "a"}\n{oops\n', "line 2: malformed JSON"),
    "messages_a_string": ('{"messages": "hello"}\n', "line 1: 'messages' must be a non-empty list"),
    "prompt_null": ('{"prompt": null}\n', "line 1: prompt must be a string, got null"),
    "message_without_content": ('{"messages": [{"role": "user"}]}\n', "line 1: messages[0] must be an object with"),
    "user_user_assistant": (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
        '{"role": "assistant", "content": "c"}]}\n',
        "line 1: messages[1]: expected the assistant's reply here",
    ),
    "not_utf8": (b'{"prompt": "ok"}\n\xff\xfe broken\n', "line 2: not UTF-8 text (byte 0xff at position 0)"),
    "empty": ("\n\n", "holds no prompt"),
}


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_batch_input_is_checked_first_and_the_output_kept(tiny_session, tmp_path, case):
    from telechat_lab.chat.batch import batch

    text, expected = BAD_PROMPTS[case]
    source, output = tmp_path / "in.jsonl", tmp_path / "answers.jsonl"
    (source.write_bytes if isinstance(text, bytes) else source.write_text)(text)
    output.write_text("yesterday's answers\n")
    before = len(tiny_session.engine.prompts)
    with pytest.raises(DataError, match=re.escape(expected)):
        batch(tiny_session, str(source), str(output))
    assert output.read_text() == "yesterday's answers\n" and len(tiny_session.engine.prompts) == before


def test_batch_output_keeps_the_answers_before_a_failure_and_the_rerun_continues(tiny_session, tmp_path):
    from telechat_lab.chat.batch import batch

    source, output = tmp_path / "in.txt", tmp_path / "answers.jsonl"
    source.write_text("one\ntwo\nthree\n")
    output.write_text("old\n")
    with pytest.raises(ConfigError, match="exists: add overwrite=true"):  # not chat's answers: never replaced
        batch(tiny_session, str(source), str(output))
    assert output.read_text() == "old\n"
    engine = tiny_session.engine
    calls = []

    def failing(ids, generation):
        calls.append(ids)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        yield "fine"

    tiny_session.engine = type("Failing", (), {"stream": staticmethod(failing), "max_length": 256})()
    try:
        with pytest.raises(RuntimeError):
            batch(tiny_session, str(source), str(output), overwrite=True)
        assert [json.loads(line)["prompt"] for line in output.read_text().splitlines()] == ["one"]
        assert batch(tiny_session, str(source), str(output)) == 3  # continues after "one"
    finally:
        tiny_session.engine = engine
    assert len(calls) == 4 and calls[2] == calls[1]  # "two" asked again, "one" not
    assert [json.loads(line)["prompt"] for line in output.read_text().splitlines()] == ["one", "two", "three"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_interactive_chat_survives_bytes_that_are_not_utf8(tiny_session):
    from telechat_lab.chat.session import interactive

    class Stdin(io.StringIO):
        buffer = io.BytesIO(b"\xff\xfebad\nhello\nexit\n")

    out = io.StringIO()
    interactive(tiny_session, Stdin(), out)
    text = out.getvalue()
    assert "not UTF-8 text (byte 0xff at position 0); please type it again" in text
    assert "Assistant: ok" in text  # the next line was answered: the session went on
    tiny_session.clear()


def test_long_prompts_lose_their_first_turns_or_are_refused(tiny_session, capsys):
    from telechat_lab.chat.session import PromptTooLong

    budget = tiny_session.max_input_tokens
    assert budget == 256 - 16  # the model's length minus max_new_tokens
    turns = [(f"question {i} " + "word " * 20, f"answer {i} " + "word " * 20) for i in range(6)]
    ids, dropped = tiny_session.prompt_ids("last question", turns)
    assert len(ids) <= budget and 0 < dropped < len(turns)
    kept = tiny_session.encoder.prompt_ids(
        __import__("telechat_lab.data.formats", fromlist=["Conversation"]).Conversation(
            system=None, turns=[*turns[dropped:], ("last question", None)]
        )
    )
    assert ids == kept  # the earliest whole turns went, nothing else
    with pytest.raises(PromptTooLong, match="more than the 240 the model takes"):
        tiny_session.prompt_ids("word " * 400, [])


# ------------------------------------------------------------------------ 6. NaN and infinite losses


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="is nan at step 5") as err:
        run_train(
            out,
            "trainer.max_steps=8",
            "save_steps=2",
            "+callbacks.poison._target_=helpers.PoisonLoss",
            "+callbacks.poison.steps=[5]",
        )
    assert "nothing of this step was saved" in str(err.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        f"step-000000{n}.{e}" for n in (2, 4) for e in ("ckpt", "json")
    ]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "final_metrics.json").exists()
    weights = adapter_weights(out / "checkpoint-4")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nan_weights_are_never_checkpointed(tmp_path):
    out = tmp_path / "run"
    # the weights turn NaN at the end of step 4, just before its checkpoint (the loss has not seen them yet)
    with pytest.raises(NonFiniteLoss, match="a trained parameter is NaN or infinite at step 4"):
        run_train(
            out,
            "trainer.max_steps=8",
            "save_steps=2",
            "+callbacks.poison._target_=helpers.PoisonWeights",
            "+callbacks.poison.step=4",
        )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002.ckpt", "step-0000002.json"]
    assert not (out / "checkpoint-4").exists()


def test_nan_policy_skip_skips_the_step_and_counts_it(tmp_path):
    metrics = run_train(
        tmp_path / "skip",
        "trainer.max_steps=6",
        "nan_policy=skip",
        "+callbacks.poison._target_=helpers.PoisonLoss",
        "+callbacks.poison.steps=[3]",
    )
    assert metrics["skipped_steps"] == 1 and metrics["status"] == "completed"
    assert all(torch.isfinite(w).all() for w in adapter_weights(tmp_path / "skip").values())
    with pytest.raises(NonFiniteLoss, match="2 steps were skipped already"):
        run_train(
            tmp_path / "limit",
            "trainer.max_steps=6",
            "nan_policy=skip",
            "nan_max_skips=2",
            "+callbacks.poison._target_=helpers.PoisonLoss",
            "+callbacks.poison.steps=[1,2,3,4]",
        )


def test_nan_exits_non_zero_from_the_command_line(tmp_path):
    proc = cli(
        tmp_path,
        f"output_dir={tmp_path / 'run'}",
        "trainer.max_steps=4",
        "+callbacks.poison._target_=helpers.PoisonLoss",
        "+callbacks.poison.steps=[2]",
    )
    assert proc.returncode == 3 and "the loss is nan at step 2" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------ 7. signals


def _run_until_step(tmp_path, out, step: int, *args, env=None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).parent), **(env or {})}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "train.py"),
            *QUICK,
            CACHE.format(tmp_path),
            f"output_dir={out}",
            "trainer.max_steps=20",
            "save_steps=1000",
            "+callbacks.beat._target_=helpers.Heartbeat",
            *args,
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )
    deadline = time.time() + 240
    for line in proc.stdout:
        if line.strip() == f"step {step}" or time.time() > deadline:
            break
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_exits_non_zero(tmp_path, signum, code):
    out = tmp_path / "run"
    proc = _run_until_step(tmp_path, out, 3)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == code, stderr[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in stderr and "resume=true" in stderr
    steps = sorted(int(p.name[5:12]) for p in (out / "checkpoints").glob("step-*.ckpt"))
    assert len(steps) == 1 and 3 <= steps[0] < 20
    assert not (out / "adapter_model.safetensors").exists()  # the run is not finished: no final adapter
    # resuming it ends where an uninterrupted run ends, with the same adapter
    cli(tmp_path, f"output_dir={out}", "resume=true", "+callbacks.beat=null", check=True)
    cli(tmp_path, f"output_dir={tmp_path / 'straight'}", "trainer.max_steps=20", "save_steps=1000", check=True)
    assert losses(out) == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)
    straight = adapter_weights(tmp_path / "straight")
    assert all(torch.equal(w, straight[k]) for k, w in adapter_weights(out).items())


@pytest.mark.slow
def test_sigusr1_under_slurm_requeues_and_the_requeued_job_resumes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    out = tmp_path / "run"
    proc = _run_until_step(tmp_path, out, 2, "trainer.max_steps=6", env=env)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGUSR1, stderr[-3000:]
    assert log.read_text().split() == ["requeue", "4242"]
    # SLURM starts the same command again, with SLURM_RESTART_COUNT set: it resumes by itself
    again = cli(
        tmp_path,
        f"output_dir={out}",
        "trainer.max_steps=6",
        "save_steps=1000",
        "+callbacks.beat._target_=helpers.Heartbeat",
        "+callbacks.beat.delay=0",
        env={**env, "SLURM_RESTART_COUNT": "1"},
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        "resuming the run" in again.stdout + again.stderr
        and json.loads((out / "final_metrics.json").read_text())["steps"] == 6
    )


# ------------------------------------------------------------------------ 8 and 9. kills during writes, corrupt files


def test_an_interrupted_checkpoint_write_leaves_the_previous_ones_intact(tmp_path, monkeypatch):
    from telechat_lab.training.checkpoints import RunCheckpoints

    calls = []
    real = RunCheckpoints.save_pretrained

    def crash_on_second(self, pl_module, directory, state=None):
        calls.append(directory)
        real(self, pl_module, directory, state)
        if len(calls) == 2:
            (directory / "adapter_config.json").write_text("")  # half written when the process dies
            raise RuntimeError("the process died here")

    monkeypatch.setattr(RunCheckpoints, "save_pretrained", crash_on_second)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the process died here"):
        run_train(out, "trainer.max_steps=4", "save_steps=1")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # no half checkpoint-2/
    assert not list(out.glob(".tmp-*")) and json.loads((out / "checkpoint-1" / "adapter_config.json").read_text())


def test_a_run_killed_after_its_last_checkpoint_finishes_on_resume(tmp_path):
    """Killed after the last step's checkpoint, before the adapter and final metrics were written: resuming
    trains nothing more, and writes them (found by scripts/fault_injection.py)."""
    run_train(tmp_path / "straight", "trainer.max_steps=3")
    out = tmp_path / "run"
    run_train(out, "trainer.max_steps=3")
    for name in ("adapter_model.safetensors", "adapter_config.json", "final_metrics.json"):
        (out / name).unlink()
    metrics = run_train(out, "resume=true")
    assert metrics["steps"] == 3 and json.loads((out / "final_metrics.json").read_text())["steps"] == 3
    straight = adapter_weights(tmp_path / "straight")
    assert all(torch.equal(w, straight[k]) for k, w in adapter_weights(out).items())


def test_loaders_name_an_incomplete_adapter(trained, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained["adapter"] / "checkpoint-2", broken)
    (broken / "adapter_config.json").write_text("")
    proc = run_script("merge.py", [f"adapter_path={broken}", f"export_dir={tmp_path / 'out'}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{broken / 'adapter_config.json'} is empty" in proc.stderr
    shutil.copy(trained["adapter"] / "checkpoint-2" / "adapter_config.json", broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    proc = run_script("chat.py", [f"adapter_path={broken}"], tmp_path, stdin="exit\n")
    assert proc.returncode == 2 and f"{weights} is not a complete safetensors file" in proc.stderr


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    out = tmp_path / "run"
    run_train(out, "trainer.max_steps=4", "save_steps=1", "save_total_limit=2")
    ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    assert sorted(p.name for p in (out / "checkpoints").glob("*.json")) == ["step-0000003.json", "step-0000004.json"]
    assert [p.name for p in ckpts] == ["step-0000003.ckpt", "step-0000004.ckpt"]  # the newest 2 kept
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    newest = ckpts[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2] if damage == "truncated" else b"")
    with caplog.at_level("WARNING"):
        run_train(out, "resume=true", "trainer.max_steps=5")
    assert f"skipping {newest}: it cannot be read" in caplog.text
    assert losses(out)[-2:] and json.loads((out / "final_metrics.json").read_text())["steps"] == 5


def test_a_corrupt_weight_file_in_model_path_is_named(trained, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(trained["base"], base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=f"{weights} is not a complete safetensors file"):
        run_train(tmp_path / "run", f"model.path={base}", "trainer.max_steps=1")


# ------------------------------------------------------------------------ 12. config values


def test_bad_values_are_all_refused_up_front(tmp_path):
    proc = cli(
        tmp_path,
        f"output_dir={tmp_path / 'run'}",
        "trainer.accumulate_grad_batches=0",
        "data.batch_size=0",
        "optim.warmup_steps=-1",
        "optim.weight_decay=-0.1",
        "adapter.alpha=-1",
        "trainer.gradient_clip_val=-1",
        "data.val_size=-1",
        "data.max_samples=0",
        "trainer.max_steps=0",
        "model.colour=blue",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    for problem in (
        "trainer.accumulate_grad_batches=0: must be at least 1",
        "data.batch_size=0: must be at least 1",
        "optim.warmup_steps=-1: must be at least 0",
        "optim.weight_decay=-0.1: must be at least 0",
        "adapter.alpha=-1: must be greater than 0",
        "trainer.gradient_clip_val=-1: must be at least 0",
        "data.val_size=-1: must be at least 0",
        "data.max_samples=0: must be at least 1 (null takes every",
        "trainer.max_steps=0: a positive number of steps",
        "model.colour: unknown key",
    ):
        assert problem in proc.stderr, (problem, proc.stderr)
    assert not (tmp_path / "run").exists()  # nothing was started or written


# ------------------------------------------------------------------------ found trying it as a new user would


def test_tiny_refuses_a_directory_that_holds_anything_but_a_tiny_model(tmp_path, capsys):
    from telechat_lab.cli import main

    (tmp_path / "config.json").write_text('{"mine": true}')
    with pytest.raises(SystemExit) as exit_:
        main(["tiny", str(tmp_path)])
    assert exit_.value.code == 2 and "holds no tiny model written earlier" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    main(["tiny", str(tmp_path / "new")])  # a new directory, then the same one again (re-used)
    main(["tiny", str(tmp_path / "new")])
    assert (tmp_path / "new" / "model.safetensors").is_file()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as exit_:
        main(["tiny", str(tmp_path / "afile")])
    assert exit_.value.code == 2 and "is a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "config.json", "new"]  # no staging left
    with pytest.raises(SystemExit) as exit_:
        main(["bogus"])
    assert exit_.value.code == 2 and "unknown command 'bogus'" in capsys.readouterr().err


def test_the_command_line_keeps_output_dir_out_of_the_demo_model_and_the_data_before_writing(tmp_path):
    import shutil

    from telechat_lab.resolve import model_dir

    inside_model = model_dir(None) / "run"
    proc = cli(tmp_path, f"output_dir={inside_model}")
    assert proc.returncode == 2 and "lies inside model.path" in proc.stderr and not inside_model.exists()
    data = tmp_path / "data"
    shutil.copytree(REPO / "telechat_lab" / "demo_data", data)
    before = tree_snapshot(data)
    proc = cli(tmp_path, f"data.dataset_dir={data}", f"output_dir={data}")
    assert proc.returncode == 2 and f"is data.dataset_dir={data}" in proc.stderr, proc.stderr  # not "holds a run"
    proc = cli(tmp_path, f"data.dataset_dir={data}", f"output_dir={data / 'run'}")
    assert proc.returncode == 2 and "lies inside data.dataset_dir" in proc.stderr
    proc = cli(tmp_path, "-m", f"hydra.sweep.dir={data / 'sweep'}", f"data.dataset_dir={data}")  # a sweep's too
    assert proc.returncode == 2 and "lies inside data.dataset_dir" in proc.stderr
    assert tree_snapshot(data) == before  # not even Hydra's .hydra/ or train.log


@pytest.mark.slow
def test_a_run_that_fails_before_its_first_step_leaves_its_directory_as_it_found_it(tmp_path):
    """A directory it made is removed; one that was there keeps exactly what it held; a run being replaced with
    overwrite=true comes back (and is deleted only once the new run has trained a step)."""
    out = tmp_path / "run"
    proc = cli(tmp_path, f"output_dir={out}", "data.datasets=[nope]")
    assert proc.returncode == 2 and "unknown dataset(s) ['nope']" in proc.stderr and not out.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.log").write_text("mine")
    assert cli(tmp_path, f"output_dir={mine}", "data.datasets=[nope]").returncode == 2
    assert [p.name for p in mine.iterdir()] == ["notes.log"] and (mine / "notes.log").read_text() == "mine"

    cli(tmp_path, f"output_dir={out}", "trainer.max_steps=1", check=True)
    assert (out / "adapter_model.safetensors").is_file()
    before = {k: v for k, v in tree_snapshot(out).items() if not k.startswith(".hydra") and k != "train.log"}
    assert cli(tmp_path, f"output_dir={out}", "overwrite=true", "data.datasets=[nope]").returncode == 2
    after = {k: v for k, v in tree_snapshot(out).items() if not k.startswith(".hydra") and k != "train.log"}
    assert after == before  # the earlier run, whole, not a mix
    cli(tmp_path, f"output_dir={out}", "overwrite=true", "trainer.max_steps=2", check=True)
    assert json.loads((out / "final_metrics.json").read_text())["steps"] == 2
    assert not (out / ".replaced-run").exists()


def test_a_missing_group_option_is_one_message(tmp_path):
    from telechat_lab import api
    from telechat_lab.config import command_line_config

    conf = str(REPO / "telechat_lab" / "conf")
    # experiment is an optional group: a misspelt preset was skipped silently; every choice of a sweep counts
    problems, _ = command_line_config(["-m", "experiment=tiny,telechat2_7b_lora_stf", "adapter=lora,dorra"], conf)
    assert problems == [
        "experiment=telechat2_7b_lora_stf: no such option; choose one of telechat2_7b_lora_sft, tiny, tiny_long",
        "adapter=dorra: no such option; choose one of dora, freeze, full, lora, qlora",
    ]
    problems, _ = command_line_config(["model=tiny"], conf, "chat")  # chat's model is keys (model.path), no group
    assert problems == ["model=tiny: chat has no 'model' option group; set its keys instead (--cfg job lists them)"]
    problems, _ = command_line_config(["lr=1e-4"], conf)
    assert problems == ["lr: unknown key; did you mean optim.lr?"]
    # an option of the user's own config directory (hydra.searchpath) is an option like the package's
    (tmp_path / "mine" / "experiment").mkdir(parents=True)
    (tmp_path / "mine" / "experiment" / "mine.yaml").write_text("# @package _global_\noptim:\n  lr: 0.001\n")
    problems, cfg = command_line_config([f"hydra.searchpath=[file://{tmp_path / 'mine'}]", "experiment=mine"], conf)
    assert problems == [] and cfg.optim.lr == 0.001

    proc = cli(tmp_path, "adapter=nope", f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "HYDRA_FULL_ERROR" not in proc.stderr + proc.stdout
    assert "adapter=nope: no such option; choose one of dora, freeze, full, lora, qlora" in proc.stderr
    with pytest.raises(ConfigError, match="adapter=nope: no such option"):
        api.compose("train", ["adapter=nope"])


def test_chat_and_inspect_check_their_files_before_working_and_never_replace_one_silently(trained, tmp_path):
    adapter = f"adapter_path={trained['adapter']}"
    proc = run_script("chat.py", [adapter, f"input={tmp_path / 'absent.txt'}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"input={tmp_path / 'absent.txt'}: no such file" in proc.stderr
    (tmp_path / "prompts.txt").write_text("hi\n")
    (tmp_path / "answers.jsonl").write_text("mine\n")
    args = [adapter, f"input={tmp_path / 'prompts.txt'}", f"output={tmp_path / 'answers.jsonl'}"]
    args.append("generation.max_new_tokens=2")
    proc = run_script("chat.py", args, tmp_path)
    assert proc.returncode == 2 and "exists: add overwrite=true" in proc.stderr
    assert (tmp_path / "answers.jsonl").read_text() == "mine\n"
    assert run_script("chat.py", [*args, "overwrite=true"], tmp_path).returncode == 0
    assert json.loads((tmp_path / "answers.jsonl").read_text())["prompt"] == "hi"

    from telechat_lab import api

    (tmp_path / "encoded.jsonl").write_text("mine\n")
    inspect = ["data.datasets=[identity]", "show=0", f"output={tmp_path / 'encoded.jsonl'}", CACHE.format(tmp_path)]
    with pytest.raises(ConfigError, match="exists: add overwrite=true"):
        api.inspect(inspect)
    assert (tmp_path / "encoded.jsonl").read_text() == "mine\n"
    api.inspect([*inspect, "overwrite=true"])
    assert "input_ids" in (tmp_path / "encoded.jsonl").read_text()

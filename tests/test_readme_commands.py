"""Every command in README.md's bash blocks and every `-m` sweep example in conf/ comments, run through the real
command line (`telechat_lab.cli.main`: what `telechat-lab` and `python train.py` run, the command-line check
included), so a documented command cannot break silently. The commands are parsed out of the files; RUNS says
for each what makes it cheap (overrides added after it, the tiny model, 1-2 steps) or why it is not run here.

The commands run in README order in one process (torch is imported once), in one working directory, so that
`python merge.py adapter_path=runs/demo` finds what `python train.py output_dir=runs/demo` wrote."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {  # how a documented command starts -> telechat-lab's arguments for it
    "python train.py": ["train"],
    "python merge.py": ["merge"],
    "python chat.py": ["chat"],
    "python eval.py": ["eval"],
    "python -m telechat_lab.data.inspect": ["inspect"],
    "telechat-lab": [],
}
CHEAP = [
    "trainer.max_steps=1",
    "data.datasets=[identity]",
    "data.max_samples=8",
    "trainer.enable_progress_bar=false",
    "plot_loss=false",
]
TRIALS = [*CHEAP, "hydra.sweeper.n_trials=1"]
STAGE_CHEAP = [c for c in CHEAP if not c.startswith("data.datasets=")]  # a stage's own demo data, cut short
SAY = ["generation.max_new_tokens=4", "generation.do_sample=false"]


@dataclass
class Run:
    """Run the command with `extra` overrides after it (the last value of a key wins); `instead`: run these
    arguments in its place; `files`: written first; `expect`: text its output holds."""

    extra: list[str] = field(default_factory=list)
    instead: list[str] | None = None
    files: dict[str, str] = field(default_factory=dict)
    expect: str = ""


@dataclass
class Check:
    """Only the command-line check (what cannot run on this machine): it passes, or reports only these problems."""

    problems_start: tuple[str, ...] = ()
    hydra_cfg_holds: str = ""  # and `--cfg hydra` shows this (the launcher it reaches)


@dataclass
class Skip:
    reason: str


RUNS: dict[str, Run | Check | Skip] = {
    "make demo": Skip("creates .venv and installs; the job it runs is `python train.py`, run below"),
    "make test": Skip("the whole test suite"),
    # make demo installs .venv first; the job it runs is this one (the preset, cut short)
    "make demo ARGS=experiment=tiny_long": Run(instead=["train", "experiment=tiny_long", *CHEAP]),
    "python -m venv .venv && . .venv/bin/activate": Skip("installation"),
    "pip install torch==2.13.0": Skip("installation"),
    "pip install -e .[dev]": Skip("installation"),
    "telechat-lab train trainer.max_steps=20": Run([*CHEAP, "output_dir=runs/first"]),
    "telechat-lab merge adapter_path=DIR export_dir=OUT": Run(["adapter_path=runs/first", "export_dir=runs/first-out"]),
    "telechat-lab chat model.path=OUT": Run(["model.path=runs/first-out", *SAY]),
    "telechat-lab inspect data.datasets=[identity]": Run(["data.max_samples=2"]),
    "telechat-lab tiny ./tiny-model": Run(),
    "eval $(telechat-lab train -sc install=bash)": Run(instead=["train", "-sc", "install=bash"], expect="complete"),
    "python train.py output_dir=runs/try1 trainer.max_steps=50": Run(CHEAP),
    "python train.py adapter=dora optim.lr=1e-4 data.cutoff_len=2048": Run(CHEAP),
    "python train.py model=telechat2_7b model.path=/path/to/TeleChat2-7B hardware=deepspeed_zero3": Check(
        ("model.path=/path/to/TeleChat2-7B: no config.json", "hardware=deepspeed_zero3: ", "hardware.accelerator=gpu")
    ),
    "python train.py experiment=telechat2_7b_lora_sft": Run(
        [*CHEAP, "model.path=tiny-model", "data.preprocessing_num_workers=1", "output_dir=runs/preset"]
    ),
    "python train.py output_dir=runs/try1 resume=true": Run([*CHEAP, "trainer.max_steps=2"]),
    "python train.py output_dir=runs/try1 resume=true trainer.max_epochs=20": Run([*CHEAP, "trainer.max_steps=3"]),
    "python train.py -m adapter=lora,dora optim.lr=1e-4,3e-4": Run([*CHEAP, "optim.lr=1e-4"], expect="summary"),
    "python train.py -m hydra/launcher=joblib hydra.launcher.n_jobs=2 adapter=lora,dora": Run(CHEAP, expect="summary"),
    "python train.py -m hparams_search=lora_optuna": Run(TRIALS, expect="summary"),
    "python train.py -m hparams_search=lora_optuna hydra.sweeper.storage=sqlite:///lora.db": Run(TRIALS),
    "python train.py -m hparams_search=lora_optuna hydra/launcher=joblib hydra.sweeper.n_jobs=2": Run(
        [*CHEAP, "hydra.sweeper.n_trials=2"]  # two trials at a time
    ),
    # no SLURM here: the check passes, and Hydra's config for the sweep holds submitit's SLURM launcher
    "python train.py -m hydra/launcher=slurm hardware=ddp adapter=lora,dora": Check(
        hydra_cfg_holds="hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    ),
    "python train.py -m hydra/launcher=slurm hardware=ddp hardware.devices=8 adapter=lora,dora": Check(
        hydra_cfg_holds="hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    ),
    "python -m telechat_lab.data.inspect data.datasets=[alpaca_en_demo] output=encoded.jsonl": Run(
        ["data.max_samples=2"]
    ),
    # each its own output_dir: the default (outputs/train/<time to the second>) is one for runs within a second
    "python train.py stage=pt": Run([*STAGE_CHEAP, "output_dir=runs/stage-pt"]),
    "python train.py stage=pt data.streaming=true data.packing=true trainer.max_steps=100 data.val_size=4 "
    "data.dataloader_num_workers=2": Run([*STAGE_CHEAP, "output_dir=runs/stage-stream"]),
    "python train.py stage=dpo stage.beta=0.1": Run([*STAGE_CHEAP, "output_dir=runs/stage-dpo"]),
    "python train.py stage=dpo stage.loss=simpo stage.beta=2.0 stage.simpo_gamma=0.5": Run(
        [*STAGE_CHEAP, "output_dir=runs/stage-simpo"]
    ),
    "python train.py stage=kto": Run([*STAGE_CHEAP, "output_dir=runs/stage-kto"]),
    "python train.py -m stage=dpo stage.beta=0.05,0.1,0.3": Run(
        [*STAGE_CHEAP, "stage.beta=0.05,0.1"], expect="summary"
    ),
    "python train.py output_dir=runs/sft": Run(CHEAP),
    "python train.py stage=dpo stage.reference=runs/sft output_dir=runs/dpo": Run(STAGE_CHEAP),
    "python merge.py adapter_path=runs/dpo export_dir=runs/dpo-merged": Run(),
    "python chat.py model.path=runs/dpo-merged": Run(SAY),
    "python train.py output_dir=runs/demo": Run(CHEAP),
    "python merge.py adapter_path=runs/demo export_dir=runs/merged": Run(),
    "python chat.py model.path=runs/merged": Run(SAY),
    "python chat.py adapter_path=runs/demo": Run(SAY),
    "python chat.py model.path=runs/merged input=prompts.txt output=answers.jsonl": Run(
        SAY, files={"prompts.txt": "Who are you?\n"}
    ),
    "vllm serve runs/merged --trust-remote-code": Skip("vLLM's own server: the vllm extra on a CUDA machine"),
    "pip install -e .[serve]": Skip("installation"),
    # a server runs until stopped: here its command line is checked; tests/test_serve.py starts one and drives it
    "telechat-lab serve adapters=[runs/a,runs/b]": Check(),
    "telechat-lab serve model.path=/path/to/TeleChat2-7B model.name=telechat2 adapters={sft:runs/sft,tools:runs/tools} "
    "port=8000": Check(("model.path=/path/to/TeleChat2-7B",)),
    **{  # the serve section's adapters (runs/sft, runs/tools) are the demo's run here
        f"python merge.py adapter_path=runs/{name} export_mode=vllm_adapter export_dir=runs/{name}-vllm": Run(
            instead=["merge", "adapter_path=runs/demo", "export_mode=vllm_adapter", f"export_dir=runs/{name}-vllm"]
        )
        for name in ("sft", "tools")
    },
    "python merge.py adapter_path=runs/demo export_mode=vllm_adapter export_dir=runs/demo-vllm": Run(),
    "vllm serve /path/to/TeleChat2-7B --trust-remote-code --served-model-name telechat2 --enable-lora --lora-modules "
    "sft=runs/sft-vllm tools=runs/tools-vllm --max-lora-rank 64 --enable-auto-tool-choice "
    "--tool-call-parser hermes": Skip("vLLM's own server: the vllm extra on a CUDA machine"),
    "vllm serve BASE_OR_EXPORT --trust-remote-code --enable-lora --max-lora-rank 8 "
    "--lora-modules demo=runs/demo-vllm": Skip("vLLM's own server: the vllm extra on a CUDA machine"),
    "telechat-lab eval run_dir=runs/demo eval.split=val": Run(["generation.max_new_tokens=4"], expect="rouge-l"),
    "telechat-lab eval run_dir=runs/demo data.datasets=[alpaca_en_demo] data.max_samples=100": Run(
        ["data.max_samples=2", "generation.max_new_tokens=4"], expect="predictions:"
    ),
    "telechat-lab eval model.path=runs/merged data.datasets=[alpaca_en_demo]": Run(
        ["data.max_samples=2", "generation.max_new_tokens=4"], expect="predictions:"
    ),
    # DATE: a training sweep's; here two runs of this README stand for its jobs
    "telechat-lab eval -m run_dir=multirun/train/DATE/0,multirun/train/DATE/1 eval.split=val": Run(
        instead=["eval", "-m", "run_dir=runs/demo,runs/first", "eval.split=val", "generation.max_new_tokens=4"],
        expect="sweep summary (2 jobs)",
    ),
    "telechat-lab eval sweep_dir=multirun/train/DATE eval.split=val": Skip(
        "DATE is a training sweep's directory; tests/test_eval.py evaluates a sweep_dir"
    ),
    "telechat-lab eval run_dir=runs/demo eval.tasks=[telechat_mc] eval.apply_chat_template=true": Run(
        ["eval.limit=2"], expect="telechat_mc"
    ),
    "python train.py callbacks=samples data.val_size=0.1": Run([*CHEAP, "callbacks.samples.max_new_tokens=4"]),
    "python train.py model=telechat2_7b model.path=/path/to/TeleChat2-7B": Check(("model.path=/path/to/TeleChat2-7B",)),
    **{
        f".venv/bin/python bench/{name}": Skip("a benchmark (bench/): tests/test_bench.py runs its smoke version")
        for name in (
            "tokenizer_speed.py",
            "data_prep.py",
            "loss_memory.py",
            "startup.py",
            "step_profile.py --cutoff 1024",
            "train_throughput.py --cpu-smoke",
            "train_throughput.py --shape telechat2_7b --adapter lora --cutoff 2048",
        )
    },
    "bash scripts/bundle_gpu.sh": Skip("bundles wheels for a GPU machine (downloads)"),
    **{
        f"bash scripts/gpu_bench.sh {part}": Skip("runs on a GPU machine")
        for part in ("check", "lora", "qlora", "compile", "cutoffs", "sizes", "full")
    },
}


def _normal(text: str) -> str:
    return " ".join(shlex.split(text, comments=True))


def readme_commands() -> list[str]:
    """Each command line of README.md's bash blocks, without its comment."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.S | re.M)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]  # `\` continues a line
    return [_normal(line) for line in lines if _normal(line)]


def conf_sweep_examples() -> list[str]:
    """`python train.py -m ...` in conf/ comments; a comment line `... more` continues the example before it."""
    found = []
    for path in sorted((REPO / "telechat_lab" / "conf").rglob("*.yaml")):
        last = None
        for line in path.read_text().splitlines():
            comment = line.partition("#")[2]
            if match := re.search(r"(python train\.py -m .*?)(\s{2,}|$)", comment):
                last = _normal(match.group(1))
                found.append(last)
            elif last and (match := re.match(r"\s*\.\.\.\s+(.*?)(\s{2,}|$)", comment)):
                found.append(f"{last} {_normal(match.group(1))}")
    return found


def documented() -> list[str]:
    return list(dict.fromkeys(readme_commands() + conf_sweep_examples()))


def telechat_lab_args(command: str) -> list[str]:
    for start, args in ENTRY_POINTS.items():
        if command.startswith(start + " ") or command == start:
            return [*args, *shlex.split(command[len(start) :])]
    raise AssertionError(f"{command}: not a telechat-lab command (add its entry point, or Skip it in RUNS)")


def test_every_documented_command_is_run_or_skipped_with_a_reason():
    commands = documented()
    assert "python train.py -m hydra/launcher=joblib hydra.launcher.n_jobs=2 adapter=lora,dora" in commands
    assert "python train.py -m hparams_search=lora_optuna hydra/launcher=joblib hydra.sweeper.n_jobs=2" in commands
    assert [c for c in commands if c not in RUNS] == [], "add these to RUNS: a Run, a Check or a Skip with a reason"
    assert [c for c in RUNS if c not in commands] == [], "no longer documented: remove from RUNS"
    assert all(entry.reason for entry in RUNS.values() if isinstance(entry, Skip))


@pytest.mark.parametrize("command", [c for c, entry in RUNS.items() if isinstance(entry, Check)])
def test_documented_commands_that_cannot_run_here_pass_the_check(command):
    from telechat_lab.cli import CONF_DIR
    from telechat_lab.config import command_line_config

    entry = RUNS[command]
    name, *args = telechat_lab_args(command)
    problems, _ = command_line_config(args, CONF_DIR, name)
    assert [p for p in problems if not p.startswith(entry.problems_start or ("\0",))] == []
    if entry.hydra_cfg_holds:  # Hydra prints a config without -m or a sweep: its choices of Hydra's groups
        shown = [name, *(a for a in args if a.startswith("hydra")), "--cfg", "hydra"]
        out = subprocess.run(
            [sys.executable, "-c", "from telechat_lab.cli import main; main()", *shown],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0 and entry.hydra_cfg_holds in out.stdout, out.stderr[-2000:]


@pytest.mark.slow
def test_documented_commands_run(tmp_path):
    """The whole list in one process (see the module docstring): each ends with exit code 0 and what it says, with
    no warning (a launcher's workers too)."""
    plan = []
    for command in documented():
        entry = RUNS.get(command)  # one not in RUNS: test_every_documented_command_is_run_or_skipped_with_a_reason
        if isinstance(entry, Run):
            args = entry.instead or [*telechat_lab_args(command), *entry.extra]
            if "-m" in args:  # each sweep its own directory (two started in one second would share one)
                args.append(f"hydra.sweep.dir=sweeps/{len(plan)}")
            plan.append({"command": command, "args": args, "files": entry.files})
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path / "plan.json"), str(tmp_path / "results.json")],
        cwd=work,
        input="Hello\nexit\n" * 3,  # the interactive chats
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    results = json.loads((tmp_path / "results.json").read_text()) if (tmp_path / "results.json").exists() else []
    output = proc.stdout + proc.stderr
    assert len(results) == len(plan), output[-4000:]
    failed = [r["command"] for r in results if r["rc"] != 0]
    assert failed == [], "\n".join(r["output"][-2500:] for r in results if r["rc"] != 0)
    for step, result in zip(plan, results):
        expect = RUNS[step["command"]].expect
        assert expect in result["output"], f"{step['command']}: no {expect!r} in\n{result['output'][-2000:]}"
        assert "Warning" not in result["output"], f"{step['command']} warns:\n{result['output'][-2000:]}"


def _run_plan(plan_file: str, results_file: str) -> None:
    """The child process of test_documented_commands_run: each command through telechat_lab.cli.main, its exit
    code and its output (stdout and stderr, into one file per command) recorded."""
    from telechat_lab.cli import main

    results = []
    for i, step in enumerate(json.loads(Path(plan_file).read_text())):
        for name, text in step["files"].items():
            Path(name).write_text(text)
        environ, argv, log = dict(os.environ), list(sys.argv), Path(f"../out-{i}.txt")
        started = time.perf_counter()
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with log.open("w") as out:
            os.dup2(out.fileno(), 1), os.dup2(out.fileno(), 2)
            try:
                main(list(step["args"]))
                rc = 0
            except SystemExit as err:
                rc = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
            except BaseException:
                traceback.print_exc()
                rc = "traceback"
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        os.environ.clear(), os.environ.update(environ)
        sys.argv[:] = argv
        seconds = round(time.perf_counter() - started, 1)
        results.append({"command": step["command"], "rc": rc, "seconds": seconds, "output": log.read_text()})
        Path(results_file).write_text(json.dumps(results))


if __name__ == "__main__":
    _run_plan(*sys.argv[1:3])

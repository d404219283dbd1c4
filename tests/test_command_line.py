"""The check of a command line before Hydra runs (telechat_lab/config/command_line.py): Hydra's own groups and keys,
near names for misspelt keys, missing extras, and what each command completes and documents."""

import os
import subprocess
import sys

import pytest
from helpers import CONF, REPO

from telechat_lab.config import command_line_config


def problems(*argv, command="train"):
    return command_line_config(list(argv), CONF, command)[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "adapter=lora,dora"],
        ["-m", "hparams_search=lora_optuna", "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2"],
        ["-m", "hydra/launcher=slurm", "hardware=ddp", "adapter=lora,dora"],
    ],
)
def test_hydra_groups_pass_the_check(argv):
    """hydra/launcher=... is Hydra's group, not one of train's (it was refused: 'train has no hydra/launcher')."""
    assert problems(*argv) == []


def test_a_misspelt_hydra_group_option_is_named():
    assert problems("-m", "hydra/launcher=jobli", "adapter=lora,dora") == [
        "hydra/launcher=jobli: no such option; choose one of basic, joblib, slurm, submitit_local, submitit_slurm"
    ]


@pytest.mark.parametrize(
    "arg,suggested",
    [
        ("trainer.max_step=5", "trainer.max_steps"),  # Lightning's Trainer arguments, before offering '+'
        ("optim.learning_rate=1e-4", "optim.lr"),  # the HF name inside the group
        ("learning_rate=1e-4", "optim.lr"),
        ("num_train_epochs=2", "trainer.max_epochs"),
        ("per_device_train_batch_size=2", "data.batch_size"),
        ("adapter.lora_rank=4", "adapter.rank"),
        ("logger.csv.save_di=x", "logger.csv.save_dir"),  # a free-form group's own keys
    ],
)
def test_unknown_keys_get_the_near_name(arg, suggested):
    (problem,) = problems(arg)
    key = arg.split("=")[0]
    assert problem.startswith(f"{key}: unknown key; did you mean {suggested}"), problem


def test_other_commands_get_near_names_too():
    assert problems("generation.max_new_token=4", command="chat") == [
        "generation.max_new_token: unknown key; did you mean generation.max_new_tokens?"
    ]
    assert problems("export_dri=out", command="merge")[0].startswith("export_dri: unknown key; did you mean export_dir")


def test_a_trainer_key_is_suggested_before_adding_one():
    assert problems("trainer.max_step=5") == [
        "trainer.max_step: unknown key; did you mean trainer.max_steps, trainer.max_time, trainer.min_steps? "
        "(to add a new key write +trainer.max_step=...)"
    ]


def test_every_alias_names_a_real_key():
    from helpers import compose_train

    from telechat_lab.config.suggest import ALIASES, _exists

    cfg = compose_train([])
    assert [alias for alias in ALIASES.values() if not _exists(cfg, alias)] == []


@pytest.mark.parametrize(
    "argv,module,said",
    [
        (["-m", "hparams_search=lora_optuna"], "optuna", "hydra.sweeper: the Optuna sweeper needs optuna, which is"),
        (["-m", "hydra/launcher=joblib", "adapter=lora,dora"], "hydra_plugins.hydra_joblib_launcher", "hydra/launcher"),
        (["-m", "hydra/launcher=slurm", "hardware=ddp"], "submitit", "hydra/launcher=slurm: the submitit"),
        (["logger=wandb"], "wandb", "logger.wandb: the wandb logger"),
        (["logger=tensorboard"], "tensorboard", "logger.tensorboard: the TensorBoard logger"),
        (["hardware=deepspeed_zero2"], "deepspeed", "hardware.strategy=deepspeed: DeepSpeed"),
        (["adapter=qlora"], "bitsandbytes", "adapter.type=qlora: QLoRA"),
        (["model.attn_implementation=flash_attention_2"], "flash_attn", "model.attn_implementation=flash_attention_2"),
    ],
)
def test_a_missing_extra_is_named_with_its_install(monkeypatch, argv, module, said):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    found = problems(*argv)
    assert any(p.startswith(said) and p.endswith('pip install "telechat-lab[' + extra_of(module) + ']"') for p in found)


def extra_of(module):
    from telechat_lab.extras import FEATURES

    return next(f.extra for f in FEATURES if module in f.modules)


def test_vllm_chat_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert problems("infer_backend=vllm", command="chat") == [
        'infer_backend=vllm: vLLM needs vllm, which is not installed: pip install "telechat-lab[vllm]"'
    ]


def test_installed_extras_say_nothing():
    assert problems("-m", "hparams_search=lora_optuna", "hydra/launcher=joblib", "logger=wandb") == []


@pytest.mark.slow
def test_train_without_optuna_stops_before_hydra_runs(tmp_path):
    """The command line itself (a process without optuna): one message naming the extra, exit 2, nothing written."""
    code = "import sys; sys.modules['optuna'] = None; from telechat_lab.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", "-m", "hparams_search=lora_optuna"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert 'needs optuna, which is not installed: pip install "telechat-lab[sweep]"' in proc.stderr
    assert "Traceback" not in proc.stderr and "Error locating target" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


PROGRAM = "import sys; sys.argv[0] = 'telechat-lab'; from telechat_lab.cli import main; main()"


def run_cli(args, line=None, script=None):
    """`telechat-lab ARGS` (or `python SCRIPT ARGS`), with COMP_LINE for a completion query; stdout, and whether
    torch was imported by then."""
    start = f"import runpy\nsys.argv = [{str(script)!r}, *sys.argv[1:]]\n"
    start += "runpy.run_path(sys.argv[0], run_name='__main__')"
    code = "import atexit, sys\natexit.register(lambda: print('TORCH', 'torch' in sys.modules))\n"
    code += start if script else PROGRAM
    env = {**os.environ, **({"COMP_LINE": line} if line is not None else {})}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out, _, torch = proc.stdout.rpartition("TORCH ")
    return out, torch.strip() == "True"


def test_help_documents_only_the_commands_own_groups_without_torch():
    train, torch = run_cli(["train", "--help"])
    assert "adapter: dora, freeze, full, lora, qlora" in train and "hparams_search: lora_optuna" in train
    assert "schema:" not in train and "schema=" not in train and "optimized_metric:" in train and not torch
    merge, torch = run_cli(["--help"], script=REPO / "merge.py")
    assert "adapter_path:" in merge and "export_dir:" in merge and not torch
    assert "Option groups" not in merge and "adapter:" not in merge and "schema:" not in merge
    inspect, _ = run_cli(["inspect", "--help"])
    groups = inspect.split("== Option groups ==")[1].split("==")[0]
    assert "data: default" in groups and "model: " in groups and "adapter" not in groups


@pytest.mark.parametrize("command", ["merge", "chat"])
def test_completion_offers_only_the_commands_own_groups_without_torch(command):
    words, torch = run_cli(["-sc", "query=bash"], f"telechat-lab {command} ")
    assert "adapter_path=" in words.split() and not torch
    assert not {"adapter=", "data.", "schema=", "trainer."} & set(words.split()), words
    words, torch = run_cli(["-sc", "query=bash"], f"python {command}.py ", script=REPO / f"{command}.py")
    assert "adapter_path=" in words.split() and "adapter=" not in words.split() and not torch


def test_train_completion_keeps_its_groups_but_not_the_internal_schema():
    words, torch = run_cli(["-sc", "query=bash"], "telechat-lab train ")
    assert {"adapter=", "hparams_search=", "trainer.", "optim.lr="} - set(words.split()) <= {"optim.lr="}
    assert "schema=" not in words.split() and not torch


def test_a_glob_sweep_of_a_hydra_group_is_left_to_hydra():
    assert problems("-m", "hydra/launcher=glob(*)", "adapter=lora") == []


def test_a_command_that_needs_an_extra_names_it(monkeypatch):
    from omegaconf import OmegaConf

    from telechat_lab.extras import missing_for_config

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert missing_for_config(OmegaConf.create({}), "serve") == [
        'serve: the HTTP server needs uvicorn, which is not installed: pip install "telechat-lab[serve]"'
    ]
    assert missing_for_config(OmegaConf.create({}), "merge") == []
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert missing_for_config(OmegaConf.create({"eval": {"tasks": []}}), "eval") == []
    assert missing_for_config(OmegaConf.create({"eval": {"tasks": ["mmlu"]}}), "eval") == [
        "eval.tasks: lm-evaluation-harness tasks needs lm_eval, which is not installed: "
        'pip install "telechat-lab[eval]"'
    ]


@pytest.mark.parametrize("target", ["[q_proj]", "'query,q_proj'", "[query,k_proj,v_proj]"])
def test_an_adapter_target_the_model_lacks_is_named(target):
    """adapter.target=[q_proj] passed the check and failed after encoding, with a traceback."""
    (problem,) = problems(f"adapter.target={target}")
    assert problem.startswith("adapter.target=") and "TeleChat2 has no module" in problem, problem
    assert "q_proj" in problem or "k_proj, v_proj" in problem
    assert "query, key_value, dense, gate_proj, up_proj, down_proj, lm_head" in problem


def test_adapter_targets_the_model_has_pass():
    assert problems("adapter.target=[query,dense,lm_head]") == []
    assert problems("adapter.target='gate_proj,up_proj'") == []


def test_logger_and_callback_arguments_are_bound_to_their_class():
    """A logger's or callback's arguments were checked by nobody: each is bound to its class's signature."""
    assert problems("logger=csv", "+logger.csv.nme=x") == ["logger.csv.nme: not an argument of StepCSVLogger"]
    early = "+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping"
    assert problems(early, "+callbacks.stop.monitr=val/loss") == [
        "callbacks.stop.monitr: not an argument of EarlyStopping",
        "callbacks.stop.monitor: required by EarlyStopping (give +callbacks.stop.monitor=...)",
    ]
    assert problems(early, "+callbacks.stop.monitor=val/loss", "+callbacks.stop.patience=2") == []
    assert problems("+callbacks.x._target_=lightning.pytorch.callbacks.NoSuchCallback")[0].startswith(
        "callbacks.x._target_=lightning.pytorch.callbacks.NoSuchCallback: cannot be imported"
    )


def test_an_optimising_sweep_without_a_validation_split_is_a_config_problem():
    """The rule lived in training/run.py, after the config check; it is one of the config's problems now."""
    said = problems("-m", "hparams_search=lora_optuna", "data.val_size=0", "data.batch_size=0")
    assert "data.batch_size=0: must be at least 1" in said
    assert any(p.startswith("the sweep optimises optimized_metric=val_loss, but data.val_size=0") for p in said)
    assert problems("-m", "hparams_search=lora_optuna", "data.val_size=4") == []


@pytest.mark.parametrize("module", ["telechat_lab", "telechat_lab.cli"])
def test_the_module_forms_run_the_commands(module, tmp_path):
    """`python -m telechat_lab` and `python -m telechat_lab.cli` are the telechat-lab command (the latter printed
    nothing and exited 0)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = dict(capture_output=True, text=True, cwd=tmp_path, env=env)
    proc = subprocess.run([sys.executable, "-m", module, "merge", "--help"], **run)
    assert proc.returncode == 0 and proc.stdout.startswith("merge: "), proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", module, "bogus"], **run)
    assert proc.returncode == 2 and "unknown command 'bogus'" in proc.stderr


def test_a_config_error_is_reported_without_importing_torch_or_lightning():
    """`python train.py optim.lr=fast` took ~15 s here to say so: its check imported torch (the DeepSpeed accelerator's
    name, whether CUDA is visible) and Lightning (the Trainer's signature, the CSV logger's class)."""
    code = "import atexit, sys\n"
    code += "atexit.register(lambda: print('HEAVY', 'torch' in sys.modules, 'lightning' in sys.modules))\n" + PROGRAM
    argv = [sys.executable, "-c", code, "train", "optim.lr=fast", "trainer.max_steps=0"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "optim.lr='fast': expected a number" in proc.stderr and "trainer.max_steps=0: a positive" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip().endswith("HEAVY False False"), proc.stdout


def test_the_trainer_arguments_known_without_lightning_are_its_arguments():
    import inspect

    from lightning.pytorch import Trainer

    from telechat_lab.config.validate import TRAINER_ARGUMENTS, trainer_arguments

    installed = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    assert TRAINER_ARGUMENTS <= installed
    beyond = sorted(installed - TRAINER_ARGUMENTS)  # a newer Lightning's: checked against the installed one
    assert trainer_arguments({"max_steps", *beyond, "no_such_argument"}) == {"max_steps", *beyond}
    assert problems("+trainer.no_such_argument=1") == [
        "trainer.no_such_argument: not an argument of lightning.pytorch.Trainer"
    ]


@pytest.mark.parametrize("group", ["logger", "callbacks"])
def test_the_shipped_logger_and_callback_entries_bind_to_their_classes(group, monkeypatch):
    """The check leaves an entry as conf/ ships it unimported: each of them, imported, has no problem."""
    import importlib

    validate = importlib.import_module("telechat_lab.config.validate")  # the package's `validate` is the function

    entries = validate.shipped_entries(group)
    assert entries and all("_target_" in e for e in entries)
    monkeypatch.setattr(validate, "shipped_entries", lambda name: [])
    for entry in entries:
        found: list[str] = []
        validate._instantiated_problems({"entry": entry}, group, found)
        assert found == [], entry
    found = []
    validate._instantiated_problems({"entry": {**entries[0], "no_such_argument": 1}}, group, found)
    assert found and "no_such_argument: not an argument of" in found[0]

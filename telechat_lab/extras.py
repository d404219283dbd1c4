"""Optional features and the extra that installs each: checked from the command line and its composed config
before Hydra runs, so a missing package is named with its `pip install` instead of failing mid-run (Hydra's
`Error locating target 'optuna.samplers.TPESampler'`)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Feature:
    name: str
    modules: tuple[str, ...]  # what must be importable
    extra: str  # pip install "telechat-lab[EXTRA]"
    options: tuple[str, ...] = ()  # group=option choices that use it (a plugin's option: before composing)
    targets: tuple[str, ...] = ()  # prefixes of a `_target_` anywhere in the config (hydra's included)
    setting: tuple[str, Any] | None = None  # (dotted key, value) that uses it
    commands: tuple[str, ...] = ()  # commands that always use it


NAMED = object()  # a Feature.setting value: any value but null or empty

FEATURES = (
    Feature("the Optuna sweeper", ("optuna",), "sweep", targets=("optuna.", "hydra_plugins.telechat_lab_sweepers.")),
    Feature(
        "the joblib launcher",
        ("hydra_plugins.hydra_joblib_launcher", "joblib"),
        "sweep",
        options=("hydra/launcher=joblib",),
        targets=("hydra_plugins.hydra_joblib_launcher.",),
    ),
    Feature(
        "the submitit (SLURM) launcher",
        ("hydra_plugins.hydra_submitit_launcher", "submitit"),
        "sweep",
        options=("hydra/launcher=slurm", "hydra/launcher=submitit_slurm", "hydra/launcher=submitit_local"),
        targets=("hydra_plugins.hydra_submitit_launcher.",),
    ),
    Feature("the wandb logger", ("wandb",), "wandb", targets=("lightning.pytorch.loggers.WandbLogger",)),
    Feature(
        "the TensorBoard logger", ("tensorboard",), "tensorboard", targets=("lightning.pytorch.loggers.TensorBoard",)
    ),
    Feature("DeepSpeed", ("deepspeed",), "deepspeed", setting=("hardware.strategy", "deepspeed")),
    Feature("QLoRA's 4-bit base", ("bitsandbytes",), "qlora", setting=("adapter.type", "qlora")),
    Feature("flash-attn", ("flash_attn",), "flash", setting=("model.attn_implementation", "flash_attention_2")),
    Feature("vLLM", ("vllm",), "vllm", setting=("infer_backend", "vllm")),
    Feature("vLLM", ("vllm",), "vllm", setting=("engine", "vllm")),  # eval's
    Feature("the HTTP server", ("fastapi", "uvicorn", "sse_starlette"), "serve", commands=("serve",)),
    Feature("BLEU / ROUGE scoring", ("jieba", "rouge_chinese", "nltk"), "eval", commands=("eval",)),
    Feature("lm-evaluation-harness tasks", ("lm_eval",), "eval", setting=("eval.tasks", NAMED)),
)


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package; a module set to None in sys.modules
        return False


def _message(feature: Feature, where: str) -> str | None:
    missing = next((m for m in feature.modules if not installed(m)), None)
    if missing is None:
        return None
    install = f'pip install "telechat-lab[{feature.extra}]"'
    return f"{where}: {feature.name} needs {missing}, which is not installed: {install}"


def missing_for_options(choices: list[str]) -> list[str]:
    """`group=option` choices (each choice of a sweep) whose option comes from a package that is not installed."""
    return [
        message
        for choice in choices
        for feature in FEATURES
        if choice in feature.options and (message := _message(feature, choice))
    ]


def _targets(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(where, target) of every `_target_` in a plain container of a config."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_" and isinstance(value, str):
                yield path or "_target_", value
            else:
                yield from _targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _targets(item, f"{path}[{i}]")


def missing_for_config(cfg: DictConfig, command: str = "") -> list[str]:
    """Every feature a command's composed config (with its `hydra` node) uses whose package is not installed."""
    problems = []
    targets = list(_targets(OmegaConf.to_container(cfg, resolve=False)))
    for feature in FEATURES:
        where = next((w for w, t in targets if t.startswith(feature.targets)), None) if feature.targets else None
        if command in feature.commands:
            where = command
        if feature.setting is not None:
            key, value = feature.setting
            found = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
            if (found == value) if value is not NAMED else bool(found):
                where = f"{key}={value}" if value is not NAMED else key
        if where is not None and (message := _message(feature, where)):
            problems.append(message)
    return list(dict.fromkeys(problems))

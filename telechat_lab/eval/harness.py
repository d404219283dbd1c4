"""Benchmarks through lm-evaluation-harness (the `eval` extra): any harness task by name, scored on our model object.

The model goes to the harness as it is loaded (a TeleChat2 `PreTrainedModel`, or a peft model with its adapters
applied) through the harness's own `HFLM`, which accepts a model instance and a tokenizer: it works as it is with
transformers 5 and our tokenizer (a fast tokenizer), so it is subclassed only where our model needs something else
(`TelechatLM`): the chat template gets no system prompt of its own (run_tasks passes the one asked for), the
context is limited to the model's `training_seqlen`, log-likelihoods are computed in float32 on a bf16 model too,
and describing the model asks no hub for a commit hash (the network).

With `apply_chat_template=True` every prompt is the conversation a TeleChat2 chat model was trained on: the
system prompt (`system_prompt`; None: TeleChat's default, as the data encoder means it; "": none), the few-shot
examples as earlier turns, then `<_user>question<_bot>`; an answer is scored as the reply that follows `<_bot>`
(no space before it). Its token ids are those the training encoder (`ChatEncoder`) builds for that conversation:
tests/test_harness.py checks it, and that the harness's log-likelihood of every choice equals our own
computation with the model.

The tasks of this project (telechat_lab/eval/tasks/, `telechat_mc` and `telechat_mc_text`) are always found; their
data files are read relative to their folder, so they need no network and no working directory of their own.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from telechat_lab.errors import ConfigError, UserError
from telechat_lab.tokenizer import DEFAULT_SYSTEM_PROMPT

#: The folder of this project's own task YAMLs and their data (package data).
BUNDLED_TASKS = Path(__file__).resolve().parent / "tasks"

_INSTALL = 'pip install "telechat-lab[eval]"'
_LIST_TASKS = "`lm-eval ls tasks` lists the harness's tasks"

#: lm-eval's log lines about choices this module makes on purpose (a model object rather than a name, the tasks'
#: default few-shot count replaced by the one asked for): nothing a user can act on. Every other line shows.
_NOT_OURS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Overwriting default num_fewshot of",
)


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            [f"eval.tasks: benchmarks need lm-evaluation-harness (lm_eval), which is not installed: {_INSTALL}"]
        ) from err


def bundled_tasks() -> list[str]:
    """The names of this project's tasks (one YAML each in BUNDLED_TASKS)."""
    return sorted(path.stem for path in BUNDLED_TASKS.glob("*.yaml"))


@lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    """lm-eval's index of tasks (it reads every task YAML it ships: seconds), with ours and `include_path`'s."""
    from lm_eval.tasks import TaskManager

    paths = [str(BUNDLED_TASKS)] + ([include_path] if include_path else [])
    return TaskManager(include_path=paths)


def _bundled_config(name: str) -> dict:
    """One of our task YAMLs as an inline task config, its data files made absolute (relative to its folder)."""
    import yaml

    path = BUNDLED_TASKS / f"{name}.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    files = config.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, dict):
        config["dataset_kwargs"]["data_files"] = {split: str(path.parent / f) for split, f in files.items()}
    elif isinstance(files, str):
        config["dataset_kwargs"]["data_files"] = str(path.parent / files)
    return config


def check_tasks(tasks: list[str], include_path: str | None = None) -> list[Any]:
    """What the harness loads for `tasks` (names of its tasks, groups or tags, ours, task YAML files, or patterns
    such as `mmlu_*` that stand for the names they match), or a ConfigError naming every task it does not know
    and how to list the known ones. It reads lm-eval's index of tasks (seconds), not a model: a command can call
    it before loading one."""
    _require_lm_eval()
    problems = []
    if include_path is not None and not Path(include_path).is_dir():
        problems.append(f"eval.include_path: {include_path} is not a directory (of task YAML files)")
    if not tasks:
        problems.append(f"eval.tasks: no task named; {_LIST_TASKS}")
    if problems:
        raise ConfigError(problems)
    manager = _task_manager(str(Path(include_path).resolve()) if include_path else None)
    known = set(manager.all_tasks)
    ours = bundled_tasks()
    names = []
    for name in tasks:  # a pattern (`mmlu_*`) stands for the tasks it matches, as on lm-eval's command line
        matched = manager.match_tasks([name]) if any(c in name for c in "*?[") else []
        names += matched or [name]
    specs: list[Any] = []
    for name in dict.fromkeys(names):  # each once, in order
        if name in ours:
            specs.append(_bundled_config(name))
        elif name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            specs.append(name)
        else:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            problems.append(
                f"eval.tasks: unknown task {name!r}{hint}; {_LIST_TASKS} (`lm-eval ls tasks --include_path DIR` "
                f"with your own), this project's are {', '.join(ours)}, and eval.include_path names a folder of "
                "your own task YAML files"
            )
    if problems:
        raise ConfigError(problems)
    return specs


def _telechat_lm_class():
    import torch
    from lm_eval.models.huggingface import HFLM

    class TelechatLM(HFLM):
        """HFLM on a loaded TeleChat2 model (peft adapters applied or not) and the project's tokenizer."""

        def __init__(self, model, tokenizer, *, batch_size: int = 1):
            config = model.config
            super().__init__(
                pretrained=model,
                tokenizer=tokenizer,
                backend="causal",
                batch_size=batch_size,
                max_length=getattr(config, "training_seqlen", None),
                # the log-likelihoods in float32 whatever the model computes in (bf16's 8 bits of precision would
                # round each token's log-probability to about 0.03 and tie close choices)
                softmax_dtype=torch.float32,
            )

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            # the system prompt comes as the conversation's system message (run_tasks passes it as the harness's
            # system instruction); without one there is no system block: never the template's own fallback
            return self.tokenizer.apply_chat_template(
                chat_history,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
                default_system="",
            )

        def get_model_info(self) -> dict:
            # HFLM's asks the hub for the commit of `pretrained` (a name): ours is a model object, and offline
            model = self._model
            return {
                "model_num_parameters": sum(p.numel() for p in model.parameters()),
                "model_dtype": str(getattr(model, "dtype", "")),
            }

    return TelechatLM


def telechat_lm(model, tokenizer, batch_size: int = 1):
    """The harness's LM object for our model and tokenizer."""
    return _telechat_lm_class()(model, tokenizer, batch_size=batch_size)


class _DropNotOurs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _NOT_OURS)


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's INFO lines off unless its logger's level is set (what it loads and runs: the eval's report says
    it), its warnings listed in _NOT_OURS dropped, on every lm_eval logger (a filter is not inherited), and no
    `git describe` of the working directory printing "fatal: not a git repository"
    (private_apis.lm_eval_git_hash_from_files)."""
    import lm_eval.evaluator  # noqa: F401  (their loggers exist once their modules are imported)
    import lm_eval.models.huggingface  # noqa: F401

    from telechat_lab.private_apis import lm_eval_git_hash_from_files

    drop = _DropNotOurs()
    top = logging.getLogger("lm_eval")
    loggers = [top] + [
        logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith("lm_eval.")
    ]
    level = top.level
    if level == logging.NOTSET:  # not set by the user's logging config (hydra.job_logging.loggers.lm_eval.level)
        top.setLevel(logging.WARNING)
    for logger in loggers:
        logger.addFilter(drop)
    try:
        with lm_eval_git_hash_from_files():
            yield
    finally:
        top.setLevel(level)
        for logger in loggers:
            logger.removeFilter(drop)


def _metrics(values: dict) -> dict[str, float]:
    """lm-eval's `metric,filter` keys as `metric` (filter "none") or `metric,filter`; numbers only (a stderr it
    could not compute is "N/A")."""
    out = {}
    for key, value in values.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        out[metric if filter_name == "none" else key] = float(value)
    return out


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    *,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    system_prompt: str | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    include_path: str | None = None,
    log_samples: bool = False,
) -> dict:
    """Score `model` on harness `tasks`: {"results": {task or group: {metric: value}}, "table": the harness's
    results table (markdown), "num_docs": {task: documents scored}} and, with `log_samples`, "samples": the
    harness's per-document records (its arguments and responses), by task.

    `num_fewshot`: None keeps each task's own count (0 where it has none); a task that fixes 0 keeps 0.
    `system_prompt` is the chat template's system turn (None: TeleChat's default; "": none of its own); a plain
    prompt (no chat template) has no system turn, so it is not used there (a command can pass the run's own
    system prompt either way). A task's description (mmlu's "The following are multiple choice questions...")
    goes where lm-eval puts it: before a plain prompt, and with the chat template into the system turn, after the
    system prompt (so with "" a task with a description still has a system block: the description).
    `limit`: the first N documents of each task (for a quick look; not a score). The model is left in eval mode."""
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError([f"eval.num_fewshot: {num_fewshot} is negative (None keeps each task's own)"])
    if batch_size < 1:
        raise ConfigError([f"eval.batch_size: {batch_size} is below 1"])
    if limit is not None and limit < 1:
        raise ConfigError([f"eval.limit: {limit} is below 1 (None scores every document)"])
    specs = check_tasks(list(tasks), include_path)

    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table

    # the system turn of the chat template; a plain prompt has none (lm-eval would glue the text to the question)
    instruction = (DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt) if apply_chat_template else ""
    manager = _task_manager(str(Path(include_path).resolve()) if include_path else None)
    with _quiet_lm_eval():
        lm = telechat_lm(model, tokenizer, batch_size=batch_size)
        try:
            out = simple_evaluate(
                model=lm,
                tasks=specs,
                num_fewshot=num_fewshot,
                batch_size=batch_size,
                limit=limit,
                apply_chat_template=apply_chat_template,
                fewshot_as_multiturn=apply_chat_template,
                system_instruction=instruction or None,
                task_manager=manager,
                log_samples=log_samples,
            )
        except ValueError as err:  # lm-eval's own refusal of a task named twice (a group and one of its tasks)
            if str(err).startswith("Duplicate task "):
                raise ConfigError([f"eval.tasks: {err}: name either the group or its task"]) from err
            raise
        except ConnectionError as err:  # datasets': a hub dataset neither cached nor reachable (tasks load first)
            raise UserError(
                f"eval.tasks: {err}: a task's data is not in the Hugging Face cache and cannot be downloaded here. "
                "On a machine with network access, `lm-eval run --model dummy --tasks "
                f"{' '.join(t for t in tasks if t not in bundled_tasks())} --limit 1` downloads it (the dummy "
                "model needs no weights); copy the cache (~/.cache/huggingface, or $HF_HOME) here and set "
                "HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1"
            ) from err
    table = make_table(out)
    if out.get("groups"):
        table += "\n" + make_table(out, "groups")
    result = {
        "results": {name: _metrics(values) for name, values in out["results"].items()},
        "table": table,
        "num_docs": {name: int(n["effective"]) for name, n in out.get("n-samples", {}).items()},
    }
    if log_samples:
        result["samples"] = out.get("samples", {})
    return result

"""`telechat-lab eval`: what is evaluated (a run, an adapter, a merged export or a base model), on which examples,
where the results go; and a sweep's jobs evaluated into one table.

- `run_dir=RUN`: the run's final adapter (or, for full fine-tuning, its model) on its base, with the run's own
  settings (its config.yaml: the default system prompt and the template options); `eval.split=val` scores the
  run's validation split, rebuilt from its data settings and seed exactly as training split it. Scoring a dataset
  the run trained on warns.
- `adapter_path=A` / `model.path=M` (a merged export, a base): as chat applies them.
- `data.datasets=[...]` (`data.dataset_dir`): every example of those datasets of dataset_info.json.
- `eval.tasks=[...]`: lm-evaluation-harness tasks (eval/harness.py), run before the predictions (an unknown task
  stops the eval before anything is written).

Everything is checked before the model loads and before anything is written. The results go to `output_dir`
(default RUN/eval/<what>, or outputs/eval/<what>): eval.json (what was evaluated), predictions.jsonl, metrics.json.
A second eval of the same settings into the same directory continues the first (or, finished, scores it again); of
other settings it is refused unless overwrite=true.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from telechat_lab.errors import ConfigError, DataError, UserError

from .metrics import score
from .predict import PREDICTIONS, Example

RECORD, METRICS_FILE = "eval.json", "metrics.json"
OUR_FILES = (RECORD, PREDICTIONS, METRICS_FILE)


@dataclass
class Target:
    """What is evaluated."""

    base: Path
    adapters: list[Path]
    run_dir: Path | None = None
    run_config: DictConfig | None = None  # the run's config.yaml
    default_system: str | None = None  # None: TeleChat's default
    overrides: dict[str, str] = field(default_factory=dict)  # the run's command-line overrides (run.json)


def load_run(run_dir: str) -> tuple[Path, DictConfig]:
    """A training run's directory and its config.yaml; ConfigError when it is not a run."""
    from telechat_lab.training.rundir import CONFIG_FILE, RUN_RECORD

    path = Path(run_dir).expanduser().resolve()
    config = path / CONFIG_FILE
    if not path.is_dir() or not (path / RUN_RECORD).is_file() or not config.is_file():
        missing = "it does not exist" if not path.exists() else f"no {RUN_RECORD} and {CONFIG_FILE} there"
        raise ConfigError(f"run_dir={run_dir}: not a training run's output_dir ({missing})")
    try:
        recorded = OmegaConf.load(config)
    except Exception as err:  # noqa: BLE001 - a damaged file, named
        raise ConfigError(f"run_dir={run_dir}: {config} is not readable YAML ({err})") from None
    if not isinstance(recorded, DictConfig) or "data" not in recorded:
        raise ConfigError(f"run_dir={run_dir}: {config} is not a telechat-lab run's config (no data settings)")
    return path, recorded


def resolve_target(settings) -> Target:
    from telechat_lab.resolve import base_and_adapters
    from telechat_lab.trained_prompt import default_system_for
    from telechat_lab.training.sweep import _overrides

    if not settings.run_dir:
        base, adapters = base_and_adapters(settings.model.path, settings.adapter_path)
        return Target(base, adapters, default_system=default_system_for(adapters, settings.default_system, "eval"))
    if settings.adapter_path:
        raise ConfigError("run_dir and adapter_path name two models: give one (run_dir evaluates the run's adapter)")
    run, recorded = load_run(settings.run_dir)
    if (run / "adapter_config.json").is_file():
        base, adapters = base_and_adapters(settings.model.path, str(run))
    elif (run / "config.json").is_file():  # full / freeze fine-tuning: the run's directory is the model
        base, adapters = base_and_adapters(str(run), None)
    else:
        raise ConfigError(
            f"run_dir={settings.run_dir}: the run holds no final adapter or model (it has not finished; a "
            "checkpoint of it: adapter_path=RUN/checkpoint-N)"
        )
    default_system = default_system_for([run], settings.default_system, "eval")
    return Target(base, adapters, run, recorded, default_system, _overrides(run))


def data_settings(settings, target: Target):
    """The DataConfig the examples are built with: the run's (or the defaults), with eval's datasets."""
    from telechat_lab.config import DataConfig

    names = {f.name for f in dataclasses.fields(DataConfig)}
    base = DataConfig()
    if target.run_config is not None:
        recorded = OmegaConf.to_container(target.run_config.data, resolve=True)
        known = {k: v for k, v in recorded.items() if k in names}
        base = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), known))
    if settings.eval.split == "val":
        if settings.default_system is not None and settings.default_system != base.default_system:
            raise ConfigError(
                "eval.split=val scores the run's validation split with the prompts it trained with: "
                "default_system cannot change them (score data.datasets=[...] for another system prompt)"
            )
        return dataclasses.replace(base, cache_dir=settings.data.cache_dir or base.cache_dir)
    return dataclasses.replace(
        base,
        dataset_dir=settings.data.dataset_dir,
        datasets=settings.data.datasets,
        max_samples=settings.data.max_samples,
        cache_dir=settings.data.cache_dir,
        mix=None,
        val_size=0,
        cutoff_len=10**9,  # nothing truncated, no example dropped: the whole prompt and the whole reference
        default_system=target.default_system,
    )


def build_examples(settings, target: Target) -> tuple[list[Example], str]:
    """(the examples, what they are: "val" or the datasets' names)."""
    from telechat_lab.data.pipeline import build_datasets, dataset_names

    from .predict import examples_of

    data = data_settings(settings, target)
    if settings.eval.split == "val":
        if settings.data.datasets:
            raise ConfigError(
                "eval.split=val scores the run's validation split: data.datasets names other examples (give one)"
            )
        if target.run_dir is None:
            raise ConfigError("eval.split=val scores a run's validation split: give run_dir=RUN")
        kind = _run_data_kind(target)
        if OmegaConf.select(target.run_config, "data.streaming", default=False):
            raise ConfigError(
                f"run_dir={target.run_dir}: a data.streaming=true run validates on the head of its stream, which "
                "eval.split=val does not read; score data.datasets=[...] instead"
            )
        _, val, _ = build_datasets(data, target.base, kind=kind)
        if val is None:
            raise ConfigError(
                f"run_dir={target.run_dir}: the run has no validation split (data.val_size="
                f"{target.run_config.data.val_size}); score data.datasets=[...] instead"
            )
        return examples_of(val), "val"
    names = dataset_names(data)
    _warn_training_data(target, data, names)
    try:
        train, _, _ = build_datasets(data, target.base, shuffle_order=False, sample=False)
    except DataError as err:
        raise DataError(f"eval: data.datasets={names}: {err}") from None
    return examples_of(train), "-".join(names)


def _run_data_kind(target: Target) -> str:
    """The kind of data the run trained on (its stage's): its validation split is scored against the replies of
    conversations (sft), the chosen replies of pairs (dpo) or the desirable replies (kto); raw text has none."""
    from telechat_lab.stages import stage_of

    name = OmegaConf.select(target.run_config, "stage.name", default="sft") or "sft"
    kind = stage_of(name).data
    if kind == "pt":
        raise ConfigError(
            f"eval.split=val: run_dir={target.run_dir} is a stage=pt run: its validation split is raw text, with no "
            "reply to score; score data.datasets=[...] (conversations) instead"
        )
    return kind


def _warn_training_data(target: Target, data, names: list[str]) -> None:
    from telechat_lab.config import DataConfig
    from telechat_lab.data.pipeline import dataset_names, resolved_dataset_dir

    if target.run_config is None:
        return
    run_data = target.run_config.data
    if resolved_dataset_dir(run_data.dataset_dir) != resolved_dataset_dir(data.dataset_dir):
        return
    trained = set(dataset_names(DataConfig(datasets=OmegaConf.to_container(run_data, resolve=True)["datasets"])))
    for name in names:
        if name in trained:
            print(
                f"eval: warning: scoring on {target.run_dir.name}'s training split: the run trained on dataset "
                f"'{name}' (data.datasets in {target.run_dir / 'config.yaml'}); its held-out examples: "
                "eval.split=val",
                file=sys.stderr,
                flush=True,
            )


# ------------------------------------------------------------------------------------------------ output


def output_dir(settings, target: Target, what: str) -> Path:
    if settings.output_dir:
        return Path(settings.output_dir).expanduser().resolve()
    root = target.run_dir / "eval" if target.run_dir is not None else Path("outputs") / "eval"
    return (root / what).resolve()


def check_output(out: Path, record: dict, overwrite: bool) -> bool:
    """Whether `out` continues an eval of the same `record`; ConfigError when it holds something else. Nothing
    is written here."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise ConfigError(f"output_dir={out}: is a file")
    found = out / RECORD
    if not found.is_file():
        if any(out.iterdir()):
            raise ConfigError(f"output_dir={out}: holds files that are not an eval's; choose another output_dir")
        return False
    try:
        earlier = json.loads(found.read_text())
    except ValueError:
        earlier = None
    if earlier == record:
        return True
    if overwrite:
        return False
    changed = sorted(k for k in record if not isinstance(earlier, dict) or earlier.get(k) != record[k])
    raise ConfigError(
        f"output_dir={out}: holds an eval of other settings ({', '.join(changed)} differ); set "
        "overwrite=true to replace it, or choose another output_dir"
    )


def _start(out: Path, record: dict, resuming: bool) -> None:
    from telechat_lab.files import write_json

    out.mkdir(parents=True, exist_ok=True)
    if not resuming:
        for name in OUR_FILES:
            (out / name).unlink(missing_ok=True)
        write_json(out / RECORD, record)


# ------------------------------------------------------------------------------------------------ the command


def make_engine(settings, target: Target):
    from telechat_lab.chat.engines import HuggingFaceEngine, VLLMEngine

    if settings.engine == "vllm":
        return VLLMEngine(target.base, target.adapters, **dataclasses.asdict(settings.vllm))
    return HuggingFaceEngine(
        target.base, target.adapters, settings.model.dtype, settings.model.attn_implementation, settings.device
    )


def run_eval(settings) -> dict:
    """Evaluate; {"output_dir", "metrics", "overrides"} (a sweep_dir: every job's, and the summary table)."""
    if settings.sweep_dir:
        return evaluate_sweep(settings)
    if settings.eval.tasks:  # before any model or data is loaded: an unknown task, engine=vllm
        if settings.engine == "vllm":
            raise ConfigError(
                "eval.tasks with engine=vllm: lm-evaluation-harness tasks score with the HF model "
                "(engine=huggingface); run the generation metrics with vllm in a separate eval"
            )
        from .harness import check_tasks

        check_tasks(list(settings.eval.tasks), settings.eval.include_path)
    target = resolve_target(settings)
    examples, what = [], "tasks"
    if settings.data.datasets or settings.eval.split == "val":
        examples, what = build_examples(settings, target)
        if not examples:
            raise ConfigError(f"eval: {what} holds no example to score")
        examples, left_out = fitting(examples, model_length(settings, target) - settings.generation.max_new_tokens)
    elif not settings.eval.tasks:
        raise ConfigError(
            "eval: nothing to evaluate: name data.datasets=[...], or eval.split=val with run_dir=RUN, "
            "or eval.tasks=[...]"
        )
    else:
        left_out = 0
    from .predict import fingerprint

    generation = dataclasses.asdict(settings.generation)
    record = {
        "base": str(target.base),
        "adapters": [str(a) for a in target.adapters],
        "default_system": target.default_system,
        "engine": settings.engine,
        "examples": fingerprint(examples),
        "count": len(examples),
        "what": what,
        "generation": generation,
        "tasks": list(settings.eval.tasks),
    }
    out = output_dir(settings, target, what)
    resuming = check_output(out, record, settings.overwrite)
    from .predict import read_done

    done = read_done(out / PREDICTIONS, examples) if resuming else []
    metrics: dict = {}
    if settings.eval.tasks or len(done) < len(examples):
        engine = make_engine(settings, target)
        if settings.eval.tasks:  # first: an unknown task stops the eval before anything is written
            metrics["tasks"] = _run_tasks(settings, engine, target)
        _start(out, record, resuming)
        if examples:
            metrics.update(_predict(settings, engine, examples, out, generation, done))
    else:
        print(f"eval: all {len(examples)} examples are predicted in {out / PREDICTIONS}: scoring them", flush=True)
        metrics.update(score(done))
    if left_out:
        metrics["left_out_too_long"] = left_out
    from telechat_lab.files import write_json

    write_json(out / METRICS_FILE, metrics)
    _report(metrics, out)
    return {"output_dir": str(out), "metrics": metrics, "overrides": target.overrides, "run_dir": target.run_dir}


def model_length(settings, target: Target) -> int:
    """The longest sequence the model takes (prompt and reply): vllm.max_model_len, else its training_seqlen."""
    if settings.engine == "vllm" and settings.vllm.max_model_len:
        return settings.vllm.max_model_len
    config = json.loads((target.base / "config.json").read_text())
    return int(config.get("training_seqlen") or 8192)


def fitting(examples: list[Example], room: int) -> tuple[list[Example], int]:
    """The examples whose prompt leaves generation.max_new_tokens within the model's length (numbered again), and
    how many are left out (said, with the first of them)."""
    kept = [ex for ex in examples if len(ex.prompt_ids) <= room]
    if len(kept) < len(examples):
        first = next(ex for ex in examples if len(ex.prompt_ids) > room)
        said = (
            f"{len(examples) - len(kept)} of {len(examples)} prompts are longer than the {room} tokens the model "
            f"takes before generation.max_new_tokens (the first: {first.source}, {len(first.prompt_ids)} tokens)"
        )
        if not kept:
            raise ConfigError(f"eval: every prompt is too long: {said}")
        print(f"eval: {said}: left out", file=sys.stderr, flush=True)
    return [dataclasses.replace(ex, index=i) for i, ex in enumerate(kept)], len(examples) - len(kept)


def _run_tasks(settings, engine, target: Target) -> dict:
    from .harness import run_tasks

    # the chat template's system prompt: eval.system_prompt, else the one the run trained with (None: TeleChat's)
    system = settings.eval.system_prompt if settings.eval.system_prompt is not None else target.default_system

    found = run_tasks(
        engine.model,
        engine.tokenizer,
        list(settings.eval.tasks),
        num_fewshot=settings.eval.num_fewshot,
        apply_chat_template=settings.eval.apply_chat_template,
        system_prompt=system,
        batch_size=settings.eval.batch_size,
        limit=settings.eval.limit,
        include_path=settings.eval.include_path,
    )
    print(found["table"], flush=True)
    return found["results"]


def _predict(settings, engine, examples, out: Path, generation: dict, done: list[dict]) -> dict:
    from .predict import generate_hf, generate_vllm, predict

    generate = (
        (lambda prompts, gen: generate_vllm(engine, prompts, gen))
        if settings.engine == "vllm"
        else (lambda prompts, gen: generate_hf(engine, prompts, gen))
    )
    try:
        rows = predict(
            generate, engine.tokenizer, examples, out / PREDICTIONS, settings.eval.batch_size, generation, done
        )
    except KeyboardInterrupt:
        import signal

        from telechat_lab.errors import Interrupted

        kept = sum(1 for _ in open(out / PREDICTIONS, "rb"))
        raise Interrupted(
            f"eval: interrupted (Ctrl+C): {kept} of {len(examples)} predicted in {out / PREDICTIONS}; the same "
            "command continues from there",
            signal.SIGINT,
        ) from None
    return score(rows)


def _report(metrics: dict, out: Path) -> None:
    from .metrics import format_metrics

    lines = []
    if "examples" in metrics:
        lines.append(format_metrics(metrics))
    lines.append(f"predictions: {out / PREDICTIONS}" if "examples" in metrics else "")
    lines.append(f"metrics:     {out / METRICS_FILE}")
    print("\n".join(line for line in lines if line), flush=True)


# ------------------------------------------------------------------------------------------------ sweeps


SUMMARY_METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match", "gen_len", "examples")


def flat_metrics(metrics: dict) -> dict:
    """metrics.json's values for a table: the generation metrics, and each task's as task/metric."""
    flat = {k: v for k, v in metrics.items() if k != "tasks"}
    for task, values in (metrics.get("tasks") or {}).items():
        for name, value in values.items():
            if isinstance(value, (int, float)):
                flat[f"{task}/{name}"] = value
    return flat


def summary_columns(rows: list[dict]) -> list[str]:
    found = list(dict.fromkeys(k for row in rows for k in row if "/" in k))
    return [m for m in SUMMARY_METRICS if any(m in row for row in rows)] + found + ["status"]


def evaluate_sweep(settings) -> dict:
    """Every job of the training sweep in sweep_dir (each into its own RUN/eval/<what>), and
    sweep_dir/eval_summary_<what>.csv/.md: one row per job, best marked."""
    from telechat_lab.training.sweep import write_table

    if settings.run_dir or settings.adapter_path:
        raise ConfigError("sweep_dir evaluates every job of a sweep: give it without run_dir or adapter_path")
    sweep = Path(settings.sweep_dir).expanduser().resolve()
    jobs = sorted(
        (p for p in sweep.iterdir() if p.is_dir() and (p / "run.json").is_file()) if sweep.is_dir() else [],
        key=lambda p: (len(p.name), p.name),
    )
    if not jobs:
        raise ConfigError(f"sweep_dir={settings.sweep_dir}: no job of a training sweep there (no N/run.json)")
    rows, what = [], None
    for job in jobs:
        print(f"\neval: job {job.name} ({job})", flush=True)
        try:
            result = run_eval(dataclasses.replace(settings, sweep_dir=None, run_dir=str(job), output_dir=None))
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            from telechat_lab.training.sweep import _overrides

            rows.append({"job": job.name, "overrides": _overrides(job), "status": "failed"})
            continue
        what = what or Path(result["output_dir"]).name
        rows.append(job_row(job.name, result))
    name = f"eval_summary_{what or 'failed'}"
    metric = settings.eval.summary_metric
    table, _, text = write_table(sweep, rows, metric, "maximize", summary_columns(rows), name)
    print(text, flush=True)
    return {"summary": str(sweep / f"{name}.md"), "table": table}


def job_row(job: str, result: dict, extra_overrides: dict | None = None) -> dict:
    return {
        "job": job,
        "overrides": {**result["overrides"], **(extra_overrides or {})},
        **flat_metrics(result["metrics"]),
        "status": "completed",
        "output_dir": result["output_dir"],
    }


JOB_RECORD = "eval_job.json"  # a job of `eval -m`: its row of the sweep's summary, in its Hydra job directory


def record_job(result: dict | None) -> None:
    """In a job of `eval -m`: its row (the run's overrides with this job's own, but run_dir, which has a column of
    its own) where the sweep's summary finds it; `result` None: the job failed."""
    from hydra.core.hydra_config import HydraConfig

    from telechat_lab.files import write_json

    hc = HydraConfig.get()
    own = dict(o.lstrip("+~").split("=", 1) for o in hc.overrides.task if "=" in o)
    run_dir = own.pop("run_dir", "")
    job = str(hc.job.num)
    if result is None:
        row = {"job": job, "overrides": own, "status": "failed"}
    else:
        row = job_row(job, result, own)
    row["run_dir"] = str(Path(run_dir).expanduser().resolve()) if run_dir else ""
    write_json(Path(hc.runtime.output_dir) / JOB_RECORD, row)


class EvalSweepSummary(Callback):
    """A Hydra callback of `eval -m`: summary.csv / summary.md in the sweep's directory, one row per job (a
    column per swept setting of the runs and of the evals, the metrics), sorted by eval.summary_metric, best
    first and marked."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from telechat_lab.training.sweep import write_table

        sweep = Path(config.hydra.sweep.dir)
        rows = []
        for job in sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
            found = job / JOB_RECORD
            if found.is_file():
                rows.append(json.loads(found.read_text()))
            else:
                rows.append({"job": job.name, "overrides": {}, "status": "failed"})
        if not rows:
            return
        for row in rows:
            if row.get("run_dir"):
                row["overrides"] = {"run_dir": row["run_dir"], **row["overrides"]}
        metric = OmegaConf.select(config, "eval.summary_metric", default="rouge-l")
        _, _, text = write_table(sweep, rows, metric, "maximize", summary_columns(rows))
        print(text, flush=True)
        failed = [row["job"] for row in rows if row.get("status") == "failed"]
        if failed:
            print(f"{len(failed)} of {len(rows)} jobs failed: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)

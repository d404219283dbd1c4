"""A run's loggers: made from the config (`make_loggers`: a resumed run's CSV logs in a folder of their own, a
wandb run named for the job), closed after it (`finish_loggers`). `StepCSVLogger` is Lightning's CSVLogger with
one row per step: Lightning logs a step's training metrics, its validation metrics and what callbacks log as
separate calls, which CSVLogger writes as separate rows; here the calls of one step fill one row, written once the
step is over (or at the end)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from telechat_lab.hydra_runtime import sweep_dir, swept_keys
from telechat_lab.private_apis import add_prefix, experiment_started, logger_prefix, wandb_init_settings
from telechat_lab.targets import targets

from .process import launched_worker

NOT_IN_NAMES = ("hydra", "output_dir", "resume", "overwrite", "logger", "data.cache_dir", "trainer.enable_progress_bar")


def make_loggers(
    configs: list[dict], *, resumed: bool, overrides: list[str], task_name: str, output_dir: Path
) -> list[Logger]:
    """The loggers of `configs` (the logger group's entries); a resumed run keeps the interrupted run's CSV logs
    (the resumed part goes to logs/resumed-*); a wandb logger gets the job's name, group and run id."""
    import hydra

    if resumed:
        configs = [{**c, "version": _resumed_version(c)} if targets(c, CSVLogger) else c for c in configs]
    loggers = [
        hydra.utils.instantiate(wandb_settings(c, overrides, task_name, output_dir) if targets(c, WandbLogger) else c)
        for c in configs
    ]
    for logger in loggers:  # Lightning passes wandb an `anonymous` setting that wandb >= 0.19 warns has no effect
        wandb_init_settings(logger).pop("anonymous", None)
    return loggers


def wandb_settings(config: dict, overrides: list[str], task_name: str, output_dir: Path) -> dict:
    """A WandbLogger's settings for this job: a short name (the job's own overrides), the sweep as its group, and
    the run's wandb id (kept in run.json: resume=true continues the same wandb run)."""
    from .rundir import read_run_record, write_json_record

    config = dict(config)
    if not config.get("name"):
        own = [o.lstrip("+~") for o in overrides if not o.lstrip("+~").startswith(NOT_IN_NAMES)]
        swept = swept_keys()
        if swept:  # a sweep's job: what it sweeps is what tells it from its siblings
            own = [o for o in own if o.split("=", 1)[0] in swept]
        config["name"] = " ".join(own) or task_name
    if not config.get("group"):
        sweep = sweep_dir()
        config["group"] = f"{task_name}-{sweep.name}" if sweep else None
    record = read_run_record(output_dir)
    if not record.get("wandb_id"):
        import uuid

        record["wandb_id"] = uuid.uuid4().hex[:12]  # any [a-z0-9] string is a valid wandb run id
        if not launched_worker():
            write_json_record(output_dir, record)
    config.update(id=record["wandb_id"], resume="allow")
    return config


def _resumed_version(csv: dict) -> str:
    """A new folder for a resumed run's CSV logs, never one that exists (Lightning's CSVLogger deletes what it finds
    there): `resumed-<time>`, or with `-2`, `-3`, ... for resumes within one second."""
    stamp = datetime.now().strftime("resumed-%Y%m%d-%H%M%S")
    parent = Path(str(csv.get("save_dir", "."))) / str(csv.get("name") or "")
    version, n = stamp, 1
    while (parent / version).exists():
        n += 1
        version = f"{stamp}-{n}"
    return version


def finish_loggers(loggers: list[Logger]) -> None:
    """Close the job's wandb run: the next job of a sweep (in this same process) starts a run of its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and experiment_started(logger):
            logger.experiment.finish()


class StepCSVLogger(CSVLogger):
    # CSVLogger's own arguments, spelt out: the config check binds a logger's settings to this signature
    def __init__(
        self,
        save_dir: str | Path,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(save_dir, name, version, prefix, flush_logs_every_n_steps)
        self.flush_every = flush_logs_every_n_steps

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        experiment = self.experiment
        rows = experiment.metrics
        if step is None:
            step = len(rows)
        if rows and rows[-1]["step"] != step and len(rows) >= self.flush_every:
            CSVLogger.save(self)  # every row held is of a finished step
        experiment.log_metrics(add_prefix(metrics, logger_prefix(self), self.LOGGER_JOIN_CHAR), step)
        rows = experiment.metrics
        if len(rows) > 1 and rows[-2]["step"] == step:
            rows[-2].update(rows.pop())

    @rank_zero_only
    def save(self) -> None:
        """Write every row but the current step's, which may still grow (Lightning saves after each batch)."""
        rows = self.experiment.metrics
        if len(rows) > 1:
            current = rows.pop()
            CSVLogger.save(self)
            self.experiment.metrics.append(current)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if experiment_started(self):
            CSVLogger.save(self)

"""Loggers. `StepCSVLogger` is Lightning's CSVLogger with one row per step: Lightning logs a step's training
metrics, its validation metrics and what callbacks log as separate calls, which CSVLogger writes as separate
rows; here the calls of one step fill one row, written once the step is over (or at the end)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from telechat_lab.private_apis import add_prefix, experiment_started, logger_prefix


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

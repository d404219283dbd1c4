"""Loggers. `StepCSVLogger` is Lightning's CSVLogger with one row per step: Lightning logs a step's training
metrics, its validation metrics and what callbacks log as separate calls, which CSVLogger writes as separate
rows; here the calls of one step fill one row, written once the step is over (or at the end)."""

from __future__ import annotations

from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only


class StepCSVLogger(CSVLogger):
    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        experiment = self.experiment
        rows = experiment.metrics
        if step is None:
            step = len(rows)
        if rows and rows[-1]["step"] != step and len(rows) >= self._flush_logs_every_n_steps:
            CSVLogger.save(self)  # every row held is of a finished step
        experiment.log_metrics(_add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR), step)
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
        if self._experiment is not None:
            CSVLogger.save(self)

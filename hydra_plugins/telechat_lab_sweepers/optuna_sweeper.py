"""An Optuna sweeper for Hydra, on current Optuna (`hydra/sweeper=telechat_optuna`, conf/hparams_search/).

hydra-optuna-sweeper pins optuna<3, whose persistent storage fails on SQLAlchemy 2: this one asks Optuna for
`n_jobs` trials at a time, runs them through Hydra's launcher (one after the other, or in parallel with the
joblib or submitit launcher), and tells Optuna each result. Only this process touches the study, so a SQLite
file (`storage: sqlite:///study.db`) or a journal file (`storage: journal:study.log`) is safe; several sweeps on
one study need a server database or the journal file. A study that exists in the storage is continued:
`n_trials` is its total, so running the same command again finishes an interrupted search.

Search space (sweeper.params or the command line): `choice(a, b)`, `range(lo, hi[, step])`,
`interval(lo, hi)`, `tag(log, interval(lo, hi))`; a plain value is fixed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def distribution(override) -> Any:
    """An Optuna distribution for a sweep override, or its value (a string) when it is fixed."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep():
        return CategoricalDistribution(
            [str(v) if not isinstance(v, (int, float, bool)) else v for v in override.sweep_iterator()]
        )
    log_scale = "log" in value.tags
    if override.is_range_sweep():
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop - value.step, step=value.step)
        return IntDistribution(int(value.start), int(value.stop) - int(value.step), step=int(value.step))
    if override.is_interval_sweep():
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"{override.input_line}: not a search space Optuna can sample (choice, range, interval)")


def open_storage(storage: str | None):
    """None: in memory; `journal:PATH`: a journal file (safe with several processes); else a database URL."""
    if storage and storage.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(storage.removeprefix("journal:")))
    return storage


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        study_name: str | None,
        storage: str | None,
        direction: str,
        n_trials: int,
        n_jobs: int,
        sampler: Any,
        params: dict | None = None,
        max_failure_rate: float = 0.0,
    ):
        self.study_name, self.storage, self.direction = study_name, storage, direction
        self.n_trials, self.n_jobs, self.max_failure_rate = n_trials, n_jobs, max_failure_rate
        self.sampler, self.params = sampler, dict(params or {})
        self.config: DictConfig | None = None
        self.launcher = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # this sweeper logs what matters itself
        lines = [f"{key}={value}" for key, value in self.params.items()] + list(arguments)
        space, fixed = {}, []
        for override in OverridesParser.create().parse_overrides(lines):
            found = distribution(override)
            if isinstance(found, str):
                fixed.append(f"{override.get_key_element()}={found}")
            else:
                space[override.get_key_element()] = found
        # Hydra instantiated the sampler (the sweeper's config is instantiated recursively)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=open_storage(self.storage),
            sampler=self.sampler,
            direction=self.direction,
            load_if_exists=True,
        )
        finished = [t for t in study.trials if t.state.is_finished()]
        if finished and hasattr(self.sampler, "reseed_rng"):
            self.sampler.reseed_rng()  # a seeded sampler would draw the points it drew before the restart again
        log.info(
            "study %s: %d of %d trials done, searching %s",
            study.study_name,
            len(finished),
            self.n_trials,
            ", ".join(space) or "nothing",
        )
        remaining = self.n_trials - len(finished)
        while remaining > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, remaining))]
            batch = [fixed + [f"{name}={value}" for name, value in trial.params.items()] for trial in trials]
            self.validate_batch_is_legal(batch)
            returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            failures = 0
            for trial, ret in zip(trials, returns):
                try:
                    value = float(ret.return_value)  # raises the job's own error when it failed
                except Exception as err:  # a failed job, or one that returned no metric
                    log.warning("trial %d failed: %s", trial.number, err)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    failures += 1
                else:
                    study.tell(trial, value)
            if failures / len(returns) > self.max_failure_rate and failures == len(returns):
                raise RuntimeError(f"every trial of the last batch failed ({failures}); see their logs")
            remaining -= len(trials)
        self._write_results(study)

    def _write_results(self, study) -> None:
        completed = [t for t in study.trials if t.state.name == "COMPLETE"]
        if not completed:
            return
        best = study.best_trial
        results = {
            "name": "optuna",
            "study_name": study.study_name,
            "best_params": best.params,
            "best_value": best.value,
            "trials": len(study.trials),
            "completed": len(completed),
        }
        directory = Path(self.config.hydra.sweep.dir)
        directory.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), directory / "optimization_results.yaml")
        log.info("best %s = %s with %s", self.direction, best.value, best.params)

"""One training run from a composed config, in four steps: prepare (validate, claim the output directory, what a
resume continues), build (data, model, loggers, callbacks, trainer), fit, report (the final metrics, written
once, here); `train` runs them. Who owns the output directory: run_dir_owner; the loggers: loggers; who this
process is (a launched rank, a SLURM requeue): process; what Hydra's runtime says: telechat_lab.hydra_runtime."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from telechat_lab.adapter_kinds import adapter_kind
from telechat_lab.config import TrainConfig, config_values, validate
from telechat_lab.errors import ConfigError, Interrupted, OutputDirError
from telechat_lab.hydra_runtime import hydra_overrides

from .process import OUTPUT_ENV, launched_worker, requeued_by_slurm, resume_command
from .run_dir_owner import RunDir, owned, resolve_output_dir, undo_unstarted


@dataclass
class Run:
    """A prepared run: its settings and where everything is. The settings come three ways, each for its readers:
    `settings` typed (the code that builds the run), `values` plain and resolved (the run's identity, the
    checkpoints' trainer limits), `recorded` as written to config.yaml and logged (a setting from the environment
    left unresolved, so that no secret is copied into the run's files)."""

    settings: TrainConfig
    values: dict
    output_dir: Path
    model_dir: Path
    run_id: str
    checkpoint: Path | None = None  # what a resume continues from
    overrides: list[str] = field(default_factory=list)  # the command line's, for names (wandb, sweeps)
    recorded: dict | None = None  # default: `values`
    finished: dict | None = None  # resume=true of a run with nothing left to train: its final metrics
    owner: RunDir | None = None  # the output directory's claim (None in a launched rank)

    def __post_init__(self):
        self.recorded = self.values if self.recorded is None else self.recorded


@dataclass
class Built:
    """What `build` makes of a run: the parts `fit` trains and `report` reads."""

    datamodule: Any  # TelechatDataModule
    module: Any  # TelechatLitModule
    trainer: Any  # lightning.Trainer
    loggers: list
    checkpoints: Any  # RunCheckpoints
    plot: Any  # LossPlot


def _resolved_group(cfg: DictConfig | dict, key: str) -> Any:
    """A logger / callbacks group resolved (its interpolations may name the Hydra job)."""
    node = cfg.get(key)
    if node is None or isinstance(cfg, dict):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception as err:
        raise ConfigError([f"{key}: does not resolve ({err})"]) from err


def _run_values(cfg: DictConfig | dict, groups: bool = True) -> tuple[dict, Path, Path, Path]:
    """(values, output_dir, model_dir, data_dir): the settings as plain values, with the run's own directory and
    the model's and dataset's absolute (recorded so, a resume from another directory finds the same files); the
    logger and callbacks groups resolved (`groups`: under Hydra, whose job they may name)."""
    from telechat_lab.data.pipeline import resolved_dataset_dir
    from telechat_lab.resolve import model_dir as resolve_model_dir

    values = config_values(cfg)
    output_dir = resolve_output_dir(values["output_dir"])
    if isinstance(cfg, DictConfig):  # loggers write under the run's own directory (a sweep job's, ...)
        cfg = cfg.copy()
        OmegaConf.update(cfg, "output_dir", str(output_dir), force_add=True)
    for key in ("logger", "callbacks") if groups else ():
        values[key] = _resolved_group(cfg, key)
    model_dir = resolve_model_dir(values["model"]["path"])
    if values["model"]["path"]:
        values["model"]["path"] = str(model_dir)
    data_dir = resolved_dataset_dir(values["data"]["dataset_dir"])
    values["data"]["dataset_dir"] = str(data_dir)
    values["output_dir"] = str(output_dir)
    return values, output_dir, model_dir, data_dir


def prepare(cfg: DictConfig | dict, overrides: list[str] | None = None, validated: bool = False) -> Run:
    """Validate (once: unless the caller did, `validated`; for resume=true the run's own settings with this
    command's changes, unless the command line's step did, `before_hydra`); claim the output directory (nothing
    the user has is overwritten; checked once: a claim this process holds is reused); for resume=true, the run's
    own settings and its newest valid checkpoint; write config.yaml and run.json."""
    from telechat_lab.resolve import model_dir as resolve_model_dir

    from .checkpoints import newest_checkpoint
    from .rundir import CONFIG_FILE, recorded_values, resolved_values, resumed_settings, run_id, write_run_record

    overrides = hydra_overrides() if overrides is None else list(overrides)
    if not validated and cfg.get("resume") is not True:  # a resume runs the run's own settings: validated below
        validate(cfg)  # every problem at once, before anything is loaded or written
    values, output_dir, model_dir, data_dir = _run_values(cfg)
    owner = None
    if not launched_worker():  # from here on the directory is this process's (a launched rank only reads it)
        protected = {"model.path": model_dir, "data.dataset_dir": data_dir}
        requeued = run_id(values) if requeued_by_slurm() else None
        owner = RunDir.claim(
            output_dir, protected, resume=values["resume"], overwrite=values["overwrite"], run_id=requeued
        )
        values["resume"] = owner.resume
    resume = bool(values["resume"])
    recorded = recorded_values(values, _unresolved(cfg))
    if resume:
        checked = owner is not None and owner.settings_checked
        recorded = resumed_settings(output_dir, recorded, overrides, None if checked else _validate_resumed(output_dir))
        values = resolved_values(recorded, output_dir / CONFIG_FILE)
        values["resume"] = True
        model_dir = resolve_model_dir(values["model"]["path"])  # the run's own model, not the command's default
    run = Run(
        settings_of(values), values, output_dir, model_dir, run_id(values), None, overrides, recorded, owner=owner
    )
    if resume:
        run.checkpoint = newest_checkpoint(output_dir / "checkpoints", run.run_id)
        if run.checkpoint is None:
            raise OutputDirError(
                f"resume=true: no readable checkpoint in {output_dir / 'checkpoints'} (the run "
                "stopped before its first one); start it again with overwrite=true"
            )
        run.finished = finished_metrics(output_dir, values, run.checkpoint)
        if run.finished is not None:  # nothing to train: nothing is loaded or written
            return run
    if owner is not None:
        owner.set_aside()
        _write_settings(output_dir, recorded)
        if not resume:
            write_run_record(output_dir, values, overrides)
    os.environ[OUTPUT_ENV] = str(output_dir)
    return run


def _validate_resumed(output_dir: Path):
    """The check of a resumed run's settings (the run's own, with every change the command asks for): all their
    problems at once, as a config of its own."""
    from .rundir import CONFIG_FILE, resolved_values

    def check(settings: dict) -> None:
        validate(resolved_values(settings, output_dir / CONFIG_FILE))

    return check


def before_hydra(cfg: DictConfig | None, argv: list[str]) -> None:
    """`train`'s step after the command line's config check, before Hydra starts (and writes `.hydra/` and
    `train.log` into the output directory): claim the run directory (run_dir_owner), and for resume=true validate
    the run's own settings with this command's changes (the config check leaves them: a resume runs those, not the
    command's config), so that prepare() checks neither again. A problem is printed and exits 2."""
    from telechat_lab.config.command_line import config_source
    from telechat_lab.errors import reported

    from .run_dir_owner import claim_for_command_line
    from .rundir import recorded_values, resumed_settings

    owner = claim_for_command_line(cfg, argv)
    if owner is None or not owner.resume:
        return
    try:
        with reported():
            values, output_dir, _, _ = _run_values(cfg, groups=False)
            given = recorded_values(values, _unresolved(cfg))
            resumed_settings(output_dir, given, config_source(argv, "", "train")[2], _validate_resumed(output_dir))
    except BaseException:  # refused (reported() exits): the directory as it was, not even the lock's record changed
        owner.undo()
        owner.release()
        raise
    owner.settings_checked = True


def _unresolved(cfg: DictConfig | dict) -> dict:
    if isinstance(cfg, dict):
        return cfg
    return {key: value for key, value in OmegaConf.to_container(cfg, resolve=False).items() if key != "hydra"}


def settings_of(values: dict) -> TrainConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), values))


def finished_metrics(output_dir: Path, values: dict, checkpoint: Path) -> dict | None:
    """The final metrics of a run whose newest checkpoint was written at its last step and that completed,
    resumed with the same trainer settings (max_steps, max_epochs, ...): there is nothing left to train. None when
    it has more to do (a run stopped early by a callback, or given higher limits)."""
    from telechat_lab.files import read_json

    from .checkpoints import ended_its_run

    path = output_dir / "final_metrics.json"
    metrics = read_json(path, "the run's final metrics") if path.is_file() else {}
    if metrics.get("status") != "completed" or not ended_its_run(checkpoint, values["trainer"]):
        return None
    return metrics


def _write_settings(output_dir: Path, values: dict) -> None:
    from telechat_lab.files import atomic_write_text

    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(values)))


def build(run: Run) -> Built:
    """The data module, the LightningModule, the loggers, callbacks and the Trainer."""
    import hydra
    import lightning as L

    from telechat_lab.console import quiet_lightning
    from telechat_lab.stages import stage_of

    from .callbacks import DiscardReplacedRun, LossPlot, SpeedAndMemory, StepsProgressBar
    from .checkpoints import RunCheckpoints
    from .datamodule import TelechatDataModule
    from .loggers import make_loggers
    from .module import TelechatLitModule
    from .rundir import REPLACED
    from .strategy import trainer_arguments

    quiet_lightning()
    s = run.settings
    L.seed_everything(s.seed, workers=True, verbose=False)
    datamodule = TelechatDataModule(s.data, run.model_dir, kind=stage_of(s.stage.name).data)  # the data it reads
    packed = bool(s.data.packing or s.data.padding_free)
    module = TelechatLitModule(
        run.model_dir, s.model, s.adapter, s.optim, s.nan_policy, s.nan_max_skips, packed, stage=s.stage
    )
    loggers = make_loggers(
        [v for v in (s.logger or {}).values() if v is not None],
        resumed=run.checkpoint is not None,
        overrides=run.overrides,
        task_name=s.task_name,
        output_dir=run.output_dir,
    )
    for logger in loggers:
        logger.log_hyperparams(run.recorded)
    checkpoints = RunCheckpoints(
        run.output_dir,
        run.model_dir,
        run.run_id,
        s.save_steps,
        s.save_total_limit,
        OmegaConf.to_yaml(OmegaConf.create(run.recorded)),
    )
    plot = LossPlot(run.output_dir, s.plot_loss)
    callbacks = [hydra.utils.instantiate(v) for v in (s.callbacks or {}).values() if v is not None]
    # the checkpoints last: what they save includes the other callbacks' record of the step just finished
    callbacks += [
        SpeedAndMemory(s.logging_steps, s.hardware.peak_tflops, s.model.gradient_checkpointing),
        plot,
        checkpoints,
    ]
    if s.trainer.get("enable_progress_bar", True):
        callbacks.append(StepsProgressBar())
    if (run.output_dir / REPLACED).exists():
        callbacks.append(DiscardReplacedRun(run.output_dir))
    trainer_args = dict(s.trainer)
    if not s.data.val_size:  # no validation split: say so to Lightning (which otherwise warns of an empty loader)
        trainer_args.setdefault("limit_val_batches", 0)
    hardware = trainer_arguments(s.hardware, exclude_frozen=not adapter_kind(s.adapter.type).trains_whole_base)
    trainer = L.Trainer(
        **trainer_args,
        **hardware,
        logger=loggers,
        callbacks=callbacks,
        log_every_n_steps=s.logging_steps,
        default_root_dir=str(run.output_dir),
        enable_checkpointing=False,  # RunCheckpoints writes them (atomically, pruned)
        use_distributed_sampler=False,
    )  # the data module shards (resumably) itself
    return Built(datamodule, module, trainer, loggers, checkpoints, plot)


def fit(run: Run, built: Built) -> None:
    """Train; then, for a completed run whose last validation is older than its last step, validate once more."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    trainer, module, datamodule, plot = built.trainer, built.module, built.datamodule, built.plot
    checkpoint = str(run.checkpoint) if run.checkpoint else None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)  # never runs code in it
    except MisconfigurationException as err:  # Lightning's word on the trainer settings: the user's to fix
        raise ConfigError([f"trainer: {err}"]) from err
    if built.checkpoints.stop_signal is not None:
        return
    if checkpoint is None and trainer.global_step == 0:  # what it wrote goes again (train's undo)
        limits = {key: run.settings.trainer.get(key) for key in ("max_epochs", "max_steps", "limit_train_batches")}
        given = ", ".join(f"trainer.{key}={value}" for key, value in limits.items() if value is not None)
        raise ConfigError(
            f"no training step ran ({given}; data.batch_size={run.settings.data.batch_size}): these settings give "
            "nothing to train on; nothing was kept"
        )
    built.checkpoints.save_final(trainer, module)
    validating = datamodule.val_set is not None and trainer.limit_val_batches != 0
    if validating and (not plot.val or plot.val[-1][0] != trainer.global_step):
        trainer.validate(module, datamodule=datamodule, verbose=False)  # LossPlot records it


def report(run: Run, built: Built) -> dict:
    """The final metrics (final_metrics.json, written here only), the loss history and plots, and where
    everything is."""
    from telechat_lab.files import write_json

    from .callbacks import csv_log_dir

    trainer, plot, module = built.trainer, built.plot, built.module
    stopped = built.checkpoints.stop_signal
    metrics = {
        "train_loss": plot.train[-1][1] if plot.train else None,
        "val_loss": plot.val[-1][1] if plot.val else None,
        "steps": trainer.global_step,
        "skipped_steps": module.skipped_steps,
        "status": "completed" if stopped is None else "stopped",
        **(validation_metrics(trainer) if plot.val else {}),
        "output_dir": str(run.output_dir),
    }
    if not trainer.is_global_zero:
        return metrics
    plot.write()
    if stopped is None:
        write_json(run.output_dir / "final_metrics.json", {k: v for k, v in metrics.items() if k != "output_dir"})
    report = built.datamodule.report
    csv_dir = csv_log_dir(built.loggers)
    adapter = adapter_kind(run.settings.adapter.type).uses_peft
    examples = report.get("train", {}).get("examples")  # the training set's size, not what the steps took
    about = [f"training set: {examples:,} examples"] if isinstance(examples, int) else []  # a stream's is unknown
    if "packing_efficiency" in report:
        about.append(f"packing efficiency {report['packing_efficiency']:.1%}")
    lines = [
        f"trained {module.n_trainable:,} of {module.n_params:,} parameters for {trainer.global_step} steps"
        + (f" ({', '.join(about)})" if about else ""),
        f"final train loss {_fmt(metrics['train_loss'])}, validation loss {_fmt(metrics['val_loss'])}"
        + "".join(f", {k} {_fmt(metrics[k])}" for k in PREFERENCE_SHOWN if k in metrics)
        + (f", {module.skipped_steps} steps skipped (nan_policy=skip)" if module.skipped_steps else ""),
        f"loss plot:  {run.output_dir / 'training_loss.png'}",
        f"metrics:    {csv_dir / 'metrics.csv' if csv_dir else 'no CSV file (no CSV logger: logger=none?)'}",
    ]
    if stopped is None:  # a stopped run's message (Interrupted) says where its checkpoint is and how to resume
        lines.insert(2, f"{'adapter' if adapter else 'model'}: {run.output_dir}")
        lines.append(f"resume:     {resume_command(run.output_dir)}")
    print("\n" + "\n".join(lines), flush=True)
    return metrics


PREFERENCE_SHOWN = ("val/rewards/accuracies", "val/rewards/margins")  # a preference stage's, in the run's summary


def validation_metrics(trainer) -> dict[str, float]:
    """Every metric the last validation logged (val/rewards/accuracies, ...) but val/loss (that is val_loss)."""
    return {
        name: float(value)
        for name, value in sorted(trainer.callback_metrics.items())
        if name.startswith("val/") and name != "val/loss"
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _nothing_to_resume(run: Run) -> dict:
    """resume=true of a completed run: said, and nothing is changed (not even the lock file's record)."""
    if run.owner is not None:
        run.owner.leave_unchanged()
    print(
        f"{run.output_dir} is a completed run ({run.finished['steps']} steps): nothing to resume. To train "
        "it further, raise trainer.max_steps or trainer.max_epochs with resume=true",
        flush=True,
    )
    return {**run.finished, "output_dir": str(run.output_dir)}


def train(cfg: DictConfig | dict, overrides: list[str] | None = None, validated: bool = False) -> dict:
    """Run one training job; returns its final metrics (train_loss, val_loss, steps, status, output_dir).
    `overrides`: the command-line overrides that made `cfg` (under @hydra.main they are read from Hydra); with
    resume=true they say which settings were given explicitly. `validated`: `cfg` was validated already."""
    import signal

    from .loggers import finish_loggers

    built, claimed = None, owned()
    try:
        run = prepare(cfg, overrides, validated)
        if run.finished is not None:
            return _nothing_to_resume(run)
        built = build(run)
        try:
            fit(run, built)
            metrics = report(run, built)
        finally:
            finish_loggers(built.loggers)
    except BaseException:
        if built is None or built.trainer.global_step == 0:  # it never trained (the data are set up in fit)
            undo_unstarted()
        raise
    finally:  # a claim prepare() took (the Python API, a sweep's job) ends with the run; the CLI's with the process
        for owner in owned():
            if owner not in claimed:
                owner.release()
    stopped = built.checkpoints.stop_signal
    if stopped is not None:
        raise Interrupted(
            f"stopped by {signal.Signals(stopped).name} after step {metrics['steps']}: a resumable "
            f"checkpoint is in {run.output_dir / 'checkpoints'}; continue with {resume_command(run.output_dir)}",
            stopped,
        )
    return metrics

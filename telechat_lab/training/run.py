"""One training run from a composed config, in four steps: prepare (validate, the output directory's rules,
what a resume continues), build (data, model, trainer), fit, report (the final metrics, written once, here)."""

from __future__ import annotations

import logging
import os
import re
import shlex
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from telechat_lab.adapter_kinds import adapter_kind
from telechat_lab.config import TrainConfig, config_values, validate
from telechat_lab.errors import ConfigError, Interrupted, OutputDirError
from telechat_lab.hydra_runtime import sweep_dir
from telechat_lab.private_apis import experiment_started, wandb_init_settings
from telechat_lab.targets import targets

log = logging.getLogger(__name__)
OUTPUT_ENV = "TELECHAT_LAB_OUTPUT_DIR"  # pins output_dir for the processes a DDP launcher starts
COMMAND_ENV = "TELECHAT_LAB_COMMAND"  # how the command was started (set by telechat_lab.cli)


@dataclass
class Run:
    """A prepared run: its settings and where everything is."""

    settings: TrainConfig
    values: dict  # the same settings as plain values (what config.yaml holds)
    output_dir: Path
    model_dir: Path
    run_id: str
    checkpoint: Path | None = None  # what a resume continues from
    overrides: list[str] = field(default_factory=list)  # the command line's, for names (wandb, sweeps)
    parts: dict = field(default_factory=dict)
    recorded: dict | None = None  # `values` as written and logged: settings from the environment unresolved
    finished: dict | None = None  # resume=true of a run with nothing left to train: its final metrics

    def __post_init__(self):
        self.recorded = self.values if self.recorded is None else self.recorded


def launched_worker() -> bool:
    """A process a launcher started for another rank of this run (it reads the run's files, never writes them)."""
    return any(os.environ.get(name, "0") != "0" for name in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def train_command() -> str:
    """How this run was started ("python train.py" or "telechat-lab train"), for the commands it prints."""
    return os.environ.get(COMMAND_ENV, "python train.py")


def resume_command(output_dir: Path) -> str:
    """The command that continues the run in `output_dir`, quoted to paste back into a shell (and for Hydra)."""
    return f"{train_command()} {shlex.quote(f'output_dir={override_value(str(output_dir))}')} resume=true"


def override_value(text: str) -> str:
    """`text` as the value of a Hydra override: as it is where Hydra reads it so, else quoted."""
    if re.fullmatch(r"[\w/.+%@~-]+", text):
        return text
    # Hydra reads a backslash as itself, but before a quote (or the closing one) as an escape
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + escaped.replace("'", "\\'").replace("${", "\\${") + "'"


def requeued_by_slurm() -> bool:
    """SLURM started this job again (after `scontrol requeue`): the same command continues its own run."""
    return os.environ.get("SLURM_RESTART_COUNT", "0") != "0"


def hydra_overrides() -> list[str]:
    """The command line's overrides when running under @hydra.main (else none)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def resolve_output_dir(output_dir: str) -> Path:
    """The run's directory: output_dir, or in a Hydra multirun the job's own directory."""
    if os.environ.get(OUTPUT_ENV) and launched_worker():
        return Path(os.environ[OUTPUT_ENV])
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(hc.runtime.output_dir).resolve()
    except ValueError:  # not under @hydra.main (the Python API)
        pass
    return Path(output_dir).expanduser().resolve()


def _resolved_group(cfg: DictConfig | dict, key: str) -> Any:
    """A logger / callbacks group resolved (its interpolations may name the Hydra job)."""
    node = cfg.get(key)
    if node is None or isinstance(cfg, dict):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception as err:
        raise ConfigError([f"{key}: does not resolve ({err})"]) from err


def prepare(cfg: DictConfig | dict, overrides: list[str] | None = None, validated: bool = False) -> Run:
    """Validate (unless the caller did: `validated`, by the command-line check or the API's compose); apply the
    output directory's rules (nothing the user has is overwritten); for resume=true, the run's own settings and its
    newest valid checkpoint; write config.yaml and run.json."""
    from telechat_lab.data.pipeline import resolved_dataset_dir
    from telechat_lab.resolve import model_dir as resolve_model_dir

    from .checkpoints import newest_checkpoint
    from .rundir import (
        CONFIG_FILE,
        check_output_dir,
        check_outside,
        read_run_record,
        recorded_values,
        resolved_values,
        resumed_settings,
        run_files,
        run_id,
        set_aside_run,
        write_run_record,
    )

    overrides = hydra_overrides() if overrides is None else list(overrides)
    if not validated:
        validate(cfg)  # every problem at once, before anything is loaded or written
    values = config_values(cfg)
    raw = _unresolved(cfg)
    output_dir = resolve_output_dir(values["output_dir"])
    if isinstance(cfg, DictConfig):  # loggers write under the run's own directory (a sweep job's, ...)
        cfg = cfg.copy()
        OmegaConf.update(cfg, "output_dir", str(output_dir), force_add=True)
    for key in ("logger", "callbacks"):
        values[key] = _resolved_group(cfg, key)
    model_dir = resolve_model_dir(values["model"]["path"])
    if values["model"]["path"]:  # recorded absolute: a resume from another directory finds the same files
        values["model"]["path"] = str(model_dir)
    data_dir = resolved_dataset_dir(values["data"]["dataset_dir"])
    values["data"]["dataset_dir"] = str(data_dir)
    values["output_dir"] = str(output_dir)

    worker = launched_worker()
    protected = {"model.path": model_dir, "data.dataset_dir": data_dir}
    if not worker:  # from here on the directory is this process's (see runlock)
        check_outside(output_dir, protected)
        claim_output_dir(output_dir)
    resume = bool(values["resume"])
    if (
        not resume
        and requeued_by_slurm()
        and not worker
        and read_run_record(output_dir).get("run_id") == run_id(values)
    ):
        log.warning("SLURM requeued this job: resuming the run in %s", output_dir)
        resume = values["resume"] = True
    if not worker:  # under the lock: what is there now is what it was checked against
        check_output_dir(output_dir, resume=resume, overwrite=bool(values["overwrite"]), protected={})
    recorded = recorded_values(values, raw)
    if resume:
        recorded = resumed_settings(output_dir, recorded, overrides)
        values = resolved_values(recorded, output_dir / CONFIG_FILE)
        values["resume"] = True
        validate(values)  # the run's own settings with this command's changes: a config of its own
    identity = run_id(values)
    checkpoint = None
    if resume:
        checkpoint = newest_checkpoint(output_dir / "checkpoints", identity)
        if checkpoint is None:
            raise OutputDirError(
                f"resume=true: no readable checkpoint in {output_dir / 'checkpoints'} (the run "
                "stopped before its first one); start it again with overwrite=true"
            )
        finished = finished_metrics(output_dir, values, checkpoint)
        if finished is not None:  # nothing to train: nothing is loaded or written
            settings = settings_of(values)
            return Run(
                settings,
                values,
                output_dir,
                model_dir,
                identity,
                checkpoint,
                overrides,
                finished=finished,
                recorded=recorded,
            )
    if not worker:
        if values["overwrite"] and run_files(output_dir):
            set_aside_run(output_dir)
        _write_settings(output_dir, recorded)
        if not resume:
            write_run_record(output_dir, values, overrides)
    os.environ[OUTPUT_ENV] = str(output_dir)
    return Run(settings_of(values), values, output_dir, model_dir, identity, checkpoint, overrides, recorded=recorded)


def _unresolved(cfg: DictConfig | dict) -> dict:
    if isinstance(cfg, dict):
        return cfg
    return {key: value for key, value in OmegaConf.to_container(cfg, resolve=False).items() if key != "hydra"}


def claim_output_dir(directory: Path, check=None) -> None:
    """Take the run directory for this process (runlock) and finish an overwrite=true that was interrupted there;
    then `check()` (the output directory's rules, under the lock). On a refusal what the claim made goes again."""
    import sys

    from .rundir import recover_interrupted_overwrite
    from .runlock import claim

    owner = claim(directory)
    try:
        note = recover_interrupted_overwrite(directory)
        if note:
            print(f"note: {note}", file=sys.stderr, flush=True)
        if check is not None:
            check()
    except BaseException:
        owner.undo()
        owner.release()
        raise


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


NOT_IN_NAMES = ("hydra", "output_dir", "resume", "overwrite", "logger", "data.cache_dir", "trainer.enable_progress_bar")


def wandb_settings(config: dict, run: Run) -> dict:
    """A WandbLogger's settings for this job: a short name (the job's own overrides), the sweep as its group, and
    the run's wandb id (kept in run.json: resume=true continues the same wandb run)."""
    from .rundir import read_run_record, write_json_record

    config = dict(config)
    if not config.get("name"):
        own = [o.lstrip("+~") for o in run.overrides if not o.lstrip("+~").startswith(NOT_IN_NAMES)]
        swept = swept_keys()
        if swept:  # a sweep's job: what it sweeps is what tells it from its siblings
            own = [o for o in own if o.split("=", 1)[0] in swept]
        config["name"] = " ".join(own) or run.settings.task_name
    if not config.get("group"):
        sweep = sweep_dir()
        config["group"] = f"{run.settings.task_name}-{sweep.name}" if sweep else None
    record = read_run_record(run.output_dir)
    if not record.get("wandb_id"):
        import uuid

        record["wandb_id"] = uuid.uuid4().hex[:12]  # any [a-z0-9] string is a valid wandb run id
        if not launched_worker():
            write_json_record(run.output_dir, record)
    config.update(id=record["wandb_id"], resume="allow")
    return config


def swept_keys() -> set[str]:
    """The settings a sweep varies: its sweeper's params, and the command line's sweep overrides (a,b / choice(..)
    / range(..) / interval(..)) where the job runs in the sweep's own process."""
    import sys

    from hydra.core.override_parser.overrides_parser import OverridesParser

    if sweep_dir() is None:
        return set()
    from hydra.core.hydra_config import HydraConfig

    keys = set((HydraConfig.get().sweeper.get("params") or {}).keys())
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if "=" in a])
    except Exception:
        return keys
    return keys | {o.key_or_group for o in overrides if o.is_sweep_override()}


def build(run: Run) -> None:
    """The data module, the LightningModule, the loggers, callbacks and the Trainer."""
    import hydra
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from telechat_lab.console import quiet_lightning
    from telechat_lab.stages import stage_of

    from .callbacks import DiscardReplacedRun, LossPlot, SpeedAndMemory, StepsProgressBar
    from .checkpoints import RunCheckpoints
    from .datamodule import TelechatDataModule
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
    logger_cfgs = [v for v in (s.logger or {}).values() if v is not None]
    if run.checkpoint is not None:  # keep the interrupted run's CSV logs: the resumed part goes to logs/resumed-*
        logger_cfgs = [{**v, "version": _resumed_version(v)} if targets(v, CSVLogger) else v for v in logger_cfgs]
    loggers = [hydra.utils.instantiate(wandb_settings(v, run) if targets(v, WandbLogger) else v) for v in logger_cfgs]
    for logger in loggers:  # Lightning passes wandb an `anonymous` setting that wandb >= 0.19 warns has no effect
        wandb_init_settings(logger).pop("anonymous", None)
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
    run.parts = {
        "datamodule": datamodule,
        "module": module,
        "trainer": trainer,
        "loggers": loggers,
        "checkpoints": checkpoints,
        "plot": plot,
    }


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


def fit(run: Run) -> None:
    """Train; then, for a completed run whose last validation is older than its last step, validate once more."""
    trainer, module, datamodule = run.parts["trainer"], run.parts["module"], run.parts["datamodule"]
    plot = run.parts["plot"]
    checkpoint = str(run.checkpoint) if run.checkpoint else None
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)  # never runs code in it
    except MisconfigurationException as err:  # Lightning's word on the trainer settings: the user's to fix
        raise ConfigError([f"trainer: {err}"]) from err
    if run.parts["checkpoints"].stop_signal is not None:
        return
    if checkpoint is None and trainer.global_step == 0:  # what it wrote goes again (train's undo)
        limits = {key: run.settings.trainer.get(key) for key in ("max_epochs", "max_steps", "limit_train_batches")}
        given = ", ".join(f"trainer.{key}={value}" for key, value in limits.items() if value is not None)
        raise ConfigError(
            f"no training step ran ({given}; data.batch_size={run.settings.data.batch_size}): these settings give "
            "nothing to train on; nothing was kept"
        )
    run.parts["checkpoints"].save_final(trainer, module)
    validating = datamodule.val_set is not None and trainer.limit_val_batches != 0
    if validating and (not plot.val or plot.val[-1][0] != trainer.global_step):
        trainer.validate(module, datamodule=datamodule, verbose=False)  # LossPlot records it


def report(run: Run) -> dict:
    """The final metrics (final_metrics.json, written here only), the loss history and plots, and where
    everything is."""
    from telechat_lab.files import write_json

    from .callbacks import csv_log_dir

    trainer, plot, module = run.parts["trainer"], run.parts["plot"], run.parts["module"]
    stopped = run.parts["checkpoints"].stop_signal
    metrics = {
        "train_loss": plot.train[-1][1] if plot.train else None,
        "val_loss": plot.val[-1][1] if plot.val else None,
        "steps": trainer.global_step,
        "skipped_steps": module.skipped_steps,
        "status": "completed" if stopped is None else "stopped",
        "output_dir": str(run.output_dir),
    }
    if not trainer.is_global_zero:
        return metrics
    plot.write()
    if stopped is None:
        write_json(run.output_dir / "final_metrics.json", {k: v for k, v in metrics.items() if k != "output_dir"})
    report = run.parts["datamodule"].report
    csv_dir = csv_log_dir(run.parts["loggers"])
    adapter = adapter_kind(run.settings.adapter.type).uses_peft
    lines = [
        f"trained {module.n_trainable:,} of {module.n_params:,} parameters for {trainer.global_step} steps "
        f"on {report.get('train', {}).get('examples')} examples"
        + (f" (packing efficiency {report['packing_efficiency']:.1%})" if "packing_efficiency" in report else ""),
        f"final train loss {_fmt(metrics['train_loss'])}, validation loss {_fmt(metrics['val_loss'])}"
        + (f", {module.skipped_steps} steps skipped (nan_policy=skip)" if module.skipped_steps else ""),
        f"loss plot:  {run.output_dir / 'training_loss.png'}",
        f"metrics:    {csv_dir / 'metrics.csv' if csv_dir else 'no CSV file (no CSV logger: logger=none?)'}",
    ]
    if stopped is None:  # a stopped run's message (Interrupted) says where its checkpoint is and how to resume
        lines.insert(2, f"{'adapter' if adapter else 'model'}: {run.output_dir}")
        lines.append(f"resume:     {resume_command(run.output_dir)}")
    print("\n" + "\n".join(lines), flush=True)
    return metrics


def finish_loggers(run: Run) -> None:
    """Close the job's wandb run: the next job of a sweep (in this same process) starts a run of its own."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in run.parts.get("loggers", []):
        if isinstance(logger, WandbLogger) and experiment_started(logger):
            logger.experiment.finish()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def check_command_line(argv: list[str], conf_dir: str) -> DictConfig | None:
    """train.py, before Hydra starts (and writes into the output directory): every config problem at once, then
    the output directory's rules; a problem is printed and exits 2. Returns the validated config (None where the
    check was left to Hydra)."""
    import sys
    from functools import partial

    from telechat_lab.config import check_command_line as check_config
    from telechat_lab.data.pipeline import resolved_dataset_dir
    from telechat_lab.errors import reported
    from telechat_lab.resolve import model_dir

    from .rundir import check_output_dir, check_outside, interrupted_overwrite
    from .runlock import check_free, claim

    cfg = check_config(argv, conf_dir, "train")
    if cfg is None or launched_worker():
        return cfg
    values = config_values(cfg)
    with reported():
        protected = {
            "model.path": model_dir(values["model"]["path"]),  # the demo's tiny model too
            "data.dataset_dir": resolved_dataset_dir(values["data"]["dataset_dir"]),
        }
    if {"-m", "--multirun"} & set(argv):  # each job checks its own directory; the sweep's, given, is checked here
        given = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.sweep.dir=")]
        if given and "${" not in given[-1]:
            with reported():  # a sweep's directory holds its jobs' own: only where it lies is checked
                check_outside(resolve_output_dir(given[-1]), protected)
                claim(resolve_output_dir(given[-1]), "hydra.sweep.dir").undoable = False  # one sweep at a time
        return cfg
    if requeued_by_slurm() and not values["resume"]:
        return cfg  # prepare() resumes the run when it is this command's own, and refuses otherwise
    with reported():
        directory = resolve_output_dir(values["output_dir"])
        rules = partial(check_output_dir, directory, resume=values["resume"], overwrite=values["overwrite"])
        check_outside(directory, protected)
        check_free(directory)
        if not interrupted_overwrite(directory):
            rules(protected={})  # a command refused here writes nothing, not even the lock file
        claim_output_dir(directory, partial(rules, protected={}))  # held until the process ends
    sys.stdout.flush()
    return cfg


def undo_unstarted_run() -> None:
    """A run that failed before its first step (a bad dataset, a model that does not load) leaves its output
    directory as it found it, so that the corrected command can use it: a run it was replacing (overwrite=true)
    is put back, and what this process created there is removed (the whole directory when it made it)."""
    from .rundir import restore_replaced_run
    from .runlock import held

    if launched_worker():
        return
    for owner in held():
        if owner.undoable:
            restore_replaced_run(owner.directory)
            owner.undo()


def train(cfg: DictConfig | dict, overrides: list[str] | None = None, validated: bool = False) -> dict:
    """Run one training job; returns its final metrics (train_loss, val_loss, steps, status, output_dir).
    `overrides`: the command-line overrides that made `cfg` (under @hydra.main they are read from Hydra); with
    resume=true they say which settings were given explicitly. `validated`: `cfg` was validated already."""
    import signal

    from .runlock import held

    run, claimed = None, held()
    try:
        run = prepare(cfg, overrides, validated)
        if run.finished is not None:
            for owner in held():  # nothing is changed, not even the lock file's record
                if owner.directory == run.output_dir:
                    owner.restore_record()
            print(
                f"{run.output_dir} is a completed run ({run.finished['steps']} steps): nothing to resume. To train "
                "it further, raise trainer.max_steps or trainer.max_epochs with resume=true",
                flush=True,
            )
            return {**run.finished, "output_dir": str(run.output_dir)}
        build(run)
        try:
            fit(run)
            metrics = report(run)
        finally:
            finish_loggers(run)
    except BaseException:
        trainer = run.parts.get("trainer") if run is not None else None
        if trainer is None or trainer.global_step == 0:  # it never trained (the data are set up in fit)
            undo_unstarted_run()
        raise
    finally:  # a claim prepare() took (the Python API, a sweep's job) ends with the run; the CLI's with the process
        for owner in held():
            if owner not in claimed:
                owner.release()
    stopped = run.parts["checkpoints"].stop_signal
    if stopped is not None:
        raise Interrupted(
            f"stopped by {signal.Signals(stopped).name} after step {metrics['steps']}: a resumable "
            f"checkpoint is in {run.output_dir / 'checkpoints'}; continue with {resume_command(run.output_dir)}",
            stopped,
        )
    return metrics

"""One training run from a composed config: validate, build, fit, report where everything is."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
OUTPUT_ENV = "TELECHAT_LAB_OUTPUT_DIR"  # pins output_dir for the processes DDP launches


def resolve_output_dir(cfg: DictConfig) -> Path:
    """The run's directory: output_dir, or in a Hydra multirun the job's own directory."""
    if os.environ.get(OUTPUT_ENV) and os.environ.get("LOCAL_RANK", "0") != "0":
        return Path(os.environ[OUTPUT_ENV])
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(hc.runtime.output_dir).resolve()
    except ValueError:  # not under @hydra.main (tests composing the config)
        pass
    return Path(cfg.output_dir).resolve()


def csv_log_dir(loggers: list, output_dir: Path) -> Path:
    for logger in loggers:
        if type(logger).__name__ == "CSVLogger":
            return Path(logger.log_dir)
    return output_dir / "logs"


def train(cfg: DictConfig) -> dict:
    """Returns the final metrics (train_loss, val_loss, steps, output_dir)."""
    import hydra
    import lightning as L

    from telechat_lab.config import validate
    from telechat_lab.data import DataConfig
    from telechat_lab.resolve import model_dir as resolve_model_dir

    from .callbacks import HFCheckpoint, LossPlot, ThroughputMonitor
    from .datamodule import TelechatDataModule
    from .module import TelechatLitModule
    from .strategy import trainer_arguments

    validate(cfg)  # every problem at once, before anything is loaded
    if cfg.model.get("name") == "tiny" and cfg.model.get("path"):
        log.warning("model.path is set on model=tiny, whose hyperparameters are the CPU demo's (lr %s); for a "
                    "real TeleChat2 choose its group, e.g. model=telechat2_7b model.path=...", cfg.optim.lr)
    output_dir = resolve_output_dir(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    os.environ[OUTPUT_ENV] = str(output_dir)
    OmegaConf.update(cfg, "output_dir", str(output_dir), force_add=True)
    L.seed_everything(cfg.seed, workers=True)

    model_dir = resolve_model_dir(cfg.model.path)
    data_cfg = DataConfig.from_mapping(OmegaConf.to_container(cfg.data, resolve=True))
    datamodule = TelechatDataModule(data_cfg, model_dir)
    c = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    module = TelechatLitModule(model_dir, c(cfg.model), c(cfg.adapter), c(cfg.optim))

    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    (output_dir / "config.yaml").write_text(resolved)
    logger_cfgs = [v for v in (cfg.get("logger") or {}).values() if v is not None]
    if cfg.resume:  # keep the interrupted run's logs: the resumed part goes to logs/resumed-<time>/
        stamp = datetime.now().strftime("resumed-%Y%m%d-%H%M%S")
        logger_cfgs = [OmegaConf.merge(v, {"version": stamp}) if "CSVLogger" in str(v.get("_target_")) else v
                       for v in logger_cfgs]
    loggers = [hydra.utils.instantiate(v) for v in logger_cfgs]
    for logger in loggers:
        if hasattr(logger, "log_hyperparams"):
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    callbacks = [hydra.utils.instantiate(v) for v in (cfg.get("callbacks") or {}).values() if v is not None]
    callbacks += [
        HFCheckpoint(output_dir, model_dir, cfg.save_steps, resolved),
        ThroughputMonitor(cfg.logging_steps, cfg.hardware.get("peak_tflops")),
        LossPlot(output_dir, cfg.plot_loss),
        L.pytorch.callbacks.ModelCheckpoint(dirpath=output_dir / "checkpoints", every_n_train_steps=cfg.save_steps,
                                            save_top_k=0, save_last=True),
    ]
    trainer_cfg = c(cfg.trainer)
    trainer = L.Trainer(**trainer_cfg, **trainer_arguments(c(cfg.hardware), trainer_cfg), logger=loggers,
                        callbacks=callbacks, log_every_n_steps=cfg.logging_steps, default_root_dir=str(output_dir),
                        use_distributed_sampler=False)  # the data module shards (resumably) itself
    ckpt = None
    if cfg.resume:
        last = output_dir / "checkpoints" / "last.ckpt"
        if not last.exists():
            raise FileNotFoundError(f"resume=true but {last} does not exist (output_dir={output_dir})")
        ckpt = str(last)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)

    final_file = output_dir / "final_metrics.json"
    metrics = json.loads(final_file.read_text()) if final_file.exists() else {}
    plot = next(cb for cb in callbacks if isinstance(cb, LossPlot))
    validating = trainer.limit_val_batches != 0
    if datamodule.val_set is not None and validating and (not plot.val or plot.val[-1][0] != trainer.global_step):
        # the run stopped between validations: measure the final model once more (LossPlot records it)
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
        if results and "val_loss" in results[0] and trainer.is_global_zero:
            if not plot.val or plot.val[-1][0] != trainer.global_step:
                plot.val.append((trainer.global_step, float(results[0]["val_loss"])))
            plot.on_train_end(trainer, module)  # rewrite final_metrics.json and the plots
            metrics = json.loads(final_file.read_text())
    metrics["output_dir"] = str(output_dir)
    if trainer.is_global_zero:
        report = datamodule.report
        lines = [f"trained {module.n_trainable:,} of {module.n_params:,} parameters for {trainer.global_step} steps "
                 f"on {report.get('train', {}).get('examples')} examples"
                 + (f" (packing efficiency {report['packing_efficiency']:.1%})" if "packing_efficiency" in report
                    else ""),
                 f"final train loss {metrics.get('train_loss')}, validation loss {metrics.get('val_loss')}",
                 f"{'adapter' if cfg.adapter.type in ('lora', 'dora', 'qlora') else 'model'}: {output_dir}",
                 f"loss plot:  {output_dir / 'training_loss.png'}",
                 f"metrics:    {csv_log_dir(loggers, output_dir) / 'metrics.csv'}",
                 f"resume:     python train.py output_dir={output_dir} resume=true"]
        print("\n" + "\n".join(lines))
    return metrics

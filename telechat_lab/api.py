"""The commands from Python or a notebook, with the overrides one would type after them:

    from telechat_lab import api

    metrics = api.train(["adapter=dora", "trainer.max_steps=20", "output_dir=runs/nb"])  # final metrics (a dict)
    export = api.merge(["adapter_path=runs/nb", "export_dir=runs/nb-merged"])            # the export's directory
    session = api.chat(["model.path=runs/nb-merged", "generation.do_sample=false"])
    print("".join(session.reply("Who are you?")))                                        # a conversation
    report = api.inspect(["data.datasets=[identity]"])                                    # the data report (a dict)
    result = api.evaluate(["run_dir=runs/nb", "eval.split=val"])                          # metrics, output_dir

Each composes its config as the command line does (`api.compose`), checks every setting at once, and raises
(ConfigError, DataError, CheckpointError, ...) instead of exiting.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from telechat_lab.cli import CONF_DIR


def compose(command: str = "train", overrides: list[str] | tuple = ()) -> DictConfig:
    """The config of `command` (train, merge, chat, inspect) with these overrides, validated (once: by the
    command-line check, which composes the same overrides; for train's resume=true, the run's own settings with
    these changes are validated when the run is prepared)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from telechat_lab.config import SCHEMAS, ConfigError, command_line_config, validate
    from telechat_lab.console import quiet_libraries

    quiet_libraries()
    problems, checked = command_line_config(list(overrides), CONF_DIR, command)
    if problems:
        raise ConfigError(problems)
    GlobalHydra.instance().clear()  # a notebook may hold an earlier initialisation
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(command, overrides=list(overrides))
    if checked is None:  # what the check leaves to Hydra (a glob sweep, ...) is validated here
        validate(cfg, SCHEMAS[command])
    return cfg


def train(overrides: list[str] | tuple = ()) -> dict:
    """A training run; its final metrics (train_loss, val_loss, steps, status, output_dir)."""
    from telechat_lab.training.run import train as run_training

    return run_training(compose("train", overrides), list(overrides), validated=True)


def merge(overrides: list[str] | tuple = ()) -> Path:
    """Merge adapters into their base and export; the export's directory."""
    from telechat_lab.export import merge_and_export

    return merge_and_export(OmegaConf.to_object(compose("merge", overrides)))


def chat(overrides: list[str] | tuple = ()):
    """A ChatSession: `session.reply(message)` streams the answer and keeps the conversation; `session.clear()`."""
    from telechat_lab.chat import make_session

    return make_session(OmegaConf.to_object(compose("chat", overrides)))


def inspect(overrides: list[str] | tuple = ()) -> dict:
    """Encode the data as training would and report it (what `telechat-lab inspect` prints)."""
    from telechat_lab.data.inspect import run

    return run(compose("inspect", overrides))


def evaluate(overrides: list[str] | tuple = ()) -> dict:
    """`telechat-lab eval`: {"metrics", "output_dir", ...} (a sweep_dir: {"summary", "table"})."""
    from telechat_lab.eval.run import run_eval

    return run_eval(OmegaConf.to_object(compose("eval", overrides)))

"""The commands: `telechat-lab train|merge|chat|inspect|serve|eval|tiny [overrides ...]`, and the same as
`python train.py`, `python merge.py`, `python chat.py`, `python eval.py`, `python -m telechat_lab.data.inspect` in a
checkout.

Each Hydra command first checks its whole command line (every problem at once, before Hydra writes
anything), then runs with its config from the package's own `conf/` (so an installed package works from any
directory); user errors end as one message and an exit code, never a traceback. `--help` and Tab completion
show only the command's own groups and keys (the commands share one conf/) and import nothing heavy (no torch).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from telechat_lab.errors import reported

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
COMMANDS = {
    "train": "fine-tune (conf/train.yaml)",
    "merge": "merge adapters and export (conf/merge.yaml)",
    "chat": "chat, or answer a file of prompts (conf/chat.yaml)",
    "inspect": "see the encoded data and what is trained (conf/inspect.yaml)",
    "serve": "an OpenAI-compatible HTTP server, adapters chosen by model name (conf/serve.yaml)",
    "eval": "generation metrics on a dataset or a run's validation split, harness tasks, sweeps (conf/eval.yaml)",
    "tiny": "write a tiny random TeleChat2 checkpoint: telechat-lab tiny DIR",
}


_checked: dict[str, bool] = {}  # command -> its config was validated before Hydra started (one run, this process)


def _basic_sweep() -> bool:
    """A job of Hydra's own sweeper, which re-raises a failed job's error after the last job (a traceback, and no
    sweep summary); an Optuna sweep records a failed trial from its error."""
    from hydra.core.hydra_config import HydraConfig

    from telechat_lab.hydra_runtime import is_multirun
    from telechat_lab.private_apis import hydra_basic_sweeper
    from telechat_lab.targets import targets

    return is_multirun() and targets(HydraConfig.get().sweeper, hydra_basic_sweeper())


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> float | None:
    from telechat_lab.console import quiet_libraries

    quiet_libraries()  # again in a launcher's worker process (joblib, submitit), which starts here, before imports
    from telechat_lab.errors import UserError
    from telechat_lab.hydra_runtime import is_multirun
    from telechat_lab.training.run import train as run_training

    try:
        with reported(multirun=is_multirun()):
            metrics = run_training(cfg, validated=_checked.get("train", False) and not is_multirun())
    except UserError:
        if _basic_sweep():  # its message is printed; the summary lists the job as failed, the sweep goes on
            return None
        raise
    return metrics.get(cfg.optimized_metric)  # the value an Optuna sweep minimises


@hydra.main(config_path=CONF_DIR, config_name="merge", version_base="1.3")
def merge(cfg: DictConfig) -> None:
    from telechat_lab.export import merge_and_export

    with reported():
        merge_and_export(OmegaConf.to_object(cfg))


@hydra.main(config_path=CONF_DIR, config_name="chat", version_base="1.3")
def chat(cfg: DictConfig) -> None:
    from telechat_lab.chat import run_chat

    with reported():
        run_chat(OmegaConf.to_object(cfg))


@hydra.main(config_path=CONF_DIR, config_name="serve", version_base="1.3")
def serve(cfg: DictConfig) -> None:
    from telechat_lab.serve import run_serve

    with reported():
        run_serve(OmegaConf.to_object(cfg))


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def evaluate(cfg: DictConfig) -> None:
    from telechat_lab.errors import UserError
    from telechat_lab.eval.run import record_job, run_eval
    from telechat_lab.hydra_runtime import is_multirun

    try:
        with reported(multirun=is_multirun()):
            result = run_eval(OmegaConf.to_object(cfg))
    except UserError:
        if _basic_sweep():  # its message is printed; the summary lists the job as failed, the sweep goes on
            record_job(None)
            return
        raise
    if is_multirun():
        record_job(result)


@hydra.main(config_path=CONF_DIR, config_name="inspect", version_base="1.3")
def inspect(cfg: DictConfig) -> None:
    from telechat_lab.data.inspect import run

    with reported():
        run(cfg)


def run(command: str, argv: list[str] | None = None) -> None:
    """Run one Hydra command with `argv` (default: the process's own arguments). A Ctrl+C before the command's
    own handling starts (checking the config, importing torch) ends it as one inside it does."""
    from telechat_lab.errors import stopped_by_ctrl_c

    try:
        _run(command, argv)
    except KeyboardInterrupt:
        stopped_by_ctrl_c()


def _run(command: str, argv: list[str] | None) -> None:
    from telechat_lab.config.command_line import skips_check
    from telechat_lab.training.process import COMMAND_ENV

    args = sys.argv[1:] if argv is None else list(argv)
    if COMMAND_ENV not in os.environ:  # the first process (not a DDP rank): how the user started it
        started = Path(sys.argv[0]).name
        os.environ[COMMAND_ENV] = (
            f"telechat-lab {command}"
            if started == "telechat-lab"
            else f"python {started}"
            if started.endswith(".py")
            else f"telechat-lab {command}"
        )
    if skips_check(args):  # --help, completion, --cfg: Hydra alone, and nothing that imports torch
        import telechat_lab.config.schema  # noqa: F401  (registers the schemas the configs are typed against)
    else:  # every problem of the config at once, then (train) the run directory's claim: before Hydra writes
        from telechat_lab.config import check_command_line
        from telechat_lab.console import name_deepspeed_accelerator, quiet_libraries

        quiet_libraries(name_accelerator=False)  # a config error is reported without importing torch
        cfg = check_command_line(args, CONF_DIR, command)
        name_deepspeed_accelerator()
        if command == "train":
            from telechat_lab.training.run import before_hydra

            before_hydra(cfg, args)
            _checked["train"] = cfg is not None
    # what @hydra.main reads; and what a DDP launcher starts again for each rank: a file that runs this command
    # (not for shell completion: Hydra names the program to complete after sys.argv[0])
    start_again = Path(__file__).resolve().parent / "commands" / "run_train.py"
    completing = bool({"-sc", "--shell-completion"} & set(args))
    sys.argv = [str(start_again) if command == "train" and not completing else sys.argv[0], *args]
    main_of = {"train": train, "merge": merge, "chat": chat, "inspect": inspect, "serve": serve, "eval": evaluate}[
        command
    ]
    if {"-h", "--help"} & set(args):
        print_help(command, args)
    elif completing and any(a.startswith("query") for a in args):
        _complete_own_groups(command, main_of)
    else:
        main_of()


def foreign_groups(command: str) -> set[str]:
    """The config groups in conf/ that `command` does not use (merge: all of train's), and the internal `schema`."""
    from telechat_lab.config.command_line import option_groups

    own = option_groups(CONF_DIR, command)
    return {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name != "hydra"} - own | {"schema"}


@contextlib.contextmanager
def _one_search_path_per_query() -> Iterator[None]:
    """Hydra's completion asks its config loader about each group with the same config name and overrides, and
    the loader loads the primary config again for every question (most of a Tab's time): within one query, the
    search path it builds from them is built once. Without that private method (another Hydra), nothing changes."""
    from telechat_lab.private_apis import overridden

    found = overridden(
        "hydra._internal.config_loader_impl", "ConfigLoaderImpl", "_parse_overrides_and_create_caching_repo"
    )
    if found is None:
        yield
        return
    loader, method = found
    build = getattr(loader, method)
    built: dict = {}

    def once(self, config_name, overrides):
        key = (id(self), config_name, tuple(overrides))
        if key not in built:
            built[key] = build(self, config_name, overrides)
        return built[key]

    setattr(loader, method, once)
    try:
        yield
    finally:
        setattr(loader, method, build)


def _complete_own_groups(command: str, main_of) -> None:
    """Hydra's completion lists every group of the config directory, which the commands share: only the
    command's own groups (and keys, and Hydra's) are offered."""
    import dataclasses
    import io
    import re

    from telechat_lab.config.schema import SCHEMAS

    answer, foreign = io.StringIO(), foreign_groups(command)
    own_keys = {f.name for f in dataclasses.fields(SCHEMAS[command])} if command in SCHEMAS else set()
    with contextlib.redirect_stdout(answer), _one_search_path_per_query():
        main_of()
    words = answer.getvalue().split()

    def own(word: str) -> bool:  # a foreign group's name may be one of the command's keys (eval's data.)
        head, sep = re.match(r"([^=./]*)([=./]?)", word.lstrip("+~")).groups()
        return head not in foreign or (head in own_keys and sep == ".")

    kept = [w for w in words if own(w)]
    print(("\n" if "\n" in answer.getvalue().strip() else " ").join(kept))


def print_help(command: str, args: list[str]) -> None:
    """`--help`: the command's own option groups (with their options) and its config composed with the given
    overrides; not Hydra's page, which lists every group of the shared conf/ (and the internal `schema`) and
    composes the defaults once for each group it lists (seconds)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from telechat_lab.config.command_line import config_source, option_groups

    conf_dir, config_name, overrides = config_source(args, CONF_DIR, command)
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            found = GlobalHydra.instance().config_loader().repository  # conf/, --config-dir (what a run searches)
            groups = [
                f"  {g}: {', '.join(found.get_group_options(g))}" for g in sorted(option_groups(conf_dir, config_name))
            ]
            cfg = compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:  # a bad override beside --help
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(
        f"{command}: {COMMANDS[command]}\n\n"
        + (f"== Option groups == (group=option)\n{chr(10).join(groups)}\n\n" if groups else "")
        + f"== Config == (key=value; a sweep: -m key=a,b)\n{OmegaConf.to_yaml(cfg)}\n"
        "Every key, its type, default and meaning: telechat_lab/config/schema.py.\n"
        "Hydra's own options and groups (-m, --cfg job, hydra/launcher=joblib, -sc install=bash): --hydra-help"
    )


def _completion_query(args: list[str]) -> list[str]:
    """Hydra's bash completion asks `telechat-lab -sc query=bash` with the line typed so far in COMP_LINE: the
    command names after `telechat-lab`, else the command's own completion, asked with the line as Hydra would see
    it (without the command's name)."""
    line, point = os.environ["COMP_LINE"], int(os.environ.get("COMP_POINT", len(os.environ["COMP_LINE"])))
    words = line.split()
    command = words[1] if len(words) > 1 else ""
    if command not in COMMANDS or (len(words) == 2 and not line.endswith(" ")):
        print(" ".join(name for name in COMMANDS if name.startswith(command)))
        return []
    start = line.index(command, len(words[0]))
    os.environ["COMP_LINE"] = line[:start] + line[start + len(command) :].lstrip()
    os.environ["COMP_POINT"] = str(max(0, point - (len(line) - len(os.environ["COMP_LINE"]))))
    return [command, *args]


def main(argv: list[str] | None = None) -> None:
    """The `telechat-lab` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in ("-sc", "--shell-completion") and "COMP_LINE" in os.environ:
        args = _completion_query(args)
        if not args:
            return
    if not args or args[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items())
        unknown = f"error: unknown command '{args[0]}'\n" if args and args[0] not in ("-h", "--help") else ""
        print(
            f"{unknown}usage: telechat-lab COMMAND [overrides ...]\n\ncommands:\n{lines}\n\n"
            "Each takes Hydra overrides (key=value, group=option, -m for a sweep, --help, --cfg job).",
            file=sys.stderr if args else sys.stdout,
        )
        sys.exit(2 if args and args[0] not in ("-h", "--help") else 0)
    command, rest = args[0], args[1:]
    if command == "tiny":
        from telechat_lab.console import quiet_libraries
        from telechat_lab.tiny import main as tiny

        quiet_libraries()
        with reported():
            tiny(rest)
        return
    run(command, rest)


if __name__ == "__main__":  # python -m telechat_lab.cli COMMAND ...
    main()

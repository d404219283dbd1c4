"""The commands: `telechat-lab train|merge|chat|inspect|serve|tiny [overrides ...]`, and the same as
`python train.py`, `python merge.py`, `python chat.py`, `python -m telechat_lab.data.inspect` in a checkout.

Each Hydra command first checks its whole command line (every problem at once, before Hydra writes
anything), then runs with its config from the package's own `conf/` (so an installed package works from any
directory); user errors end as one message and an exit code, never a traceback.
"""

from __future__ import annotations

import os
import sys
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
    "tiny": "write a tiny random TeleChat2 checkpoint: telechat-lab tiny DIR",
}


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _basic_sweep() -> bool:
    """A job of Hydra's own sweeper, which re-raises a failed job's error after the last job (a traceback, and no
    sweep summary); an Optuna sweep records a failed trial from its error."""
    from hydra.core.hydra_config import HydraConfig

    return _multirun() and "BasicSweeper" in str(HydraConfig.get().sweeper.get("_target_", ""))


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> float | None:
    from telechat_lab.errors import UserError
    from telechat_lab.training.run import train as run_training

    try:
        with reported(multirun=_multirun()):
            metrics = run_training(cfg)
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


@hydra.main(config_path=CONF_DIR, config_name="inspect", version_base="1.3")
def inspect(cfg: DictConfig) -> None:
    from telechat_lab.data.inspect import run

    with reported():
        run(cfg)


def run(command: str, argv: list[str] | None = None) -> None:
    """Run one Hydra command with `argv` (default: the process's own arguments)."""
    from telechat_lab.console import quiet_libraries

    quiet_libraries()
    args = sys.argv[1:] if argv is None else list(argv)
    if "TELECHAT_LAB_COMMAND" not in os.environ:  # the first process (not a DDP rank): how the user started it
        started = Path(sys.argv[0]).name
        os.environ["TELECHAT_LAB_COMMAND"] = (
            f"telechat-lab {command}"
            if started == "telechat-lab"
            else f"python {started}"
            if started.endswith(".py")
            else f"telechat-lab {command}"
        )
    if command == "train":
        from telechat_lab.training.run import check_command_line

        check_command_line(args, CONF_DIR)
    else:
        from telechat_lab.config import check_command_line

        check_command_line(args, CONF_DIR, command)
    # what @hydra.main reads; and what a DDP launcher starts again for each rank: a file that runs this command
    # (not for shell completion: Hydra names the program to complete after sys.argv[0])
    start_again = Path(__file__).resolve().parent / "commands" / "run_train.py"
    completing = bool({"-sc", "--shell-completion"} & set(args))
    sys.argv = [str(start_again) if command == "train" and not completing else sys.argv[0], *args]
    {"train": train, "merge": merge, "chat": chat, "inspect": inspect, "serve": serve}[command]()


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

"""Checking a command line before Hydra starts (and writes anything): Hydra stops at the first unknown key and
types a value only as it merges it; here every problem of the composed config is listed at once."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from telechat_lab.errors import ConfigError
from telechat_lab.extras import missing_for_config, missing_for_options
from telechat_lab.private_apis import apply_overrides

from .schema import SCHEMAS
from .suggest import near_names
from .validate import config_problems

# Hydra's own flags: completion, help, printing the config; the check leaves these runs to Hydra untouched
HYDRA_INFO_FLAGS = {
    "-sc",
    "--shell-completion",
    "-h",
    "--help",
    "--hydra-help",
    "-c",
    "--cfg",
    "-i",
    "--info",
    "--version",
    "-p",
    "--package",
    "--resolve",
}


def config_source(argv: list[str], conf_dir: str, config_name: str) -> tuple[str, str, list[str]]:
    """(config dir, config name, overrides) after Hydra's --config-dir / --config-name flags."""
    overrides, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, _, inline = arg.partition("=")
        if name in ("-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name"):
            value = inline if inline else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if inline else 2
            if name in ("-cn", "--config-name"):
                config_name = value
            elif name in ("-cd", "--config-dir", "-cp", "--config-path"):
                conf_dir = str(Path(value).resolve())
            continue
        if not arg.startswith("-"):
            overrides.append(arg)
        i += 1
    return conf_dir, config_name, overrides


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    *parents, name = dotted.split(".")
    node = OmegaConf.select(cfg, ".".join(parents), default=None) if parents else cfg
    return isinstance(node, DictConfig) and name in node.keys()  # `in node` is false for a "???" value


def command_line_config(
    argv: list[str], conf_dir: str, config_name: str = "train"
) -> tuple[list[str], DictConfig | None]:
    """(every problem, the composed config) of a command line, composed once: unknown override keys (Hydra itself
    stops at the first) and everything `config_problems` finds (for train's resume=true, left to where the run's own
    settings are known: training.run). A sweep stands for its first choice; what Hydra must report
    itself (a syntax error, a missing group option) is left to it (no problems, no config)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    conf_dir, config_name, args = config_source(argv, conf_dir, config_name)
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # a syntax error: Hydra reports it
        return [], None
    sorted_ = _sorted_overrides(overrides, args, conf_dir, config_name)
    if sorted_ is None:  # a glob(...) sweep needs Hydra's loader: left to Hydra
        return [], None
    hydra_args, hydra_groups, groups, keys, not_here = sorted_
    if not_here:
        return not_here, None
    not_installed = missing_for_options([f"{k}={v}" for k, _, o in [*hydra_groups, *groups] for v in _choices(o)])
    if not_installed:  # the option itself comes with the package (a launcher plugin)
        return not_installed, None
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            missing = _missing_options([*hydra_groups, *groups], config_name, hydra_args)
            if missing:  # an optional group (experiment) would skip a misspelt option silently
                return missing, None
            # composed once, untyped (every problem is found below, not Hydra's first), without the key=value
            # overrides: those of unknown keys are reported, the others applied as Hydra applies them
            lenient = [f"schema={config_name}_unchecked", *hydra_args, *(t for _, t, _ in groups)]
            cfg = compose(config_name, overrides=lenient, return_hydra_config=True)
        unknown = [
            k for k, _, o in keys if not (o.is_add() or o.is_force_add() or o.is_delete()) and not _has_key(cfg, k)
        ]
        apply_overrides(OverridesParser.create().parse_overrides([t for k, t, _ in keys if k not in unknown]), cfg)
        not_installed = missing_for_config(cfg, config_name)  # Hydra's own node too: its sweeper, launcher, sampler
        with open_dict(cfg):
            del cfg["hydra"]
    except Exception as err:  # a missing group option is said here; anything else Hydra reports itself
        missing = getattr(err, "missing_cfg_file", None)
        options = getattr(err, "options", None)
        if missing and options is not None and "/" in missing:
            group, _, name = missing.rpartition("/")
            return [f"{group}={name}: no such option; choose one of {', '.join(options)}"], None
        return [], None
    schema = SCHEMAS.get(config_name)
    problems = [_unknown_key(k, cfg, schema) for k in unknown] + not_installed
    resuming = config_name == "train" and cfg.get("resume") is True  # runs the run's own settings: checked there
    if schema is not None and not resuming:
        try:
            problems += config_problems(cfg, schema)
        except ConfigError as err:  # a value that does not resolve
            problems += err.problems
    if config_name == "train":
        problems += _sweep_problems(args, cfg)
    return problems, cfg


def _sorted_overrides(overrides: list, args: list[str], conf_dir: str, config_name: str) -> tuple | None:
    """The command line's overrides by kind: (Hydra's own as typed, Hydra's group overrides, the command's group
    overrides, its key=value overrides, a problem for each group of another command); each (key, text, override)
    with a sweep's text standing for its first choice. None: a sweep that needs Hydra's loader (a glob)."""
    hydra_args, hydra_groups, groups, keys, not_here = [], [], [], [], []
    own_groups = option_groups(conf_dir, config_name)
    for override, arg in zip(overrides, args):
        key = override.key_or_group
        if _is_hydras(key):  # hydra.launcher.n_jobs=2, hydra/launcher=joblib: Hydra's own config
            hydra_args.append(arg)
            if "/" in key:
                hydra_groups.append((key, arg, override))
            continue
        try:
            value = next(iter(override.sweep_string_iterator())) if override.is_sweep_override() else None
        except Exception:
            return None
        text = arg if value is None else f"{arg.split('=', 1)[0]}={value}"
        if (Path(conf_dir) / key).is_dir() and key not in own_groups and key != "schema":
            not_here.append(
                f"{text}: {config_name} has no '{key}' option group; set its keys instead (--cfg job lists them)"
            )
            continue
        is_group = "/" in key or key in own_groups or key == "schema"
        (groups if is_group else keys).append((key, text, override))
    return hydra_args, hydra_groups, groups, keys, not_here


def _sweep_problems(args: list[str], cfg: DictConfig) -> list[str]:
    """An optimising sweep (hparams_search, a hydra/sweeper) minimises a validation metric only with a split."""
    optimizing = any(arg.startswith(("hparams_search=", "hydra/sweeper=")) for arg in args)
    metric, val_size = cfg.get("optimized_metric"), OmegaConf.select(cfg, "data.val_size", default=None)
    if optimizing and isinstance(metric, str) and metric.startswith("val") and not val_size:
        return [
            f"the sweep optimises optimized_metric={metric}, but data.val_size=0 holds no validation split: set "
            "data.val_size (a fraction, or a number of examples), or optimized_metric=train_loss"
        ]
    return []


def _is_hydras(key: str) -> bool:
    """A key or group of Hydra's own config (`hydra.sweeper.n_jobs`, `hydra/launcher`), not of the command's."""
    return key.replace("/", ".").split(".")[0] == "hydra"


def option_groups(conf_dir: str, config_name: str) -> set[str]:
    """The option groups a command's primary config selects in its defaults list (train: data, adapter, ...)."""
    import yaml

    path = Path(conf_dir) / f"{config_name}.yaml"
    if not path.is_file():
        return set()
    groups = set()
    for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults", []):
        if isinstance(entry, dict):
            for name in entry:
                words = str(name).split()
                if words[0] != "override" and words[-1] != "schema":  # schema: internal, the typing
                    groups.add(words[-1])
    return groups


def _missing_options(groups: list, config_name: str, hydra_args: list[str]) -> list[str]:
    """Every chosen option (each choice of a sweep) that none of Hydra's config sources holds (the package's conf/,
    hydra.searchpath, --config-dir), asked of Hydra's own loader inside an initialised Hydra."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    problems = []
    for key, _, override in groups:
        options = loader.get_group_options(key, config_name=config_name, overrides=hydra_args)
        for value in _choices(override):
            if options and value not in ("", "null") and value not in options:
                problems.append(f"{key}={value}: no such option; choose one of {', '.join(options)}")
    return problems


def _choices(override) -> list[str]:
    """The options a group override chooses: each choice of a sweep; none for `~group` or a glob(...) (that needs
    Hydra's loader: Hydra reports what it does not find)."""
    if override.is_delete():
        return []
    try:
        return list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_string()]
    except Exception:
        return []


def _free_form(schema: type | None, key: str) -> bool:
    """The key lies in a free-form mapping of the schema (trainer, logger, callbacks, ...): new keys need '+'."""
    node: Any = schema
    for part in key.split(".")[:-1]:
        if node is None or not dataclasses.is_dataclass(node):
            return node is not None
        node = typing.get_type_hints(node).get(part)
        node = next((a for a in typing.get_args(node) if a is not type(None)), node)  # X | None -> X
    return node is not None and not dataclasses.is_dataclass(node)


def _unknown_key(key: str, cfg: DictConfig, schema: type | None) -> str:
    """ "KEY: unknown key" with the nearest known names, then, where new keys are allowed, how to add one."""
    near = near_names(key, cfg)
    text = f"{key}: unknown key" + (f"; did you mean {', '.join(near)}?" if near else "")
    if _free_form(schema, key):
        text += f" (to add a new key write +{key}=...)"
    return text


def skips_check(argv: list[str]) -> bool:
    """Hydra's own informational runs (completion, help, printing the config): left to Hydra untouched."""
    return any(arg.split("=", 1)[0] in HYDRA_INFO_FLAGS for arg in argv)


def check_command_line(argv: list[str], conf_dir: str, config_name: str) -> DictConfig | None:
    """Before Hydra starts (and writes anything): print every problem of the command line's config and exit 2.
    Returns the composed config (None where the check was left to Hydra)."""
    from telechat_lab.errors import reported

    if skips_check(argv):
        return None
    problems, cfg = command_line_config(argv, conf_dir, config_name)
    if problems:
        with reported():
            raise ConfigError(problems)
    return cfg

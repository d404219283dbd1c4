"""The one-shot validator of a composed config: every unknown key, wrong type, out-of-range value and impossible
combination, an adapter target the model lacks, a logger's or callback's argument its class does not take (the
class named by `_target_` is imported to read its signature), collected and reported together in one
ConfigError, before anything is loaded."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from telechat_lab.adapter_kinds import ADAPTER_KINDS, contradictions
from telechat_lab.errors import ConfigError
from telechat_lab.stages import LOSSES, STAGES
from telechat_lab.stages import contradictions as stage_contradictions

from .schema import ADAPTER_TARGETS, TrainConfig


def _type_problem(value: Any, annotation: Any, meta: dict, where: str, problems: list[str]) -> None:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if value == "???":
        problems.append(f"{where}: required (give {where}=...)")
        return
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if value is None and annotation is not Any:
        problems.append(f"{where}: must be set (null is not allowed)")
    elif dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            problems.append(f"{where}={value!r}: expected a group of settings")
        else:
            _check_fields(value, annotation, where + ".", problems)
    elif annotation is Any:
        if (
            value is not None
            and meta.get("types")
            and (not isinstance(value, meta["types"]) or (isinstance(value, bool) and bool not in meta["types"]))
        ):
            problems.append(f"{where}={value!r}: expected {' or '.join(t.__name__ for t in meta['types'])}")
    elif origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}={value!r}: expected a list")
        else:
            for i, item in enumerate(value):
                _type_problem(item, args[0], {}, f"{where}[{i}]", problems)
    elif origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}={value!r}: expected a mapping")
        elif args and args[1] is not Any:
            for key, item in value.items():
                _type_problem(item, args[1], {}, f"{where}.{key}", problems)
    elif annotation is bool and not isinstance(value, bool):
        problems.append(f"{where}={value!r}: expected true or false")
    elif annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        problems.append(f"{where}={value!r}: expected a whole number")
    elif annotation is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        problems.append(f"{where}={value!r}: expected a number")
    elif annotation is str and not isinstance(value, str):
        problems.append(f"{where}={value!r}: expected a string")


def _value_problem(value: Any, meta: dict, where: str, problems: list[str]) -> None:
    if value is None or isinstance(value, (dict, list)):
        return
    if meta.get("choices") and value not in meta["choices"]:
        problems.append(f"{where}={value!r}: expected one of {', '.join(map(str, meta['choices']))}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        hint = f" ({meta['hint']})" if meta.get("hint") else ""
        if meta.get("min") is not None and value < meta["min"]:
            problems.append(f"{where}={value}: must be at least {meta['min']:g}{hint}")
        if meta.get("gt") is not None and value <= meta["gt"]:
            problems.append(f"{where}={value}: must be greater than {meta['gt']:g}{hint}")
        if meta.get("max") is not None and value > meta["max"]:
            problems.append(f"{where}={value}: must be at most {meta['max']:g}{hint}")


def _check_fields(values: dict, schema: type, prefix: str, problems: list[str]) -> None:
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in fields:
            problems.append(f"{where}: unknown key (known: {', '.join(sorted(fields))})")
            continue
        before = len(problems)
        _type_problem(value, hints[key], fields[key].metadata, where, problems)
        if len(problems) == before:
            _value_problem(value, fields[key].metadata, where, problems)


def field_meta(path: str, schema: type = TrainConfig) -> dict | None:
    """The metadata of the field at a dotted path ('data.cutoff_len'), None when the path is not a field."""
    *parents, name = path.split(".")
    for part in parents:
        hint = typing.get_type_hints(schema).get(part)
        args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
        schema = next((a for a in args if dataclasses.is_dataclass(a)), None)
        if schema is None:
            return None
    found = {f.name: f for f in dataclasses.fields(schema)}.get(name)
    return dict(found.metadata) if found is not None else None


# Lightning Trainer arguments the validator bounds, and those the hardware/logger/callbacks groups set instead
TRAINER_BOUNDS = {
    "accumulate_grad_batches": {"min": 1},
    "gradient_clip_val": {"min": 0},
    "max_epochs": {"min": -1},
    "min_epochs": {"min": 0},
    "check_val_every_n_epoch": {"min": 1},
    "num_sanity_val_steps": {"min": -1},
    "log_every_n_steps": {"min": 1},
}
TRAINER_MANAGED = {
    "accelerator",
    "devices",
    "strategy",
    "num_nodes",
    "precision",
    "logger",
    "callbacks",
    "default_root_dir",
    "use_distributed_sampler",
    "log_every_n_steps",
}


# lightning.pytorch.Trainer's arguments since Lightning 2.4 (setup.cfg's floor): a key among them is checked without
# importing Lightning (5 s of a config error's report); any other key against the installed Trainer's signature
# (tests/test_command_line.py checks this set against it)
TRAINER_ARGUMENTS = frozenset(
    "accelerator accumulate_grad_batches barebones benchmark callbacks check_val_every_n_epoch default_root_dir "
    "detect_anomaly deterministic devices enable_checkpointing enable_model_summary enable_progress_bar fast_dev_run "
    "gradient_clip_algorithm gradient_clip_val inference_mode limit_predict_batches limit_test_batches "
    "limit_train_batches limit_val_batches log_every_n_steps logger max_epochs max_steps max_time min_epochs "
    "min_steps num_nodes num_sanity_val_steps overfit_batches plugins precision profiler "
    "reload_dataloaders_every_n_epochs strategy sync_batchnorm use_distributed_sampler val_check_interval".split()
)


def trainer_arguments(keys) -> set[str]:
    """The arguments of lightning.pytorch.Trainer among `keys` (Lightning imported only for a key not known)."""
    keys = set(keys)
    if keys <= TRAINER_ARGUMENTS:
        return keys
    from lightning.pytorch import Trainer

    return keys & (set(inspect.signature(Trainer.__init__).parameters) - {"self"})


def _trainer_problems(trainer: dict, problems: list[str]) -> None:
    arguments = trainer_arguments(trainer)
    for key, value in trainer.items():
        where = f"trainer.{key}"
        if key in TRAINER_MANAGED:
            problems.append(
                f"{where}: set by train.py (logging_steps, and the hardware/logger/callbacks groups), not under trainer"
            )
        elif key not in arguments:
            problems.append(f"{where}: not an argument of lightning.pytorch.Trainer")
        elif key in TRAINER_BOUNDS:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                problems.append(f"{where}={value!r}: expected a number")
            else:
                _value_problem(value, TRAINER_BOUNDS[key], where, problems)
    steps = trainer.get("max_steps", -1)
    if isinstance(steps, bool) or not isinstance(steps, int) or (steps != -1 and steps < 1):
        problems.append(f"trainer.max_steps={steps!r}: a positive number of steps, or -1 for no limit")
    epochs = trainer.get("max_epochs")
    if epochs == 0:
        problems.append("trainer.max_epochs=0: trains nothing; a positive number of epochs, or -1 for no limit")
    batches = trainer.get("limit_train_batches")
    if batches is not None and not isinstance(batches, bool) and isinstance(batches, (int, float)) and batches <= 0:
        problems.append(
            f"trainer.limit_train_batches={batches!r}: trains nothing; a number of batches, or a fraction in (0, 1]"
        )
    if steps == -1 and epochs in (None, -1):
        problems.append("trainer.max_steps and trainer.max_epochs are both unlimited: set one of them")


def _cross_field_problems(values: dict, cuda_available: bool, problems: list[str]) -> None:
    adapter, hardware = values.get("adapter") or {}, values.get("hardware") or {}
    model, data = values.get("model") or {}, values.get("data") or {}
    kind = ADAPTER_KINDS.get(adapter.get("type"))
    problems += contradictions(adapter)
    if kind and kind.uses_peft and isinstance(adapter.get("dropout"), (int, float)) and adapter["dropout"] >= 1:
        problems.append(f"adapter.dropout={adapter['dropout']}: must be below 1")
    ds = hardware.get("deepspeed")
    if hardware.get("strategy") == "deepspeed":
        if not isinstance(ds, dict):
            problems.append("hardware.strategy=deepspeed needs hardware.deepspeed (stage, offload_...)")
        if hardware.get("accelerator") == "cpu" or not cuda_available:
            stage = ds.get("stage") if isinstance(ds, dict) else "?"
            problems.append(
                f"hardware={hardware.get('name')}: DeepSpeed ZeRO-{stage} needs CUDA GPUs "
                f"({'accelerator=cpu' if hardware.get('accelerator') == 'cpu' else 'none is visible'})"
            )
        if kind and kind.quantized:
            problems.append(f"adapter={kind.name} with DeepSpeed: bitsandbytes 4-bit weights cannot be sharded by ZeRO")
    if hardware.get("accelerator") in ("gpu", "cuda") and not cuda_available:
        problems.append(f"hardware.accelerator={hardware['accelerator']}: no CUDA GPU is visible (use hardware=cpu)")
    path = model.get("path")
    if isinstance(path, str) and path and not (Path(path).expanduser() / "config.json").is_file():
        problems.append(f"model.path={path}: no config.json there (a TeleChat2 checkpoint directory is expected)")
    if model.get("attn_implementation") == "flash_attention_2" and not cuda_available:
        problems.append("model.attn_implementation=flash_attention_2 needs a CUDA GPU (use sdpa)")
    if model.get("loss_implementation") == "liger" and not (cuda_available and find_spec("liger_kernel")):
        why = "no CUDA GPU is visible" if not cuda_available else "liger-kernel is not installed (the kernels extra)"
        problems.append(f"model.loss_implementation=liger: {why}; fused is the same method in plain torch")
    if data.get("padding_free") and data.get("packing"):
        problems.append("data.padding_free and data.packing: choose one")
    _stage_data_problems((values.get("stage") or {}).get("name"), data, problems)
    if data.get("streaming"):
        _streaming_problems((values.get("stage") or {}).get("name"), data, values.get("trainer") or {}, problems)
    val_size = data.get("val_size")
    if isinstance(val_size, (int, float)) and val_size >= 1 and val_size != int(val_size):
        problems.append(f"data.val_size={val_size}: a fraction below 1 or a whole number of examples")
    _stage_problems(values.get("stage") or {}, kind, adapter, hardware, problems)
    metric = values.get("optimized_metric")
    if isinstance(metric, str) and metric not in ("val_loss", "train_loss") and not metric.startswith("val/"):
        problems.append(
            f"optimized_metric={metric}: val_loss, train_loss or a logged validation metric (val/..., e.g. "
            "val/rewards/accuracies)"
        )
    if values.get("resume") and values.get("overwrite"):
        problems.append("resume=true and overwrite=true: choose one (continue the run, or clear it and start anew)")


def _stage_data_problems(stage: Any, data: dict, problems: list[str]) -> None:
    """Pairs and KTO examples are padded batches (no packing, no padding-free rows); KTO's KL rows pair each
    prompt with another example's completion of its batch: two examples a batch at least."""
    if stage not in STAGES or STAGES[stage].data not in ("pairwise", "kto"):
        return
    for key in ("packing", "padding_free"):
        if data.get(key):
            problems.append(f"data.{key}=true with stage={stage}: its sequences are padded batches; set it false")
    if STAGES[stage].data == "kto":
        for key in ("batch_size", "eval_batch_size"):
            if isinstance(data.get(key), int) and data[key] < 2:
                problems.append(f"data.{key}={data[key]} with stage=kto: its KL rows need two examples a batch")


def _streaming_problems(stage: Any, data: dict, trainer: dict, problems: list[str]) -> None:
    """A stream has no length known in advance (data/streaming.py): a step limit, a whole number of validation
    records, no mixing ratios; it streams raw text and conversations only."""
    if stage in STAGES and STAGES[stage].data not in ("sft", "pt"):
        problems.append(
            f"data.streaming=true with stage={stage}: only raw text (stage=pt) and conversations (stage=sft) "
            "stream; set data.streaming=false"
        )
    steps = trainer.get("max_steps", -1)
    if steps in (None, -1):
        problems.append(
            "data.streaming=true needs trainer.max_steps: a stream's length is not known in advance, so "
            "trainer.max_epochs cannot end the run (a stream repeats its files epoch after epoch)"
        )
    val_size = data.get("val_size")
    if isinstance(val_size, (int, float)) and 0 < val_size < 1:
        problems.append(
            f"data.val_size={val_size} with data.streaming=true: a fraction of a stream of unknown length; give a "
            "whole number of records (taken from the head of the stream) or 0"
        )
    if data.get("mix"):
        problems.append("data.mix with data.streaming=true: ratios need the datasets' sizes; remove data.mix")


def _reference_adapter_problems(
    directory: Path, given: str, kind: Any, adapter: dict, hardware: dict, problems: list[str]
) -> None:
    """stage.reference is an SFT adapter: merged into the base in memory, and the trained adapter saved stacked
    onto it (training/objectives.stack_onto_reference): what that cannot do is refused."""
    import json

    where = f"stage.reference={given}"
    fix = (
        "merge it first (python merge.py adapter_path=... export_dir=...) and give the merged model as stage.reference"
    )
    try:
        sft = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError) as err:
        problems.append(f"{where}: adapter_config.json is not readable JSON ({err})")
        return
    if sft.get("peft_type", "LORA") != "LORA":
        problems.append(f"{where}: a {sft.get('peft_type')} adapter; only LoRA / DoRA adapters can be a reference")
        return
    if hardware.get("strategy") == "deepspeed" and (hardware.get("deepspeed") or {}).get("stage") == 3:
        problems.append(f"{where}: an adapter cannot be merged into ZeRO-3's partitioned weights; {fix}")
    if kind is not None and kind.uses_peft:
        reasons = []
        if sft.get("use_dora") or kind.dora or adapter.get("use_dora"):
            reasons.append("DoRA adapters cannot be stacked into one")
        if sft.get("modules_to_save") or adapter.get("modules_to_save"):
            reasons.append("modules_to_save cannot be stacked")
        if sft.get("rank_pattern") or sft.get("alpha_pattern"):
            reasons.append("its rank_pattern / alpha_pattern cannot be stacked")
        if reasons:
            problems.append(f"{where} with adapter={kind.name}: {'; '.join(reasons)}; {fix}")


def _stage_problems(stage: dict, kind: Any, adapter: dict, hardware: dict, problems: list[str]) -> None:
    """stage.* settings against the stage, its loss, the adapter and the hardware."""
    from telechat_lab.stages import settings

    row = STAGES.get(stage.get("name")) if isinstance(stage, dict) else None
    if row is None:
        return
    problems += stage_contradictions(stage)
    # data.packing / padding_free and KTO's data.batch_size >= 2 are the data side's checks (H2's, the contract)
    reference = stage.get("reference")
    if isinstance(reference, str) and reference:
        directory = Path(reference).expanduser()
        if not ((directory / "adapter_config.json").is_file() or (directory / "config.json").is_file()):
            problems.append(
                f"stage.reference={reference}: neither an adapter (adapter_config.json) nor a model (config.json) "
                "is there (an SFT run's output_dir is expected)"
            )
        elif (directory / "adapter_config.json").is_file():
            _reference_adapter_problems(directory, reference, kind, adapter, hardware, problems)
    try:
        resolved = settings(stage)
    except (KeyError, TypeError):
        return
    loss = resolved.get("loss")
    referenced = row.preference and (row.name == "kto" or (loss in LOSSES and LOSSES[loss].uses_reference))
    ds = hardware.get("deepspeed") if isinstance(hardware.get("deepspeed"), dict) else {}
    if (
        referenced
        and kind is not None
        and not kind.uses_peft
        and not resolved.get("precompute_reference")
        and hardware.get("strategy") == "deepspeed"
        and ds.get("stage") == 3
    ):
        problems.append(
            f"stage={row.name} with adapter={kind.name} under ZeRO-3: the frozen reference copy would not be "
            "partitioned; set stage.precompute_reference=true (one pass before training, then one model in memory)"
        )


def _target_problems(adapter: Any, problems: list[str]) -> None:
    """adapter.target names modules the TeleChat2 blocks have ("all", a list, or comma-separated names)."""
    target = adapter.get("target") if isinstance(adapter, dict) else None
    if target == "all" or not isinstance(target, (str, list)):
        return
    names = [t.strip() for t in target.split(",")] if isinstance(target, str) else target
    unknown = [str(name) for name in names if name not in ADAPTER_TARGETS]
    if unknown:
        problems.append(
            f"adapter.target={target}: TeleChat2 has no module {', '.join(unknown)} "
            f"(its modules: {', '.join(ADAPTER_TARGETS)}, or all)"
        )


def shipped_entries(group: str) -> list[dict]:
    """The entries of conf/<group>/*.yaml ({_target_: ..., its arguments}, unresolved), as this package ships them."""
    entries = []
    for path in sorted((Path(__file__).resolve().parents[1] / "conf" / group).glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        entries += [v for k, v in node.items() if k != "defaults" and isinstance(v, dict) and "_target_" in v]
    return entries


def _instantiated_problems(group: Any, name: str, problems: list[str]) -> None:
    """Each entry of the logger / callbacks group, {_target_: a class, its arguments}: the class imports and the
    arguments bind to its signature (unknown and missing arguments by key). An entry exactly as conf/ ships it is
    not imported (Lightning's loggers: seconds of a config error's report); tests/test_command_line.py checks those."""
    from hydra.utils import get_class

    shipped = None
    for key, entry in (group or {}).items() if isinstance(group, dict) else ():
        target = entry.get("_target_") if isinstance(entry, dict) else None
        if not isinstance(target, str) or "${" in target:  # an interpolation: resolved only under Hydra's runtime
            continue
        shipped = shipped_entries(name) if shipped is None else shipped
        if entry in shipped:
            continue
        where = f"{name}.{key}"
        try:
            cls = get_class(target)
        except Exception as err:
            problems.append(f"{where}._target_={target}: cannot be imported ({err})")
            continue
        arguments = {k: v for k, v in entry.items() if not k.startswith("_")}
        parameters = inspect.signature(cls).parameters
        if "_args_" in entry or entry.get("_partial_"):  # positional or later arguments: left to the class
            continue
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            for argument in arguments:
                if argument not in parameters:
                    problems.append(f"{where}.{argument}: not an argument of {cls.__name__}")
        for argument, parameter in parameters.items():
            required = parameter.default is parameter.empty and parameter.kind not in (
                parameter.VAR_POSITIONAL,
                parameter.VAR_KEYWORD,
            )
            if required and argument not in arguments:
                problems.append(f"{where}.{argument}: required by {cls.__name__} (give +{where}.{argument}=...)")


LAZY_GROUPS = ("logger", "callbacks")  # their interpolations may need Hydra's runtime (the job's name, ...)


def config_values(cfg: DictConfig | dict) -> dict:
    """Plain values of a composed config: resolved (but not the LAZY_GROUPS), "???" where a required value is
    missing."""
    if isinstance(cfg, dict):
        return cfg
    values = {}
    for key in cfg:
        if key == "hydra":
            continue
        node, resolve = cfg._get_node(key), key not in LAZY_GROUPS
        try:
            if OmegaConf.is_missing(cfg, key):
                values[key] = "???"
            elif isinstance(node, (DictConfig, ListConfig)) and not node._is_none():
                values[key] = OmegaConf.to_container(node, resolve=resolve, throw_on_missing=False)
            else:
                values[key] = cfg[key] if resolve else node._value()
        except Exception as err:  # an interpolation that cannot resolve
            raise ConfigError([f"{key}: does not resolve ({err})"]) from err
    return values


def config_problems(
    cfg: DictConfig | dict, schema: type = TrainConfig, cuda_available: bool | None = None
) -> list[str]:
    """Every problem of a composed config, as one line each (empty: it is valid)."""
    values = config_values(cfg)
    problems: list[str] = []
    _check_fields(values, schema, "", problems)
    if schema is TrainConfig:
        if cuda_available is None:
            cuda_available = _CudaAvailable()  # torch is imported only where a check needs to know
        trainer = values.get("trainer")
        if isinstance(trainer, dict):
            _trainer_problems(trainer, problems)
        _cross_field_problems(values, cuda_available, problems)
        _target_problems(values.get("adapter"), problems)
        for group in LAZY_GROUPS:
            _instantiated_problems(values.get(group), group, problems)
    return problems


class _CudaAvailable:
    """`torch.cuda.is_available()`, asked (and torch imported: seconds) the first time it is read as a bool."""

    value: bool | None = None

    def __bool__(self) -> bool:
        if self.value is None:
            import torch

            self.value = torch.cuda.is_available()
        return self.value


def validate(cfg: DictConfig | dict, schema: type = TrainConfig, cuda_available: bool | None = None) -> None:
    """Raise ConfigError listing every problem of `cfg` (a composed config of `schema`)."""
    problems = config_problems(cfg, schema, cuda_available)
    if problems:
        raise ConfigError(problems)

"""The settings of every command, defined once: one dataclass per config group, registered with Hydra as the
schema of `conf/` (so the YAML files are typed against it), plus the one-shot validator that reports every
unknown key, wrong type, out-of-range value and impossible combination together, before anything is loaded.

Each field's metadata says what the validator checks (`choices`, `min` / `gt` bounds, `types` for fields that
take several) and whether it may change when a run is resumed (`on_resume`: "fixed" by default, "free" for
settings that only affect logging or speed, "grow" for limits that may only be raised).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from telechat_lab.errors import ConfigError

__all__ = [
    "ChatConfig",
    "ConfigError",
    "DataConfig",
    "InspectConfig",
    "MergeConfig",
    "TrainConfig",
    "check_command_line",
    "command_line_config",
    "config_problems",
    "register_schemas",
    "validate",
]


def setting(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    choices: tuple = (),
    min: float | None = None,
    gt: float | None = None,
    types: tuple = (),
    on_resume: str = "fixed",
    hint: str = "",
) -> Any:
    """A dataclass field with what the validator checks (see the module docstring); `hint` is added to its
    out-of-range message."""
    meta = {"choices": choices, "min": min, "gt": gt, "types": types, "on_resume": on_resume, "hint": hint}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


FREE, GROW = "free", "grow"
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    path: str | None = None  # a TeleChat2 checkpoint directory; null: the tiny random model (written on first use)
    name: str = "tiny"
    attn_implementation: str = setting("auto", choices=("auto", "sdpa", "eager", "flash_attention_2"))
    dtype: str = setting("auto", choices=DTYPE_NAMES)  # auto: fp32 master weights for mixed precision
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    """The `data` group: datasets and their encoding (LLaMA-Factory option names where one exists)."""

    dataset_dir: str = "data"  # holds dataset_info.json; relative: the working dir, else the bundled demo data
    datasets: Any = setting(
        factory=lambda: ["identity", "alpaca_en_demo", "sharegpt_tools_demo", "telechat_demo"], types=(list, str)
    )  # a list, or "a,b"
    mix: dict[str, float] | None = None  # {name: ratio}: 1.5 = every example plus half again (seeded)
    max_samples: int | None = setting(None, min=1, hint="null takes every record")  # per dataset: its first N
    val_size: float = setting(
        0.05, min=0, hint="0: no validation"
    )  # fraction (< 1) or number of examples held out for validation
    cutoff_len: int = setting(1024, min=8)
    packing: bool = False  # several examples per row, no attention across them
    padding_free: bool = False  # a whole batch as one row with no padding (flash attention)
    train_on_prompt: bool = False
    mask_history: bool = False  # train only the last reply of each conversation
    train_role_tokens: bool = False  # also train each trained turn's <_user> and <_bot> (the release's SFT recipe)
    default_system: str | None = None  # null: TeleChat's default system prompt; "": no system block
    placeholders: dict[str, str] = field(default_factory=lambda: {"name": "TeleChat-Lab", "author": "telechat-lab"})
    fill_placeholders: list[str] = field(default_factory=lambda: ["identity"])  # datasets whose {{...}} are filled
    on_bad_record: str = setting("error", choices=("error", "skip"))  # skip: drop bad records, counted per reason
    preprocessing_num_workers: int = setting(1, min=1, on_resume=FREE)
    cache_dir: str | None = setting(None, on_resume=FREE)  # encoded datasets; default $TELECHAT_LAB_CACHE
    overwrite_cache: bool = setting(False, on_resume=FREE)
    seed: int = 42
    batch_size: int = setting(4, min=1)  # per device (rows when packing)
    eval_batch_size: int = setting(4, min=1, on_resume=FREE)
    dataloader_num_workers: int = setting(0, min=0, on_resume=FREE)


@dataclass
class QuantizationConfig:
    bits: int = setting(4, choices=(4, 8))
    quant_type: str = setting("nf4", choices=("nf4", "fp4"))
    double_quant: bool = True
    compute_dtype: str = setting("bfloat16", choices=DTYPE_NAMES[1:])


@dataclass
class AdapterConfig:
    type: str = setting("lora", choices=("lora", "dora", "qlora", "full", "freeze"))
    rank: int = setting(8, min=1)
    alpha: float = setting(16.0, gt=0)
    dropout: float = setting(0.0, min=0)
    target: Any = setting("all", types=(str, list))  # all = every linear layer of the blocks, or a list
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(rank)
    modules_to_save: list[str] | None = None  # e.g. [lm_head] (LoRA) or [ln_f] (freeze)
    use_dora: bool = False
    quantization: QuantizationConfig | None = None
    trainable_layers: int = setting(2, min=1)  # freeze: the last N blocks are trained


@dataclass
class DeepSpeedConfig:
    stage: int = setting(2, choices=(1, 2, 3))
    offload_optimizer: bool = False
    offload_params: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed config last


@dataclass
class HardwareConfig:
    name: str = setting("auto", on_resume=FREE)
    accelerator: str = setting("auto", choices=("auto", "cpu", "gpu", "cuda"), on_resume=FREE)
    devices: Any = setting("auto", types=(int, str, list))
    num_nodes: int = setting(1, min=1)
    strategy: str = setting("auto", choices=("auto", "ddp", "deepspeed"))
    precision: str = "auto"  # auto: bf16-mixed on a bf16 GPU, 16-mixed on other GPUs, 32-true on CPU
    ddp_timeout: int = setting(1800, min=1, on_resume=FREE)  # seconds
    process_group_backend: str | None = setting(None, on_resume=FREE)  # null: nccl on GPU, gloo on CPU
    deepspeed: DeepSpeedConfig | None = None
    peak_tflops: float | None = setting(None, gt=0, on_resume=FREE)  # for MFU where Lightning does not know it


@dataclass
class OptimConfig:
    lr: float = setting(2e-4, gt=0)
    weight_decay: float = setting(0.0, min=0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = setting(1e-8, gt=0)
    fused: Any = setting("auto", types=(bool, str), choices=("auto", True, False))  # auto: fused kernels on CUDA
    scheduler: str = setting("cosine", choices=("cosine", "linear", "constant"))
    warmup_steps: int = setting(0, min=0)
    warmup_ratio: float = setting(0.0, min=0)  # used when warmup_steps is 0
    min_lr_ratio: float = setting(0.0, min=0)  # cosine floor, as a fraction of lr


@dataclass
class TrainConfig:
    """`python train.py` (conf/train.yaml)."""

    task_name: str = setting("train", on_resume=FREE)
    output_dir: str = setting("outputs/${task_name}/${now:%Y-%m-%d_%H-%M-%S}", on_resume=FREE)
    seed: int = 42
    resume: bool = setting(False, on_resume=FREE)  # continue the run in output_dir from its newest checkpoint
    overwrite: bool = setting(False, on_resume=FREE)  # clear a used output_dir (one written by telechat-lab) first
    logging_steps: int = setting(1, min=1, on_resume=FREE)
    save_steps: int = setting(100, min=1, on_resume=FREE)  # checkpoint every N optimizer steps, and at the end
    save_total_limit: int | None = setting(3, min=1, on_resume=FREE)  # newest N checkpoints kept; null: all
    plot_loss: bool = setting(True, on_resume=FREE)
    nan_policy: str = setting("stop", choices=("stop", "skip"), on_resume=FREE)  # on a NaN/inf loss or grad norm
    nan_max_skips: int = setting(10, min=1, on_resume=FREE)  # nan_policy=skip: stop after this many skipped steps
    optimized_metric: str = setting("val_loss", on_resume=FREE)  # what a sweep (Optuna) minimises
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    trainer: dict[str, Any] = field(default_factory=dict)  # any lightning.pytorch.Trainer argument
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: dict[str, Any] | None = setting(None, on_resume=FREE)  # name -> {_target_: a Lightning logger, ...}
    callbacks: dict[str, Any] | None = setting(None, on_resume=FREE)  # name -> {_target_: a Lightning callback}


@dataclass
class GenerationConfig:
    max_new_tokens: int = setting(512, min=1)
    do_sample: bool = True
    temperature: float = setting(0.7, min=0)
    top_p: float = setting(0.9, gt=0)
    top_k: int = setting(50, min=0)
    repetition_penalty: float = setting(1.05, gt=0)


@dataclass
class VLLMConfig:
    max_model_len: int | None = setting(None, min=1)  # null: the model's training_seqlen
    gpu_memory_utilization: float = setting(0.9, gt=0)
    tensor_parallel_size: int = setting(1, min=1)
    max_lora_rank: int = setting(64, min=1)


@dataclass
class ChatModelConfig:
    path: str | None = None  # a checkpoint or merged directory; null: the adapter's base
    dtype: str = setting("auto", choices=DTYPE_NAMES)
    attn_implementation: str = setting("auto", choices=("auto", "sdpa", "eager", "flash_attention_2"))


@dataclass
class ChatConfig:
    """`python chat.py` (conf/chat.yaml)."""

    model: ChatModelConfig = field(default_factory=ChatModelConfig)
    adapter_path: Any = setting(None, types=(str, list))  # applied without merging (a list stacks several)
    infer_backend: str = setting("huggingface", choices=("huggingface", "vllm"))
    system: str | None = None  # the system prompt; null: TeleChat's default
    default_system: str | None = None  # what null above means (as data.default_system; "" = no system block)
    device: str = "auto"
    max_input_tokens: int | None = setting(None, min=1)  # null: the model's training_seqlen minus max_new_tokens
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    input: str | None = None  # batch mode: a prompts file (text lines or JSON lines), or - for stdin
    output: str | None = None  # batch mode: JSONL answers, written when every answer is ready (default: stdout)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class MergeModelConfig:
    path: str | None = None  # the base; null: the adapter's base_model_name_or_path


@dataclass
class MergeConfig:
    """`python merge.py` (conf/merge.yaml)."""

    model: MergeModelConfig = field(default_factory=MergeModelConfig)
    adapter_path: Any = setting("???", types=(str, list))  # an adapter directory, or a list merged in order
    export_dir: str = "???"
    export_size: float = setting(5.0, gt=0)  # shard size in GB
    export_device: str = setting("cpu", choices=("cpu", "auto"))
    export_legacy_format: bool = False  # false: safetensors; true: pytorch_model.bin
    dtype: str = setting("auto", choices=DTYPE_NAMES)  # auto: bfloat16 for an fp32 base, else the base's


@dataclass
class InspectConfig:
    """`python -m telechat_lab.data.inspect` (conf/inspect.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: str | None = None  # JSON lines {"input_ids", "labels"}, one per encoded example, in dataset order
    show: int = setting(3, min=0)  # examples printed with their trained tokens highlighted
    seed: int = 42


SCHEMAS: dict[str, type] = {"train": TrainConfig, "chat": ChatConfig, "merge": MergeConfig, "inspect": InspectConfig}


def register_schemas() -> None:
    """Make the dataclasses the `schema` group Hydra composes each primary config onto (`defaults: [schema: X]`),
    and an untyped copy of each (`schema=X_unchecked`: the same keys and defaults, no type checks) that the
    command-line check composes onto, so that every bad value reaches `config_problems` at once."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(group="schema", name=name, node=schema, package="_global_")
        store.store(group="schema", name=f"{name}_unchecked", node=dataclasses.asdict(schema()), package="_global_")


register_schemas()


# ------------------------------------------------------------------------------------------------ validation


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


def _trainer_problems(trainer: dict, problems: list[str]) -> None:
    from lightning.pytorch import Trainer

    arguments = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
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
    if steps == -1 and epochs in (None, -1):
        problems.append("trainer.max_steps and trainer.max_epochs are both unlimited: set one of them")


def _cross_field_problems(values: dict, cuda_available: bool, problems: list[str]) -> None:
    adapter, hardware = values.get("adapter") or {}, values.get("hardware") or {}
    model, data = values.get("model") or {}, values.get("data") or {}
    kind, quant = adapter.get("type"), adapter.get("quantization")
    if quant and kind in ("full", "freeze"):
        problems.append(
            f"adapter.quantization with adapter.type={kind}: a quantised base cannot be trained "
            "directly; use adapter=qlora"
        )
    if kind == "qlora" and not quant:
        problems.append("adapter=qlora needs adapter.quantization (bits, quant_type, ...)")
    if (
        kind in ("lora", "dora", "qlora")
        and isinstance(adapter.get("dropout"), (int, float))
        and adapter["dropout"] >= 1
    ):
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
        if kind == "qlora":
            problems.append("adapter=qlora with DeepSpeed: bitsandbytes 4-bit weights cannot be sharded by ZeRO")
    if hardware.get("accelerator") in ("gpu", "cuda") and not cuda_available:
        problems.append(f"hardware.accelerator={hardware['accelerator']}: no CUDA GPU is visible (use hardware=cpu)")
    path = model.get("path")
    if isinstance(path, str) and path and not (Path(path).expanduser() / "config.json").is_file():
        problems.append(f"model.path={path}: no config.json there (a TeleChat2 checkpoint directory is expected)")
    if model.get("attn_implementation") == "flash_attention_2" and not cuda_available:
        problems.append("model.attn_implementation=flash_attention_2 needs a CUDA GPU (use sdpa)")
    if data.get("padding_free") and data.get("packing"):
        problems.append("data.padding_free and data.packing: choose one")
    val_size = data.get("val_size")
    if isinstance(val_size, (int, float)) and val_size >= 1 and val_size != int(val_size):
        problems.append(f"data.val_size={val_size}: a fraction below 1 or a whole number of examples")
    if values.get("resume") and values.get("overwrite"):
        problems.append("resume=true and overwrite=true: choose one (continue the run, or clear it and start anew)")


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
            raise ConfigError(f"invalid configuration:\n  - {key}: does not resolve ({err})") from err
    return values


def config_problems(
    cfg: DictConfig | dict, schema: type = TrainConfig, cuda_available: bool | None = None
) -> list[str]:
    """Every problem of a composed config, as one line each (empty: it is valid)."""
    values = config_values(cfg)
    problems: list[str] = []
    _check_fields(values, schema, "", problems)
    if schema is TrainConfig:
        import torch

        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        trainer = values.get("trainer")
        if isinstance(trainer, dict):
            _trainer_problems(trainer, problems)
        _cross_field_problems(values, cuda_available, problems)
    return problems


def validate(cfg: DictConfig | dict, schema: type = TrainConfig, cuda_available: bool | None = None) -> None:
    """Raise ConfigError listing every problem of `cfg` (a composed config of `schema`)."""
    problems = config_problems(cfg, schema, cuda_available)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


# ------------------------------------------------------------------------------------------------ command line

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


def _config_source(argv: list[str], conf_dir: str, config_name: str) -> tuple[str, str, list[str]]:
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
    """(every problem, the composed config) of a command line: unknown override keys (Hydra itself stops at the
    first) and everything `config_problems` finds. A sweep stands for its first choice; what Hydra must report
    itself (a syntax error, a missing group option) is left to it (no problems, no config)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    conf_dir, config_name, args = _config_source(argv, conf_dir, config_name)
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # a syntax error: Hydra reports it
        return [], None
    hydra_args, groups, keys = [], [], []
    for override, arg in zip(overrides, args):
        key = override.key_or_group
        if key.split(".")[0] == "hydra":
            hydra_args.append(arg)
            continue
        try:  # a sweep stands for its first choice; a glob(...) needs Hydra's loader: give up
            value = next(iter(override.sweep_string_iterator())) if override.is_sweep_override() else None
        except Exception:
            return [], None
        text = arg if value is None else f"{arg.split('=', 1)[0]}={value}"
        is_group = "/" in key or (Path(conf_dir) / key).is_dir() or key == "schema"
        (groups if is_group else keys).append((key, text, override))
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            lenient = [f"schema={config_name}_unchecked", *hydra_args, *(t for _, t, _ in groups)]
            plain = compose(config_name, overrides=lenient)
            unknown = [
                k
                for k, _, o in keys
                if not (o.is_add() or o.is_force_add() or o.is_delete()) and not _has_key(plain, k)
            ]
            known = [t for k, t, _ in keys if k not in unknown]
            cfg = compose(config_name, overrides=[*lenient, *known])
    except Exception:  # let Hydra report what is wrong with the groups
        return [], None
    problems = [f"{k}: unknown key (to add a new key write +{k}=...)" for k in unknown]
    schema = SCHEMAS.get(config_name)
    if schema is not None:
        try:
            problems += config_problems(cfg, schema)
        except ConfigError as err:
            problems += [line.removeprefix("  - ") for line in str(err).splitlines()[1:]]
    return problems, cfg


def skips_check(argv: list[str]) -> bool:
    """Hydra's own informational runs (completion, help, printing the config): left to Hydra untouched."""
    return any(arg.split("=", 1)[0] in HYDRA_INFO_FLAGS for arg in argv)


def exit_with_problems(problems: list[str]) -> None:
    import sys

    print("error: invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
    sys.exit(2)


def check_command_line(argv: list[str], conf_dir: str, config_name: str) -> DictConfig | None:
    """Before Hydra starts (and writes anything): print every problem of the command line's config and exit 2.
    Returns the composed config (None where the check was left to Hydra)."""
    if skips_check(argv):
        return None
    problems, cfg = command_line_config(argv, conf_dir, config_name)
    if problems:
        exit_with_problems(problems)
    return cfg

"""The one-shot validator of a composed training config: every unknown key, wrong type and impossible
combination is collected, then reported together in one error, before any model is loaded."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

ANY = object()
NUM = (int, float)
OPT_STR = (str, type(None))

# group -> key -> allowed python types (or a tuple of allowed literal values)
SCHEMA: dict[str, dict[str, Any]] = {
    "model": {"path": OPT_STR, "name": str, "attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
              "dtype": ("auto", "float32", "bfloat16", "float16"), "gradient_checkpointing": bool},
    "adapter": {"type": ("lora", "dora", "qlora", "full", "freeze"), "rank": int, "alpha": NUM, "dropout": NUM,
                "target": (str, list), "rslora": bool, "modules_to_save": (list, type(None)), "use_dora": bool,
                "quantization": (dict, type(None)), "trainable_layers": int},
    "hardware": {"name": str, "accelerator": ("auto", "cpu", "gpu", "cuda"), "devices": (int, str, list),
                 "num_nodes": int, "strategy": ("auto", "ddp", "deepspeed"), "precision": str, "ddp_timeout": int,
                 "process_group_backend": (str, type(None)), "deepspeed": (dict, type(None)),
                 "peak_tflops": (int, float, type(None))},
    "optim": {"name": ("adamw", "adamw_torch", "adamw_torch_fused"), "lr": NUM, "weight_decay": NUM, "betas": list,
              "eps": NUM, "fused": (bool, str), "scheduler": ("cosine", "linear", "constant"), "warmup_steps": int,
              "warmup_ratio": NUM, "min_lr_ratio": NUM},
    "data": {"dataset_dir": str, "datasets": (list, str), "mix": (dict, type(None)), "max_samples": (int, type(None)),
             "val_size": NUM, "cutoff_len": int, "packing": bool, "padding_free": bool, "train_on_prompt": bool,
             "mask_history": bool, "train_role_tokens": bool, "default_system": OPT_STR, "placeholders": dict, "fill_placeholders": list,
             "preprocessing_num_workers": int, "cache_dir": OPT_STR, "overwrite_cache": bool, "seed": int,
             "batch_size": int, "eval_batch_size": int, "dataloader_num_workers": int},
    "": {"task_name": str, "output_dir": str, "seed": int, "resume": bool, "logging_steps": int, "save_steps": int,
         "plot_loss": bool, "include_num_input_tokens_seen": bool, "optimized_metric": str, "model": dict,
         "data": dict, "adapter": dict, "hardware": dict, "trainer": dict, "optim": dict, "logger": (dict, type(None)),
         "callbacks": (dict, type(None)), "experiment": ANY, "hparams_search": ANY, "debug": ANY},
}
QUANT_KEYS = {"bits": (4, 8), "quant_type": ("nf4", "fp4"), "double_quant": bool,
              "compute_dtype": ("bfloat16", "float16", "float32")}
DEEPSPEED_KEYS = {"stage": (1, 2, 3), "offload_optimizer": bool, "offload_params": bool, "overrides": dict}


class ConfigError(ValueError):
    pass


def _check(value: Any, allowed: Any) -> bool:
    if allowed is ANY:
        return True
    if isinstance(allowed, tuple) and allowed and not isinstance(allowed[0], type):
        return value in allowed
    if allowed in (int, (int, type(None))) or (isinstance(allowed, tuple) and int in allowed and bool not in allowed):
        if isinstance(value, bool):
            return False
    return isinstance(value, allowed)


def _describe(allowed: Any) -> str:
    if isinstance(allowed, tuple) and allowed and not isinstance(allowed[0], type):
        return "one of " + ", ".join(map(repr, allowed))
    types = allowed if isinstance(allowed, tuple) else (allowed,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _check_group(problems: list[str], prefix: str, values: dict, schema: dict[str, Any]) -> None:
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in schema:
            problems.append(f"{where}: unknown key (known: {', '.join(sorted(schema))})")
        elif not _check(value, schema[key]):
            problems.append(f"{where}={value!r}: expected {_describe(schema[key])}")


def validate(cfg: DictConfig, cuda_available: bool | None = None) -> None:
    """Raise ConfigError listing every problem of `cfg` (a composed conf/train.yaml)."""
    import torch
    from lightning.pytorch import Trainer

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    problems: list[str] = []
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # an interpolation that cannot resolve
        raise ConfigError(f"the config does not resolve: {err}") from err
    values.pop("hydra", None)
    _check_group(problems, "", values, SCHEMA[""])
    for group in ("model", "adapter", "hardware", "optim", "data"):
        if isinstance(values.get(group), dict):
            _check_group(problems, f"{group}.", values[group], SCHEMA[group])
    trainer_args = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    managed = {"accelerator", "devices", "strategy", "num_nodes", "precision", "logger", "callbacks",
               "default_root_dir"}
    for key in values.get("trainer") or {}:
        if key in managed:
            problems.append(f"trainer.{key}: set by the hardware/logger/callbacks groups, not under trainer")
        elif key not in trainer_args:
            problems.append(f"trainer.{key}: not an argument of lightning.pytorch.Trainer")

    adapter, hardware = values.get("adapter") or {}, values.get("hardware") or {}
    model, data, optim = values.get("model") or {}, values.get("data") or {}, values.get("optim") or {}
    kind = adapter.get("type")
    quant = adapter.get("quantization")
    if isinstance(quant, dict):
        _check_group(problems, "adapter.quantization.", quant, QUANT_KEYS)
        if kind in ("full", "freeze"):
            problems.append(f"adapter.quantization with adapter.type={kind}: a quantised base cannot be trained "
                            "directly; use adapter=qlora")
    if kind == "qlora" and not quant:
        problems.append("adapter=qlora needs adapter.quantization (bits, quant_type, ...)")
    if kind in ("lora", "dora", "qlora"):
        if isinstance(adapter.get("rank"), int) and adapter["rank"] <= 0:
            problems.append(f"adapter.rank={adapter['rank']}: must be positive")
        if isinstance(adapter.get("dropout"), NUM) and not 0 <= adapter["dropout"] < 1:
            problems.append(f"adapter.dropout={adapter['dropout']}: must be in [0, 1)")
    if kind == "freeze" and isinstance(adapter.get("trainable_layers"), int) and adapter["trainable_layers"] <= 0:
        problems.append("adapter.trainable_layers must be positive")

    ds = hardware.get("deepspeed")
    if hardware.get("strategy") == "deepspeed":
        if not isinstance(ds, dict):
            problems.append("hardware.strategy=deepspeed needs hardware.deepspeed (stage, offload_...)")
        else:
            _check_group(problems, "hardware.deepspeed.", ds, DEEPSPEED_KEYS)
        if hardware.get("accelerator") == "cpu" or not cuda_available:
            stage = ds.get("stage") if isinstance(ds, dict) else "?"
            problems.append(f"hardware={hardware.get('name')}: DeepSpeed ZeRO-{stage} needs CUDA GPUs "
                            f"({'accelerator=cpu' if hardware.get('accelerator') == 'cpu' else 'none is visible'})")
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
    if isinstance(data.get("cutoff_len"), int) and data["cutoff_len"] < 8:
        problems.append(f"data.cutoff_len={data['cutoff_len']}: too small")
    if isinstance(optim.get("lr"), NUM) and optim["lr"] <= 0:
        problems.append(f"optim.lr={optim['lr']}: must be positive")
    for key in ("logging_steps", "save_steps"):
        if isinstance(values.get(key), int) and values[key] <= 0:
            problems.append(f"{key}={values[key]}: must be positive")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def unknown_override_keys(argv: list[str], conf_dir: str, config_name: str) -> list[str]:
    """Every `key=value` command-line override whose key is not in the composed config (Hydra itself
    stops at the first one). Group choices (adapter=dora), `+`/`~` overrides and hydra.* are not keys."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except Exception:  # a syntax error: Hydra reports it
        return []
    groups, keys = [], []
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_delete() or o.is_force_add() or key.split(".")[0] == "hydra":
            continue
        if "/" in key or (Path(conf_dir) / key).is_dir():
            try:  # a sweep stands for its first choice; a glob(...) needs Hydra's loader: give up
                value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.value()
            except Exception:
                return []
            groups.append(f"{key}={value}")
        else:
            keys.append(key)
    if not keys:
        return []
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name, overrides=groups)
    except Exception:  # let Hydra report what is wrong with the groups
        return []
    missing = object()
    return [k for k in keys if OmegaConf.select(cfg, k, default=missing) is missing]


def exit_on_unknown_overrides(argv: list[str], conf_dir: str, config_name: str) -> None:
    unknown = unknown_override_keys(argv, conf_dir, config_name)
    if unknown:
        import sys

        lines = [f"  - {k}: unknown key (to add a new key write +{k}=...)" for k in unknown]
        print("invalid configuration:\n" + "\n".join(lines), file=sys.stderr)
        sys.exit(2)

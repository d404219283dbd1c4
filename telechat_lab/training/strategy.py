"""The hardware group -> Lightning Trainer arguments (accelerator, devices, strategy, precision)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch


def deepspeed_config(ds: dict, precision: str) -> dict:
    """A DeepSpeed config generated from the group; deepspeed.overrides is merged in last. Batch size,
    gradient accumulation and clipping are Lightning's (trainer.*): it writes them into the config."""
    stage = ds["stage"]
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": 5e8}
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_prefetch_bucket_size=5e8,
                    stage3_param_persistence_threshold=1e6)
    if ds.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.get("offload_params"):
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {"zero_optimization": zero, "bf16": {"enabled": precision.startswith("bf16")},
              "fp16": {"enabled": precision.startswith("16")}, "zero_allow_untested_optimizer": True}
    return _merge(config, ds.get("overrides") or {})


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_precision(hardware: dict, on_gpu: bool) -> str:
    precision = hardware.get("precision", "auto")
    if precision != "auto":
        return precision
    if not on_gpu:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def trainer_arguments(hardware: dict, trainer: dict) -> dict:
    on_gpu = hardware.get("accelerator") in ("gpu", "cuda") or (
        hardware.get("accelerator") == "auto" and torch.cuda.is_available())
    accelerator = "gpu" if on_gpu else "cpu"
    precision = resolve_precision(hardware, on_gpu)
    devices = hardware.get("devices", "auto")
    if devices == "auto" and not on_gpu:
        devices = 1
    args = {"accelerator": accelerator, "devices": devices, "num_nodes": hardware.get("num_nodes", 1),
            "precision": precision}
    strategy = hardware.get("strategy", "auto")
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        backend = hardware.get("process_group_backend") or ("nccl" if on_gpu else "gloo")
        args["strategy"] = DDPStrategy(timeout=timedelta(seconds=hardware.get("ddp_timeout", 1800)),
                                       process_group_backend=backend)
    elif strategy == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        args["strategy"] = DeepSpeedStrategy(config=deepspeed_config(hardware["deepspeed"], precision))
    return args

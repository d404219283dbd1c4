"""The hardware group -> Lightning Trainer arguments (accelerator, devices, strategy, precision)."""

from __future__ import annotations

from datetime import timedelta

import torch

from telechat_lab.config import DeepSpeedConfig, HardwareConfig


def resolve_precision(hardware: HardwareConfig, on_gpu: bool) -> str:
    if hardware.precision != "auto":
        return hardware.precision
    if not on_gpu:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def deepspeed_arguments(ds: DeepSpeedConfig, exclude_frozen: bool) -> dict:
    """DeepSpeedStrategy's own arguments for the group (it builds the DeepSpeed config from them; batch size,
    accumulation, clipping and precision are Lightning's, from trainer.* and hardware.precision)."""
    offload = ds.offload_optimizer or ds.offload_params
    return {
        "stage": ds.stage,
        "offload_optimizer": ds.offload_optimizer,
        "offload_parameters": ds.offload_params,
        "pin_memory": offload,
        "exclude_frozen_parameters": exclude_frozen,
    }


def trainer_arguments(hardware: HardwareConfig, exclude_frozen: bool = False) -> dict:
    """`exclude_frozen`: an adapter run, whose DeepSpeed checkpoints need not hold the frozen base."""
    on_gpu = hardware.accelerator in ("gpu", "cuda") or (hardware.accelerator == "auto" and torch.cuda.is_available())
    devices = hardware.devices
    if devices == "auto" and not on_gpu:
        devices = 1
    args = {
        "accelerator": "gpu" if on_gpu else "cpu",
        "devices": devices,
        "num_nodes": hardware.num_nodes,
        "precision": resolve_precision(hardware, on_gpu),
    }
    timeout = timedelta(seconds=hardware.ddp_timeout)
    if hardware.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        backend = hardware.process_group_backend or ("nccl" if on_gpu else "gloo")
        args["strategy"] = DDPStrategy(timeout=timeout, process_group_backend=backend)
    elif hardware.strategy == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy
        from omegaconf import OmegaConf

        strategy = DeepSpeedStrategy(
            **deepspeed_arguments(hardware.deepspeed, exclude_frozen),
            timeout=timeout,
            process_group_backend=hardware.process_group_backend,
        )
        if hardware.deepspeed.overrides:  # merged into the config DeepSpeedStrategy generated
            strategy.config = OmegaConf.to_container(OmegaConf.merge(strategy.config, hardware.deepspeed.overrides))
        args["strategy"] = strategy
    return args

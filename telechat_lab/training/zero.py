"""DeepSpeed ZeRO-3, where every rank holds only a slice of each parameter: loading a checkpoint straight into
the slices, writing Hugging Face files from whole (gathered) tensors, and the sizes of partitioned parameters.

Lightning's DeepSpeedStrategy opens `deepspeed.zero.Init` around `configure_model`, so the model is created
partitioned; transformers' DeepSpeed integration then loads each module's weights on rank 0 into the gathered
module and partitions them again (the checkpoint is read from disk on rank 0's host, memory-mapped; no GPU ever
holds the whole model). Writing gathers one module at a time onto rank 0's host."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from telechat_lab.private_apis import persistent_buffers


def uses_deepspeed(trainer) -> bool:
    """Whether `trainer` (a Lightning Trainer, or None) runs a DeepSpeed strategy."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(getattr(trainer, "strategy", None), DeepSpeedStrategy)


def zero3_config(trainer) -> dict | None:
    """The DeepSpeed config when `trainer` runs DeepSpeed ZeRO stage 3, else None."""
    strategy = getattr(trainer, "strategy", None)
    if uses_deepspeed(trainer) and getattr(strategy, "zero_stage_3", False):
        return strategy.config
    return None


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_numel")


def full_numel(param: torch.Tensor) -> int:
    """A parameter's number of elements, also when ZeRO-3 keeps only a slice of it here."""
    return int(param.ds_numel) if is_partitioned(param) else param.numel()


def full_ndim(param: torch.Tensor) -> int:
    return len(param.ds_shape) if is_partitioned(param) else param.ndim


def local_values(param: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter (its slice under ZeRO-3)."""
    return param.ds_tensor if is_partitioned(param) else param


@contextmanager
def partitioned_loading(config: dict | None) -> Iterator[None]:
    """While loading and wrapping the model inside the zero.Init Lightning opened: transformers loads into the
    partitioned parameters (and PEFT gathers a base weight where it needs one whole, as DoRA does). transformers
    is told that zero.Init is already open (`set_zero3_state`): a second one inside it is not supported."""
    if config is None:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config
    from transformers.modeling_utils import set_zero3_state

    ds_config = HfDeepSpeedConfig(config)  # transformers keeps only a weak reference: it lives while this does
    try:
        with set_zero3_state():
            yield
    finally:
        unset_hf_deepspeed_config()
        del ds_config


@contextmanager
def created_whole(config: dict | None) -> Iterator[None]:
    """Modules created inside it are whole although Lightning's zero.Init is open: PEFT's adapters, which it
    initialises after creating them (lora_B to zero: on an empty slice that would do nothing, leaving nn.Linear's
    random init). `deepspeed.initialize` partitions them afterwards."""
    if config is None:
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context

    shutdown_init_context()
    try:
        yield
    finally:
        restore_init_context()


def gathered_state_dict(model: torch.nn.Module, trained_only: bool) -> dict[str, torch.Tensor] | None:
    """The model's whole tensors (only the trained ones with `trained_only`) on rank 0's host, gathered one module
    at a time; every rank must call it; None on the other ranks."""
    import deepspeed
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    state: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad or not trained_only]
        if params:
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                if rank0:
                    for name, param in params:
                        state[f"{prefix}.{name}" if prefix else name] = param.detach().to("cpu", copy=True)
        if not trained_only and rank0:
            for name, buffer in persistent_buffers(module):
                state[f"{prefix}.{name}" if prefix else name] = buffer.detach().to("cpu", copy=True)
    return state if rank0 else None

"""Loading a TeleChat2 checkpoint directory for training, merging or chat: the one place that decides what
`auto` means for dtype and attention, and that turns a loader's anonymous error into one naming the broken file.

Not copied into exports (unlike the configuration and modeling files beside it)."""

from __future__ import annotations

from pathlib import Path

import torch

#: the dtype names configs use (model.dtype, merge dtype, quantization compute_dtype)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention(requested: str, on_cuda: bool, packed: bool = False) -> str:
    """`auto`: flash_attention_2 on a CUDA GPU with the flash-attn package; else, on a CUDA GPU for packed rows
    (several documents a row), flex_attention (a block-sparse document mask instead of sdpa's dense [T, T] one);
    else sdpa (torch's flash / memory-efficient kernels for causal and padded batches)."""
    if requested != "auto":
        return requested
    if on_cuda and flash_attn_installed():
        return "flash_attention_2"
    return "flex_attention" if on_cuda and packed else "sdpa"


#: the dtype autocast computes in under each mixed precision
MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
TRUE_HALF = {"bf16-true": torch.bfloat16, "16-true": torch.float16}


def resolve_dtype(
    requested: str, *, precision: str | None = None, on_cuda: bool = False, frozen_base: bool = False
) -> torch.dtype:
    """`auto` for training (`precision` given): the dtype of a "-true" precision; under mixed precision the
    dtype autocast computes in when the base is frozen (an adapter: no fp32 copy of the base; what is trained is
    made fp32 by `upcast_trained`), else fp32 master weights. For inference: bf16 on a CUDA GPU, else fp32."""
    if requested != "auto":
        return DTYPES[requested]
    if precision is not None:
        if precision in TRUE_HALF:
            return TRUE_HALF[precision]
        return MIXED[precision] if frozen_base and precision in MIXED else torch.float32
    return torch.bfloat16 if on_cuda else torch.float32


def upcast_trained(model: torch.nn.Module, precision: str) -> None:
    """Under mixed precision, the parameters being trained in fp32 (the optimizer's master weights); frozen ones
    keep their dtype. Under a "-true" precision everything stays as loaded."""
    if precision not in MIXED:
        return
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def checkpoint_dtype(directory: Path) -> torch.dtype:
    """The dtype a checkpoint's config.json records (fp32 when it records none)."""
    from telechat_lab.files import read_json

    config = read_json(directory / "config.json", "the model config")
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return DTYPES.get(name, torch.float32)


def load_model(directory: str | Path, dtype: torch.dtype, attn_implementation: str = "sdpa", **kwargs):
    """`Telechat2ForCausalLM.from_pretrained`; a missing, truncated or corrupt weight file, or one whose tensors do
    not match config.json, is named (before loading: a missing tensor would otherwise be loaded as random)."""
    from telechat_lab.console import show_loading_progress, without_transformers_bars
    from telechat_lab.files import find_broken_weights

    from .checks import check_checkpoint
    from .modeling_telechat2 import Telechat2ForCausalLM

    directory = Path(directory)
    check_checkpoint(directory)
    weights = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    with without_transformers_bars(off=not show_loading_progress(weights)):  # a tiny checkpoint loads at once
        try:
            return Telechat2ForCausalLM.from_pretrained(
                str(directory), dtype=dtype, attn_implementation=attn_implementation, **kwargs
            )
        except (ImportError, MemoryError, torch.cuda.OutOfMemoryError):
            raise
        except Exception:
            find_broken_weights(directory)  # raises CheckpointError naming the file when one is broken
            raise

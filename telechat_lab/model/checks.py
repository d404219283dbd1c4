"""What a checkpoint's and an adapter's weight files must hold, checked from their safetensors headers before
anything is loaded: every tensor that config.json (and, for an adapter, adapter_config.json) asks for, at the
shape it gives, no shard of the index missing; an adapter's tensors finite. The shapes expected are those of the
model built from config.json on the meta device (and of PEFT's adapter built on it), so nothing is allocated.
A problem raises CheckpointError naming the file and the first bad key: the loaders would otherwise raise an
anonymous error, or, for a missing tensor, load silently with a random or zero weight in its place.

Not copied into exports (unlike the configuration and modeling files beside it)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from telechat_lab.errors import CheckpointError

INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _shape(shape) -> tuple[int, ...]:
    return tuple(int(n) for n in shape)


def _meta_model(directory: Path):
    """The TeleChat2 model config.json describes, on the meta device (no memory)."""
    from telechat_lab.files import read_json

    from .configuration_telechat2 import Telechat2Config
    from .modeling_telechat2 import Telechat2ForCausalLM

    read_json(directory / "config.json", "the model config")  # named when missing or not JSON
    try:
        config = Telechat2Config.from_pretrained(str(directory))
        with torch.device("meta"):
            return Telechat2ForCausalLM(config)
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise CheckpointError(f"{directory / 'config.json'} does not describe a TeleChat2 model ({err})") from err


def _expected_shapes(model) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model's state dict at its whole shape: under DeepSpeed's ZeRO-3 (a model built inside
    zero.Init, as partitioned loading does) a parameter is an empty slice and its `ds_shape` the whole."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    state = model.state_dict()
    return {key: _shape(getattr(tensors.get(key), "ds_shape", None) or t.shape) for key, t in state.items()}


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the header of the safetensors file `path` (checked complete)."""
    from safetensors import safe_open

    from telechat_lab.files import check_safetensors

    check_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        return {key: _shape(f.get_slice(key).get_shape()) for key in f.keys()}


def _compare(found: dict, expected: dict, file_of, source: str, optional=(), extra_ok=frozenset()) -> None:
    """`found` (name -> shape, `file_of(name)` the file holding it) against `expected`: the first missing,
    misshapen or unexpected (not in `extra_ok`) tensor named with its file."""
    for key, shape in expected.items():
        if key not in found and key not in optional:
            raise CheckpointError(f"{file_of(key)}: {key} is missing ({source} asks for it): incomplete or mismatched")
        if key in found and found[key] != shape:
            raise CheckpointError(
                f"{file_of(key)}: {key} has shape {list(found[key])} where {source} gives {list(shape)}: "
                "the weights do not match it (made for another model?)"
            )
    extra = [key for key in found if key not in expected and key not in extra_ok]
    if extra:
        raise CheckpointError(
            f"{file_of(extra[0])}: {extra[0]} is not a tensor of {source}: the weights do not match it "
            "(made for another model?)"
        )


def check_checkpoint(directory: str | Path) -> None:
    """A TeleChat2 checkpoint directory's safetensors weights against its config.json: every shard the index names
    present and complete, every tensor of the model present (lm_head may be tied) at its shape. A quantized or a
    .bin checkpoint is left to the loader."""
    from telechat_lab.files import read_json

    directory = Path(directory)
    config = read_json(directory / "config.json", "the model config")
    index = directory / INDEX
    if index.is_file():
        weight_map = read_json(index, "the shard index").get("weight_map", {})
        files = sorted(set(weight_map.values()))
        for shard in files:
            if not (directory / shard).is_file():
                keys = [k for k, v in weight_map.items() if v == shard]
                raise CheckpointError(
                    f"{directory / shard} is missing ({index} names it for {len(keys)} tensor(s), {keys[0]} first)"
                )
    else:
        files = [p.name for p in sorted(directory.glob("*.safetensors"))]
    if not files or config.get("quantization_config"):
        return
    found, where = {}, {}
    for name in files:
        for key, shape in _header_shapes(directory / name).items():
            found[key], where[key] = shape, directory / name
    expected = _expected_shapes(_meta_model(directory))
    found = {key: shape for key, shape in found.items() if key in expected}  # extra tensors: the loader ignores them
    tied = ("lm_head.weight",) if config.get("tie_word_embeddings") else ()
    missing_in = directory / (files[0] if len(files) == 1 else INDEX)
    _compare(found, expected, lambda key: where.get(key, missing_in), f"{directory / 'config.json'}", tied)


def check_adapter_weights(adapter: str | Path, base: str | Path) -> None:
    """An adapter directory's adapter_model.safetensors against its adapter_config.json and the base it is
    applied to: exactly the tensors PEFT makes for that config on that base (names, ranks, shapes), all finite."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors import safe_open

    adapter, base = Path(adapter), Path(base)
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():  # adapter_model.bin: the loader's own checks
        return
    found = _header_shapes(weights)
    try:
        config = LoraConfig.from_pretrained(str(adapter))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{adapter / 'adapter_config.json'} is not a LoRA config PEFT reads ({err})") from err
    with warnings.catch_warnings():  # PEFT's and transformers' deprecation notes about the meta model
        warnings.simplefilter("ignore")
        model = _meta_model(base)
        # a base weight saved beside the adapter (PEFT's save_embedding_layers, e.g. after a vocabulary resize)
        base_weights = frozenset("base_model.model." + key for key in model.state_dict())
        try:
            peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
        except ValueError as err:  # e.g. target modules that the base does not have
            raise CheckpointError(f"{adapter / 'adapter_config.json'} does not fit the base {base} ({err})") from err
        expected = {key: _shape(t.shape) for key, t in get_peft_model_state_dict(peft_model).items()}
    source = f"adapter_config.json (r={config.r}, target_modules) on the base {base}"
    _compare(found, expected, lambda key: weights, source, extra_ok=base_weights)
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                kind = "NaN" if torch.isnan(tensor).any() else "inf"
                raise CheckpointError(f"{weights}: {key} holds {kind}: a diverged or corrupt adapter")

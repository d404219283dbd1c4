"""What a training step costs in FLOPs, counted two ways (the training metrics and bench/ use both).

- **model FLOPs** (MFU, as the field's anchors count it): 6 x N per token, N the model's parameters; attention's
  sequence term and everything a LoRA backward skips are ignored. `mfu` = model FLOP/s / the GPU's dense peak.
- **hardware FLOPs** (what the GPU really computes, `hfu`): per token, 2 x M forward (M the parameters in matrix
  multiplies: all but the embedding table and the norms), 2 x M backward for the activations' gradients, 2 x T
  for the weights' gradients (T the trained parameters in matrix multiplies: for LoRA only the adapters), one
  more forward of the blocks with gradient checkpointing, one more lm_head pass where the loss recomputes it (the
  chunked path; the fused one does not: model/modeling_telechat2.py `loss_path`); and for
  attention 4 x hidden x layers FLOPs per (query, key) pair actually attended (causal, within each document of
  a packed row), 3 x that for forward and backward, 4 x with checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from telechat_lab.tokenizer import PAD_ID


@dataclass(frozen=True)
class FlopCounts:
    """Per-token and per-pair FLOPs of one training step of a model."""

    model_per_token: float  # 6 N
    hardware_per_token: float  # the matmuls, forward + backward (+ recompute)
    hardware_per_pair: float  # attention, per (query, key) pair attended

    def hardware(self, tokens: float, pairs: float) -> float:
        return tokens * self.hardware_per_token + pairs * self.hardware_per_pair

    def model(self, tokens: float) -> float:
        return tokens * self.model_per_token


def count_flops(
    model: torch.nn.Module, config, gradient_checkpointing: bool, chunked_loss: bool | None = None
) -> FlopCounts:
    """`model` as trained (PEFT-wrapped or not), `config` its Telechat2Config. `chunked_loss`: the loss recomputes
    lm_head in the backward; None: as the model's own training loss does (`recomputes_head`)."""
    from .zero import full_ndim, full_numel

    total = matmul = trained = 0
    for name, p in model.named_parameters():
        n = full_numel(p) * (2 if p.dtype == torch.uint8 else 1)  # 4-bit weights: two per byte
        total += n
        if full_ndim(p) >= 2 and "word_embeddings" not in name:
            matmul += n
            trained += n if p.requires_grad else 0
    recompute = 1 if gradient_checkpointing else 0
    if chunked_loss is None:
        chunked_loss = recomputes_head(model)
    head = config.vocab_size * config.hidden_size
    per_token = 2 * matmul * (2 + recompute) + 2 * trained + (2 * head if chunked_loss else 0)
    per_pair = 4 * config.hidden_size * config.n_layer * (3 + recompute)
    return FlopCounts(6 * total, per_token, per_pair)


def recomputes_head(model: torch.nn.Module) -> bool:
    """Whether `model`'s training loss computes lm_head twice (the chunked path) rather than once (fused)."""
    from telechat_lab.model.modeling_telechat2 import loss_path

    head = model.get_output_embeddings()
    implementation = getattr(model.config, "loss_implementation", "auto")
    return loss_path(head, implementation, head.weight.device) == "chunked"


def batch_tokens_and_pairs(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(real tokens, causal (query, key) pairs attended) of a batch, as tensors on its device (no host sync):
    padded rows count their unmasked tokens; packed rows count each document on its own."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None:
        lengths = mask.sum(-1).to(torch.float64)
        return lengths.sum(), (lengths * (lengths + 1) / 2).sum()
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    # a packed row: a document ends where the positions restart (or the row ends), its length is its last
    # position + 1; the padding at the end is a document of <_pad> tokens, not real tokens, but attended to
    ends = torch.ones_like(positions, dtype=torch.bool)
    ends[..., :-1] = positions[..., 1:] <= positions[..., :-1]
    documents = torch.where(ends, positions + 1, 0).to(torch.float64)
    return (ids != PAD_ID).sum().to(torch.float64), (documents * (documents + 1) / 2).sum()

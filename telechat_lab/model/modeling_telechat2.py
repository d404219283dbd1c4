"""TeleChat2 for transformers: a pre-norm decoder with GQA, per-head interleaved `key_value` and
TeleChat's length-dependent NTK RoPE.

Self-contained (torch + transformers only): exports copy this file next to the weights as remote
code. Parameter names are exactly those of the official checkpoints, so `from_pretrained` loads a
released TeleChat2 directory without any conversion step.

Attention runs through transformers' attention interface (`sdpa` default, `eager`,
`flash_attention_2`, `flex_attention`); padded batches use the 2D attention mask, packed batches
(several documents in one row) are given by `position_ids` restarting at 0 or by `cu_seqlens`, and
never attend across documents. For packed rows `sdpa` and `eager` get a dense [B, 1, T, T] mask;
`flex_attention` gets a block mask that transformers builds (compiled) from the same restarting
positions, and `flash_attention_2` varlen boundaries taken from them: neither holds a [T, T] tensor.
torch's flex attention has no backward on CPU: train with it on a GPU.

Training memory: with `labels` in training mode the loss is computed in chunks of tokens and no
logits are returned (see `Telechat2ForCausalLM.forward`).

KV cache: TeleChat's RoPE depends on the total sequence length once it passes `training_seqlen`
(8192 in the releases). Up to that length the rotation is fixed and cached decoding equals
recomputing the whole sequence exactly. Beyond it a change of length changes every earlier hidden
state, so no KV cache can be exact; like the release's own code, the cache then keeps keys as they
were rotated when computed and new tokens use the parameters of the current length.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers
from packaging import version
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_telechat2 import Telechat2Config

# Older transformers (the release pins 4.45) lack the attention interface, the mask builder and the checkpointing
# layer of 5.x: without them this file builds the same boolean mask itself and runs sdpa / eager attention itself.
try:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # transformers < 4.48
    ALL_ATTENTION_FUNCTIONS = None
try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # transformers < 4.52
    GradientCheckpointingLayer = nn.Module
try:
    from transformers.masking_utils import create_causal_mask
except ImportError:  # transformers < 4.53
    create_causal_mask = None
if create_causal_mask is not None and "inputs_embeds" not in inspect.signature(create_causal_mask).parameters:
    create_causal_mask = None  # 4.x's takes other arguments (input_embeds, cache_position): the mask is built here

# transformers 5.x renamed `past_key_values` to `cache`; accept whichever this version uses.
_MASK_CACHE_ARG = (
    "cache" if create_causal_mask and "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
)
_OUT_CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_CACHE_TAKES_CONFIG = "config" in inspect.signature(DynamicCache.__init__).parameters
# transformers < 4.46: GenerationMixin has no prepare_inputs_for_generation of its own; the model supplies it
_OWN_GENERATION_INPUTS = version.parse(transformers.__version__) < version.parse("4.46")


class Telechat2RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype, then scaled by the weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def ntk_rope_parameters(config: Telechat2Config, total_len: int) -> tuple[float, float]:
    """TeleChat's NTK rule: (rope base, mscale) for a sequence whose keys span `total_len` tokens.

    Plain RoPE (base, 1.0) up to `training_seqlen`; beyond it the base grows by
    alpha ** (d / (d - 2)) with alpha = 2 ** ceil(log2(L / base_seqlen) + 1) - 1, and cos/sin are
    scaled by 0.1 * ln(L / training_seqlen) + 1.
    """
    head_dim = config.head_dim
    length = max(total_len, config.training_seqlen)
    # math.log(x, 2), as the reference does (it can differ from math.log2 in the last bit)
    alpha = max(2 ** math.ceil(math.log(length / config.base_seqlen, 2) + 1) - 1, 1)
    base = config.rope_theta * alpha ** (head_dim / (head_dim - 2))
    ratio = length / config.training_seqlen
    mscale = 1.0 if ratio <= 1 else 0.1 * math.log(ratio) + 1.0
    return base, mscale


class Telechat2RotaryEmbedding(nn.Module):
    """cos/sin (fp32) for given positions, each token using the NTK parameters of its sequence length."""

    def __init__(self, config: Telechat2Config):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim

    def inv_freq(self, base: float, device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim
        return 1.0 / (base**exponents)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, seq_lens: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [B, T] token positions; seq_lens: one total length, or a [B, T] tensor giving
        the length of the document each token belongs to (packed rows). Returns cos, sin [B, T, D]."""
        device = positions.device
        with torch.autocast(device_type=device.type, enabled=False):
            if isinstance(seq_lens, int):
                base, mscale = ntk_rope_parameters(self.config, seq_lens)
                inv_freq = self.inv_freq(base, device)  # [D/2]
                freqs = positions[..., None].float() * inv_freq
                scale = torch.tensor(mscale, device=device)
            else:
                lengths, index = torch.unique(seq_lens, return_inverse=True)
                params = [ntk_rope_parameters(self.config, int(n)) for n in lengths.tolist()]
                table = torch.stack([self.inv_freq(base, device) for base, _ in params])  # [U, D/2]
                scales = torch.tensor([m for _, m in params], device=device)
                freqs = positions[..., None].float() * table[index]
                scale = scales[index][..., None]
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos() * scale, emb.sin() * scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [B, T, D] in fp32. Computed in fp32, returned in x's dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, kv_heads, T, D] -> [B, kv_heads * n_rep, T, D]; each KV head serves n_rep query heads."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def sdpa_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """torch's scaled_dot_product_attention with a boolean mask (True: attend), for transformers < 4.48."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def attention_function(name: str) -> Callable:
    """The attention implementation `name` (config._attn_implementation) of this transformers version."""
    if ALL_ATTENTION_FUNCTIONS is not None and hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(name, eager_attention_forward)
    if name == "eager":
        return eager_attention_forward
    if ALL_ATTENTION_FUNCTIONS is not None:
        return ALL_ATTENTION_FUNCTIONS[name]
    if name == "sdpa":
        return sdpa_attention_forward
    raise ValueError(
        f"attn_implementation={name!r} needs transformers >= 4.48 (this is {transformers.__version__}): "
        "use 'sdpa' or 'eager'"
    )


def boolean_causal_mask(attention_mask, doc_ids, past_len: int, q_len: int, device) -> torch.Tensor:
    """[B or 1, 1, q_len, past_len + q_len], True where a query may attend: earlier or same position, a key that is
    not padding, of the same packed document. (What `create_causal_mask` gives, for transformers without it.)"""
    q_pos = torch.arange(past_len, past_len + q_len, device=device)[:, None]
    k_pos = torch.arange(past_len + q_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, : past_len + q_len].bool()
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return mask | (k_pos == q_pos)[None, None]  # a padding query attends to itself: no all-masked row


class Telechat2Attention(nn.Module):
    def __init__(self, config: Telechat2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.n_head
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.query = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        # per KV head: [K (head_dim) | V (head_dim)], interleaved head by head
        self.key_value = nn.Linear(config.hidden_size, 2 * self.num_kv_heads * self.head_dim, bias=False)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=True)

    def forward(self, hidden_states, rope, attention_mask=None, cache=None, **kwargs):
        bsz, q_len, _ = hidden_states.shape
        query = self.query(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.key_value(hidden_states).view(bsz, q_len, self.num_kv_heads, 2 * self.head_dim)
        key, value = kv.split(self.head_dim, dim=-1)
        key, value = key.transpose(1, 2), value.transpose(1, 2)
        cos, sin = rope
        query = apply_rotary(query, cos, sin)
        key = apply_rotary(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_fn = attention_function(self.config._attn_implementation)
        out, weights = attention_fn(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        out = out.reshape(bsz, q_len, -1).contiguous()
        return self.dense(out), weights


class Telechat2MLP(nn.Module):
    def __init__(self, config: Telechat2Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=True)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Telechat2Block(GradientCheckpointingLayer):
    def __init__(self, config: Telechat2Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = Telechat2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attention = Telechat2Attention(config, layer_idx)
        self.post_attention_layernorm = Telechat2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = Telechat2MLP(config)
        self.post_ln_residual = config.apply_residual_connection_post_layernorm
        self.hidden_dropout = config.hidden_dropout

    def forward(self, hidden_states, rope, attention_mask=None, cache=None, **kwargs):
        normed = self.input_layernorm(hidden_states)
        residual = normed if self.post_ln_residual else hidden_states
        attn_out, _ = self.self_attention(normed, rope, attention_mask=attention_mask, cache=cache, **kwargs)
        hidden_states = residual + F.dropout(attn_out, p=self.hidden_dropout, training=self.training)
        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.post_ln_residual else hidden_states
        return residual + F.dropout(self.mlp(normed), p=self.hidden_dropout, training=self.training)


class Telechat2PreTrainedModel(PreTrainedModel):
    config_class = Telechat2Config
    config: Telechat2Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Telechat2Block"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _supports_cache_class = True  # transformers 4.x: generate() hands it a DynamicCache

    def _flash_attn_can_dispatch(self, flash_attn_version: int, is_init_check: bool = False) -> bool:
        try:
            return super()._flash_attn_can_dispatch(flash_attn_version, is_init_check=is_init_check)
        except ImportError as err:
            raise ImportError(
                f"attn_implementation='flash_attention_{flash_attn_version}' needs the flash-attn package and a "
                "CUDA GPU: install the `flash` extra (pip install 'telechat-lab[flash]'), or use 'sdpa'. "
                f"transformers said: {err}"
            ) from err

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, Telechat2RMSNorm):
            module.weight.fill_(1.0)


def packed_document_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """[B, T] document index of each token when rows are packed (positions restart), else None."""
    if position_ids.shape[-1] < 2:
        return None
    restarts = torch.diff(position_ids, dim=-1) != 1
    if not bool(restarts.any()):
        return None
    return F.pad(restarts.long(), (1, 0)).cumsum(-1)


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Flattened packing boundaries [0, n1, n1+n2, ...] -> [1, total] positions restarting per document."""
    cu = cu_seqlens.long().to("cpu")
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu.diff() <= 0).any()):
        raise ValueError(f"cu_seqlens {cu.tolist()} must start at 0, increase, and end at the row length {total}")
    lengths = cu.diff()
    starts = torch.repeat_interleave(cu[:-1], lengths)
    return (torch.arange(total) - starts).unsqueeze(0).to(cu_seqlens.device)


def _chunk_cross_entropy_sum(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """Summed fp32 cross-entropy of one chunk of tokens; its logits live only inside this call."""
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """The rows' log-sum-exp; `logits` becomes their softmax, in place. On a CPU by max, exp, sum and one division
    (no [rows, vocab] temporary: ~3x faster there than logsumexp then exp), on a GPU by the fused logsumexp."""
    if logits.is_cuda:
        lse = torch.logsumexp(logits, dim=-1)
        logits.sub_(lse.unsqueeze(1)).exp_()
        return lse
    top = logits.amax(dim=-1, keepdim=True)
    total = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
    logits.div_(total)
    return (top + total.log()).squeeze(1)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` whose gradients are computed in the forward, a chunk of
    tokens at a time (Liger's method): each chunk's logits become their own gradient in place (softmax minus the
    one-hot target) and are multiplied into the gradients of the hidden states and of the weight, then freed. The
    backward only scales what the forward computed, so `lm_head`'s matmul is never recomputed and no [tokens, vocab]
    tensor exists. The matmuls run in the dtype autocast (or the inputs) give, the softmax in fp32, as the plain
    path does."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, ignore_index: int):
        need_hidden, need_weight = hidden.requires_grad, weight.requires_grad
        need_bias = bias is not None and bias.requires_grad
        # only the tokens with a target go through lm_head (prompts and padding add nothing to the loss and get a
        # zero gradient): in SFT a third or more of a batch's positions
        kept = (targets != ignore_index).nonzero().squeeze(1)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, kept.numel(), chunk_size):
            index = kept[start : start + chunk_size]
            chunk, target = hidden.index_select(0, index), targets.index_select(0, index)
            logits = F.linear(chunk, weight, bias)
            matmul_dtype = logits.dtype
            logits = logits.float()
            rows = torch.arange(target.numel(), device=target.device)
            picked = logits[rows, target]
            lse = _softmax_(logits)  # the logits' memory now holds their softmax
            total = total + (lse - picked).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            grad = logits
            grad[rows, target] -= 1.0
            grad = grad.to(matmul_dtype)
            if need_hidden:
                grad_hidden.index_copy_(0, index, (grad @ weight.to(matmul_dtype)).to(hidden.dtype))
            if need_weight:
                grad_weight += (grad.t() @ chunk.to(matmul_dtype)).float()
            if need_bias:
                grad_bias += grad.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_output.float()
        return (
            None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * scale).to(weight_dtype),
            None if grad_bias is None else (grad_bias * scale).to(bias_dtype),
            None,
            None,
            None,
        )


LOSS_IMPLEMENTATIONS = ("auto", "fused", "chunked", "liger")


def _liger_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    return importlib.util.find_spec("liger_kernel") is not None


def loss_path(lm_head: nn.Module, implementation: str, device: torch.device) -> str:
    """Which training loss computes over `lm_head`: "fused" (gradients in the forward, the default) and "liger"
    (Liger's Triton kernel of the same method, on CUDA where liger-kernel is installed; "auto" takes it there) need a
    plain `nn.Linear` head whose weight is whole; a PEFT-wrapped head (LoRA on lm_head, modules_to_save) or a ZeRO-3
    partitioned one goes through the module: "chunked" (each chunk recomputed in the backward)."""
    plain = type(lm_head) is nn.Linear and not hasattr(lm_head.weight, "ds_id")
    if implementation == "chunked" or not plain:
        return "chunked"
    if implementation == "liger" and not _liger_available(device):
        raise ValueError("loss_implementation=liger needs liger-kernel installed (pip install liger-kernel) and CUDA")
    if implementation == "liger" or (implementation == "auto" and _liger_available(device)):
        return "liger"
    return "fused"


def chunked_causal_lm_loss(
    lm_head: nn.Module,
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    implementation: str = "chunked",
    **kwargs,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss` without the [tokens, vocab] logits, `chunk_size` tokens at a time, by the path
    `loss_path` picks for `implementation`:
    - fused / liger: the gradients w.r.t. the hidden states and lm_head are computed in the forward
      (`_FusedLinearCrossEntropy`; Liger's kernel on CUDA), the backward only scales them;
    - chunked: the tokens go through `lm_head` (the module, so a PEFT-wrapped head keeps working), each chunk's
      summed cross-entropy under non-reentrant activation checkpointing, so that its fp32 logits are freed after
      the forward and recomputed in the backward (a second `lm_head` matmul per chunk). Every chunk is computed,
      even one with no target, so that every rank calls `lm_head` equally often (sharded training gathers its
      weight per call).
    Peak extra memory is a few [chunk_size, vocab] fp32 tensors on every path. Other keyword arguments (those meant
    for the attention) are ignored, as `ForCausalLMLoss` ignores them."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    path = loss_path(lm_head, implementation, hidden.device)
    if path == "liger":
        # imported by name: transformers' check of an exported checkpoint's remote code reads its import statements
        # and would require liger-kernel of everyone who loads the export
        liger = importlib.import_module("liger_kernel.transformers.functional")
        total = liger.liger_fused_linear_cross_entropy(
            hidden, lm_head.weight, targets, lm_head.bias, ignore_index=ignore_index, reduction="sum"
        ).float()
    elif path == "fused":
        total = _FusedLinearCrossEntropy.apply(hidden, lm_head.weight, lm_head.bias, targets, chunk_size, ignore_index)
    else:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.numel(), chunk_size):
            stop = start + chunk_size
            total = total + checkpoint(
                _chunk_cross_entropy_sum,
                lm_head,
                hidden[start:stop],
                targets[start:stop],
                ignore_index,
                use_reentrant=False,
            )
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class Telechat2Model(Telechat2PreTrainedModel):
    def __init__(self, config: Telechat2Config):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.embed_layernorm:
            self.word_embeddings_layernorm = Telechat2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.h = nn.ModuleList([Telechat2Block(config, i) for i in range(config.n_layer)])
        self.ln_f = Telechat2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.rotary_emb = Telechat2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = kwargs.pop("past_key_values", cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if self.config.embed_layernorm:
            inputs_embeds = self.word_embeddings_layernorm(inputs_embeds)
        bsz, q_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device

        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        past_len = cache.get_seq_length() if cache is not None else 0

        if cu_seqlens is not None:
            if bsz != 1 or past_len or attention_mask is not None:
                raise ValueError("cu_seqlens describes one packed row: batch size 1, no cache, no attention_mask")
            position_ids = position_ids_from_cu_seqlens(cu_seqlens, q_len)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + q_len, device=device).unsqueeze(0)
        position_ids = position_ids.expand(bsz, -1)
        # Packed rows (positions restart inside a row) are whole documents: nothing to cache.
        doc_ids = packed_document_ids(position_ids) if past_len == 0 and attention_mask is None else None
        if doc_ids is not None:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config) if _CACHE_TAKES_CONFIG else DynamicCache()
        if not use_cache:
            cache = None
        total_len = past_len + q_len

        # RoPE with TeleChat's NTK rule: the length is that of the whole key sequence (past + new),
        # or, in packed rows, that of each token's own document.
        if doc_ids is not None:
            counts = torch.zeros(bsz, int(doc_ids.max()) + 1, dtype=torch.long, device=device)
            counts.scatter_add_(1, doc_ids, torch.ones_like(doc_ids))
            rope = self.rotary_emb(position_ids, counts.gather(1, doc_ids))
        else:
            rope = self.rotary_emb(position_ids, total_len)

        if create_causal_mask is None:
            causal_mask = boolean_causal_mask(attention_mask, doc_ids, past_len, q_len, device)
        else:
            mask_kwargs = {_MASK_CACHE_ARG: cache}
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **mask_kwargs,
            )
        if self.config._attn_implementation.startswith("flash") and doc_ids is not None:
            kwargs.setdefault("position_ids", position_ids)  # flash-attn derives varlen boundaries from it

        hidden_states = inputs_embeds
        for block in self.h:
            hidden_states = block(hidden_states, rope, attention_mask=causal_mask, cache=cache, **kwargs)
        hidden_states = self.ln_f(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{_OUT_CACHE: cache})


class Telechat2ForCausalLM(Telechat2PreTrainedModel, GenerationMixin):
    def __init__(self, config: Telechat2Config):
        super().__init__(config)
        self.transformer = Telechat2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    if _OWN_GENERATION_INPUTS:

        def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
            """What later transformers' GenerationMixin passes: the tokens not yet cached, positions counted over
            the attention mask (padding at 1)."""
            past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = None
            if attention_mask is not None:
                position_ids = attention_mask.long().cumsum(-1) - 1
                position_ids.masked_fill_(attention_mask == 0, 1)
                position_ids = position_ids[:, past_len:]
            return {
                "input_ids": input_ids[:, past_len:],
                "past_key_values": past_key_values,
                "attention_mask": attention_mask,
                "position_ids": position_ids,
                "use_cache": kwargs.get("use_cache"),
            }

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits, and with `labels` the mean cross-entropy over tokens whose shifted label is not -100
        (or the summed cross-entropy / `num_items_in_batch` when that is passed, as transformers'
        `ForCausalLMLoss` does).

        `return_logits` decides what happens when `labels` are given; it defaults to `not self.training`:
        - True: the full logits are returned and the loss is computed from them (inference, scoring,
          evaluation; generation never passes labels, so it always gets logits).
        - False (the default in training mode): `logits` is None and the loss is computed by
          `chunked_causal_lm_loss`, `config.loss_chunk_size` tokens at a time, so the [tokens, vocab]
          fp32 logits (4 GiB for 8192 tokens of TeleChat2's 131072-token vocabulary) never exist at once.
        Both give the same loss and gradients up to fp32 rounding.
        """
        cache = kwargs.pop("past_key_values", cache)
        kwargs.pop("return_dict", None)
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        out_cache = {_OUT_CACHE: getattr(outputs, _OUT_CACHE)}
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]

        return_logits = not self.training if return_logits is None else return_logits
        if labels is not None and not return_logits:
            loss = chunked_causal_lm_loss(
                self.lm_head,
                hidden_states,
                labels,
                self.config.loss_chunk_size,
                implementation=getattr(self.config, "loss_implementation", "auto"),
                **kwargs,
            )
            return CausalLMOutputWithPast(loss=loss, logits=None, **out_cache)

        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            # mean cross-entropy over tokens whose shifted label is not -100 (computed in fp32)
            if hasattr(self, "loss_function"):
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            else:  # transformers < 4.46: the same mean cross-entropy, computed here
                loss = chunked_causal_lm_loss(
                    self.lm_head, hidden_states, labels, self.config.loss_chunk_size, **kwargs
                )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **out_cache)


__all__ = ["Telechat2ForCausalLM", "Telechat2Model", "Telechat2PreTrainedModel"]

"""Training-speed paths of the native model, checked against the plain ones on CPU: the training loss without
[tokens, vocab] fp32 logits (fused: its gradients computed in the forward; chunked: recomputed in the backward)
and transformers' flex_attention (a block mask built from the packed documents' restarting positions instead of a
dense [T, T] mask)."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import shared_path
from safetensors.torch import load_file
from test_model import small_model
from torch.nn.attention.flex_attention import BlockMask
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from telechat_lab.model import Telechat2Config, Telechat2ForCausalLM

GOLDEN_CASES = ["tiny_gqa", "tiny_mha"]
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _ids(*shape, seed=0) -> torch.Tensor:
    return torch.randint(4, 256, shape, generator=torch.Generator().manual_seed(seed))


def _padded_batch() -> dict:
    """Two rows of 12, the first right-padded after 8 tokens (labels -100 there, and on a prompt)."""
    ids = _ids(2, 12)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _packed_batch() -> dict:
    """Two packed rows of 24 (documents 5+9+10 and 12+12), positions restarting per document and the
    first label of each document ignored, as `telechat_lab.data.packing.join_examples` writes them."""
    ids = _ids(2, 24, seed=1)
    lengths = [[5, 9, 10], [12, 12]]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    labels = ids.masked_fill(positions == 0, -100)
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


BATCHES = {"padded": _padded_batch, "packed": _packed_batch}


def _loss_and_grads(model, batch: dict, **kwargs) -> tuple[CausalLMOutputWithPast, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _assert_same_training_step(model, batch: dict, **kwargs) -> None:
    """The chunked path (training default) against the full-logits path, loss and every gradient."""
    model.train()
    plain, plain_grads = _loss_and_grads(model, batch, return_logits=True, **kwargs)
    chunked, chunked_grads = _loss_and_grads(model, batch, **kwargs)
    assert plain.logits is not None and chunked.logits is None
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-5, atol=1e-5)
    assert chunked_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


# ---------------------------------------------------------------- chunked cross-entropy


@pytest.mark.parametrize("implementation", ["fused", "chunked"])
@pytest.mark.parametrize("num_items", [None, 37])
@pytest.mark.parametrize("chunk_size", [5, 8, 1024])  # 24 and 48 tokens: not dividing, dividing, one chunk
@pytest.mark.parametrize("kind", list(BATCHES))
def test_chunked_loss_and_gradients_equal_the_plain_path(kind, chunk_size, num_items, implementation):
    """num_items_in_batch (gradient accumulation) divides the summed loss, as in ForCausalLMLoss."""
    model = small_model(loss_chunk_size=chunk_size, loss_implementation=implementation)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    _assert_same_training_step(model, BATCHES[kind](), **kwargs)


def test_chunked_loss_takes_precomputed_shift_labels():
    """`shift_labels` (context-parallel trainers pass them) replaces the shift of `labels`."""
    batch = _padded_batch()
    shifted = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    _assert_same_training_step(small_model(loss_chunk_size=7), batch, shift_labels=shifted)


@pytest.mark.parametrize("wrap", ["lora", "modules_to_save"])
def test_chunked_loss_goes_through_a_peft_wrapped_lm_head(wrap):
    """The chunks call the `lm_head` module, so LoRA on it (or a trained copy of it) gets its gradients."""
    from peft import LoraConfig, get_peft_model

    extra = (
        {"target_modules": ["query", "lm_head"]}
        if wrap == "lora"
        else {"target_modules": ["query"], "modules_to_save": ["lm_head"]}
    )
    model = get_peft_model(small_model(loss_chunk_size=5), LoraConfig(r=4, lora_alpha=8, **extra))
    assert type(model.base_model.model.lm_head) is not torch.nn.Linear
    _assert_same_training_step(model, _packed_batch())


@pytest.mark.parametrize("trained_head", [False, True])
def test_fused_loss_equals_the_plain_path_in_bf16(trained_head):
    """bf16 weights (a frozen base under mixed precision): the fused loss and gradients equal the plain full-logits
    path's to bf16 rounding; with a trained head its gradient too."""
    model = small_model(loss_chunk_size=7).to(torch.bfloat16).train()
    for name, p in model.named_parameters():
        p.requires_grad_(trained_head or not name.startswith("lm_head"))
    batch = _padded_batch()
    plain, plain_grads = _loss_and_grads(model, batch, return_logits=True)
    fused, fused_grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=2e-3, atol=2e-3)
    assert fused_grads.keys() == plain_grads.keys() and ("lm_head.weight" in fused_grads) == trained_head
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name].float(), grad.float(), rtol=2e-2, atol=2e-3, msg=name)


def test_fused_loss_under_cpu_autocast_equals_the_plain_path():
    """fp32 weights under bf16 autocast (full fine-tuning with bf16-mixed): the same matmul dtypes as the plain
    path, so the same loss and gradients to bf16 rounding; the weight's gradient keeps the weight's dtype."""
    model = small_model(loss_chunk_size=5).train()
    batch = _packed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = _loss_and_grads(model, batch, return_logits=True)
        fused, fused_grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=2e-3, atol=2e-3)
    assert fused_grads["lm_head.weight"].dtype == torch.float32
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=3e-2, atol=3e-3, msg=name)


class _VocabMatmuls(TorchDispatchMode):
    """Counts the matmuls with a `vocab`-sized dimension, forward and backward."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.count = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            shapes = [a.shape for a in args if isinstance(a, torch.Tensor)]
            self.count += any(self.vocab in shape for shape in shapes)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("trained_head", [False, True])
def test_fused_loss_never_recomputes_lm_head(trained_head):
    """Per chunk, the fused path runs lm_head's matmul once and one matmul per gradient (hidden states, and the head
    when it is trained); the chunked path also recomputes the logits in the backward: one more per chunk."""
    vocab, chunk, tokens = 512, 8, 2 * 48
    chunks = tokens // chunk
    counts = {}
    for implementation in ("fused", "chunked"):
        model = small_model(vocab_size=vocab, loss_chunk_size=chunk, loss_implementation=implementation).train()
        model.lm_head.weight.requires_grad_(trained_head)
        ids = torch.randint(4, vocab, (2, 48))
        probe = _VocabMatmuls(vocab)
        with probe:
            model(input_ids=ids, labels=ids).loss.backward()
        counts[implementation] = probe.count
    per_chunk = 3 if trained_head else 2
    assert counts == {"fused": per_chunk * chunks, "chunked": (per_chunk + 1) * chunks}


class _VocabRows(TorchDispatchMode):
    """The rows (tokens) of every forward matmul against lm_head's weight: [tokens, hidden] x [hidden, vocab]."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            matrices = [a for a in args if isinstance(a, torch.Tensor) and a.ndim == 2]
            if matrices[-1].shape[-1] == self.vocab and matrices[-2].shape[-1] != self.vocab:
                self.rows += matrices[-2].shape[0]
        return func(*args, **(kwargs or {}))


def test_fused_loss_runs_only_the_trained_tokens_through_lm_head():
    """Prompt and padding positions (label -100) add nothing to the loss: the fused path leaves them out of lm_head's
    matmuls, and its loss and gradients still equal the full-logits path's."""
    vocab = 512
    torch.manual_seed(0)
    model = small_model(vocab_size=vocab, loss_chunk_size=4, loss_implementation="fused").train()
    batch = _padded_batch()
    targets = int((batch["labels"][..., 1:] != -100).sum())
    probe = _VocabRows(vocab)
    with probe:
        fused, fused_grads = _loss_and_grads(model, batch)
    assert probe.rows == targets < batch["input_ids"].numel()
    plain, plain_grads = _loss_and_grads(model, {**batch, "return_logits": True})
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_loss_path_falls_back_to_chunked_for_a_wrapped_head():
    from telechat_lab.model.modeling_telechat2 import loss_path

    head = torch.nn.Linear(4, 8, bias=False)
    assert loss_path(head, "auto", torch.device("cpu")) == "fused"
    assert loss_path(head, "chunked", torch.device("cpu")) == "chunked"
    assert loss_path(torch.nn.Sequential(head), "fused", torch.device("cpu")) == "chunked"
    with pytest.raises(ValueError, match="liger-kernel"):
        loss_path(head, "liger", torch.device("cpu"))
    with pytest.raises(ValueError, match="loss_implementation"):
        Telechat2Config(hidden_size=64, n_head=4, loss_implementation="fast")


def test_return_logits_defaults_to_eval_mode():
    """Inference and evaluation keep logits; training with labels drops them unless asked for."""
    model = small_model()
    batch = _padded_batch()
    with torch.no_grad():
        evaluated = model.eval()(**batch)
        trained = model.train()(**batch)
        asked = model(**batch, return_logits=True)
        unlabelled = model(input_ids=batch["input_ids"])
        chunked_eval = model.eval()(**batch, return_logits=False)
    assert evaluated.logits.shape == (2, 12, 256) and asked.logits.shape == (2, 12, 256)
    assert trained.logits is None and chunked_eval.logits is None
    assert unlabelled.logits.shape == (2, 12, 256) and unlabelled.loss is None
    for out in (trained, asked, chunked_eval):
        torch.testing.assert_close(out.loss, evaluated.loss)


def test_loss_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="loss_chunk_size"):
        Telechat2Config(hidden_size=64, n_head=4, loss_chunk_size=0)


class _PeakVocabBytes(TorchDispatchMode):
    """Peak bytes held at once by tensors with `vocab` columns that ops allocate (views are not
    allocations), backward included: a storage counts from its op until its memory is released."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.live, self.peak = vocab, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.live:  # an op may return its input's memory reshaped
                    self.live[storage.data_ptr()] = storage.nbytes()
                    weakref.finalize(storage, self.live.pop, storage.data_ptr())
                    self.peak = max(self.peak, sum(self.live.values()))
        return out


@pytest.mark.parametrize("return_logits,implementation", [(True, "auto"), (False, "chunked"), (False, "fused")])
def test_chunked_loss_holds_a_few_chunks_of_logits(return_logits, implementation):
    """A training step of the chunked path holds at most a few [chunk, vocab] fp32 tensors at once
    (without the checkpointing it would keep every chunk's log-softmax for the backward: 14 chunks
    here); the plain path, measured the same way, holds the whole [tokens, vocab] logits (and more)."""
    vocab, chunk, tokens = 512, 8, 2 * 48  # no other dimension of the tiny model is 512
    model = small_model(vocab_size=vocab, loss_chunk_size=chunk, loss_implementation=implementation).train()
    ids = torch.randint(4, vocab, (2, 48))
    probe = _PeakVocabBytes(vocab)
    with probe:
        model(input_ids=ids, labels=ids, return_logits=return_logits).loss.backward()
    chunk_bytes = chunk * vocab * 4
    if return_logits:
        assert probe.peak >= tokens * vocab * 4
    else:
        assert probe.peak <= 4 * chunk_bytes
    assert model.lm_head.weight.grad is not None


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_chunked_loss_matches_reference_golden(case):
    ckpt = shared_path("golden", "model", case)
    expected = load_file(ckpt / "expected.safetensors")
    model = Telechat2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, loss_chunk_size=7).eval()
    with torch.no_grad():
        out = model(
            input_ids=expected["input_ids"],
            attention_mask=expected["attention_mask"],
            labels=expected["labels"],
            return_logits=False,
        )
    assert abs(out.loss.item() - expected["loss"].item()) < 1e-5


# ---------------------------------------------------------------- flex attention


@pytest.fixture
def eager_flex(monkeypatch):
    """flex_attention without torch.compile. transformers compiles it (and the block mask builder) with
    inductor, 5-10 s per new shape on CPU; eager flex computes the same masked attention from the same
    block mask. torch.compile reads TORCHDYNAMO_DISABLE when called, and transformers compiles flex once
    per process and keeps it: this file's flex tests all take the fixture, so whichever runs first
    decides."""
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")


def _logits(model, **batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _documents(lengths, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 256, (n,), generator=g) for n in lengths]


def _attention_masks(model, **batch) -> list:
    """The mask each attention layer receives."""
    seen = []

    def record(_module, _args, kwargs):
        seen.append(kwargs["attention_mask"])

    hooks = [block.self_attention.register_forward_pre_hook(record, with_kwargs=True) for block in model.transformer.h]
    try:
        _logits(model, **batch)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_flex_packed_row_equals_documents_alone(eager_flex):
    """Each document of a packed row (the 40-token one past training_seqlen, so with its own NTK RoPE)
    gets the logits it gets alone, whether the boundaries come from position_ids or cu_seqlens."""
    model = small_model(attn="flex_attention")
    docs = _documents([7, 40, 12])
    row = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    alone = torch.cat([_logits(model, input_ids=d[None])[0] for d in docs])
    by_positions = _logits(model, input_ids=row, position_ids=positions)[0]
    by_cu = _logits(model, input_ids=row, cu_seqlens=torch.tensor([0, 7, 47, 59], dtype=torch.int32))[0]
    assert (by_positions - alone).abs().max() < 1e-5
    assert (by_cu - alone).abs().max() < 1e-5
    assert (_logits(model, input_ids=row)[0] - alone).abs().max() > 1e-5  # without boundaries: different
    model.config._attn_implementation = "sdpa"
    assert (_logits(model, input_ids=row, position_ids=positions)[0] - alone).abs().max() < 1e-5


def test_flex_gets_a_block_mask_where_sdpa_gets_a_dense_one(eager_flex):
    """The packed documents reach transformers' mask builder: flex gets a BlockMask, sdpa [B, 1, T, T]."""
    model = small_model(attn="flex_attention")
    positions = torch.cat([torch.arange(n) for n in (5, 9, 10)])[None]
    batch = {"input_ids": _ids(1, 24), "position_ids": positions}
    masks = _attention_masks(model, **batch)
    assert len(masks) == 2 and all(isinstance(m, BlockMask) for m in masks)
    model.config._attn_implementation = "sdpa"
    assert _attention_masks(model, **batch)[0].shape == (1, 1, 24, 24)


@pytest.mark.parametrize("kind", ["plain", "right_padded", "left_padded"])
def test_flex_equals_sdpa_and_eager(eager_flex, kind):
    """Unpadded batches, and padded ones through the 2D attention mask (compared on real tokens)."""
    ids = _ids(2, 11, seed=2)
    mask = torch.ones_like(ids)
    if kind == "right_padded":
        mask[0, 6:] = 0
    if kind == "left_padded":
        mask[0, :5] = 0
    model = small_model(attn="flex_attention")
    flex = _logits(model, input_ids=ids, attention_mask=mask)
    for backend in ("sdpa", "eager"):
        model.config._attn_implementation = backend
        other = _logits(model, input_ids=ids, attention_mask=mask)
        assert (flex - other)[mask.bool()].abs().max() < 1e-5, backend


def test_flex_greedy_generation_equals_sdpa(eager_flex):
    """Cached decoding builds the flex block mask with the cache's offsets (left-padded batch)."""
    a, b = _documents([5, 9], seed=3)
    batch = torch.stack([F.pad(a, (4, 0), value=3), b])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=3)
    model = small_model(attn="flex_attention")
    with torch.no_grad():
        flex = model.generate(batch, attention_mask=mask, **kwargs)
        model.config._attn_implementation = "sdpa"
        sdpa = model.generate(batch, attention_mask=mask, **kwargs)
    assert torch.equal(flex, sdpa)


def test_flex_can_be_switched_on_a_loaded_model(eager_flex):
    """set_attn_implementation accepts flex (the attention layer uses the AttentionInterface)."""
    model = small_model()
    ids = _ids(1, 10)
    reference = _logits(model, input_ids=ids)
    model.set_attn_implementation("flex_attention")
    assert model.config._attn_implementation == "flex_attention"
    assert (_logits(model, input_ids=ids) - reference).abs().max() < 1e-5


@pytest.mark.parametrize("case", GOLDEN_CASES)  # tiny_mha has a right-padded row
def test_flex_matches_reference_golden(eager_flex, case):
    ckpt = shared_path("golden", "model", case)
    expected = load_file(ckpt / "expected.safetensors")
    model = Telechat2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="flex_attention")
    assert model.config._attn_implementation == "flex_attention"
    with torch.no_grad():
        out = model.eval()(
            input_ids=expected["input_ids"], attention_mask=expected["attention_mask"], labels=expected["labels"]
        )
    keep = expected["attention_mask"].bool()
    assert (out.logits - expected["logits"]).abs()[keep].max().item() < 1e-4
    assert abs(out.loss.item() - expected["loss"].item()) < 1e-5


def test_auto_attention_picks_a_document_masked_kernel_for_packed_rows_on_a_gpu(monkeypatch):
    from telechat_lab.model import loading

    monkeypatch.setattr(loading, "flash_attn_installed", lambda: False)
    assert loading.resolve_attention("auto", on_cuda=True, packed=True) == "flex_attention"
    assert loading.resolve_attention("auto", on_cuda=True, packed=False) == "sdpa"
    assert loading.resolve_attention("auto", on_cuda=False, packed=True) == "sdpa"  # flex has no CPU backward
    assert loading.resolve_attention("eager", on_cuda=True, packed=True) == "eager"
    monkeypatch.setattr(loading, "flash_attn_installed", lambda: True)
    assert loading.resolve_attention("auto", on_cuda=True, packed=True) == "flash_attention_2"

"""The native TeleChat2 model against the reference (golden files), an independent spec-literal
forward (NTK RoPE beyond training_seqlen), packing, the KV cache, checkpoints and dtypes."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import shared_path
from safetensors.torch import load_file, save_file

from telechat_lab.model import Telechat2Config, Telechat2ForCausalLM
from telechat_lab.model.modeling_telechat2 import ntk_rope_parameters

GOLDEN_CASES = ["tiny_gqa", "tiny_mha"]
BACKENDS = ["sdpa", "eager"]


def small_config(**overrides) -> Telechat2Config:
    cfg = dict(
        vocab_size=256,
        hidden_size=64,
        n_layer=2,
        n_head=4,
        num_key_value_heads=2,
        ffn_hidden_size=96,
        training_seqlen=32,
        base_seqlen=32,
        initializer_range=0.15,
    )  # sharp attention: RoPE errors show
    cfg.update(overrides)
    return Telechat2Config(**cfg)


def small_model(seed=0, attn="sdpa", **overrides) -> Telechat2ForCausalLM:
    torch.manual_seed(seed)
    cfg = small_config(**overrides)
    cfg._attn_implementation = attn
    model = Telechat2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a mix-up of them shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


# ---------------------------------------------------------------- golden files (the reference)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_matches_reference_golden(case, backend):
    ckpt = shared_path("golden", "model", case)
    expected = load_file(ckpt / "expected.safetensors")
    model = Telechat2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation=backend).eval()
    assert model.config._attn_implementation == backend
    with torch.no_grad():
        out = model(
            input_ids=expected["input_ids"], attention_mask=expected["attention_mask"], labels=expected["labels"]
        )
    keep = expected["attention_mask"].bool()
    logit_err = (out.logits - expected["logits"]).abs()[keep].max().item()
    loss_err = abs(out.loss.item() - expected["loss"].item())
    print(f"golden {case} {backend}: max logit error {logit_err:.3e}, loss error {loss_err:.3e}")
    assert logit_err < 1e-4
    assert loss_err < 1e-5


# ---------------------------------------------------------------- NTK RoPE, from the spec


def test_ntk_parameters_follow_the_rule():
    cfg = small_config(hidden_size=64, n_head=4, training_seqlen=64, base_seqlen=64)  # head_dim 16
    assert ntk_rope_parameters(cfg, 10) == (10000.0, 1.0)
    assert ntk_rope_parameters(cfg, 64) == (10000.0, 1.0)
    base, mscale = ntk_rope_parameters(cfg, 100)  # log2(100/64)+1 = 1.64 -> alpha = 2**2 - 1 = 3
    assert base == pytest.approx(10000 * 3 ** (16 / 14))
    assert mscale == pytest.approx(0.1 * math.log(100 / 64) + 1)
    base, _ = ntk_rope_parameters(cfg, 200)  # log2(200/64)+1 = 2.64 -> alpha = 7
    assert base == pytest.approx(10000 * 7 ** (16 / 14))


def spec_forward(model: Telechat2ForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """A literal reading of SPEC.md sections 2-3, written independently of the library (fp64)."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    n_h, n_kv, d = cfg.n_head, cfg.num_key_value_heads, cfg.hidden_size // cfg.n_head
    seq = input_ids.shape[1]

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.layer_norm_epsilon))

    length = max(seq, cfg.training_seqlen)
    alpha = max(2 ** math.ceil(math.log2(length / cfg.base_seqlen) + 1) - 1, 1)
    base = 10000 * alpha ** (d / (d - 2))
    mscale = 1.0 if length / cfg.training_seqlen <= 1 else 0.1 * math.log(length / cfg.training_seqlen) + 1.0
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos() * mscale, torch.cat([ang, ang], -1).sin() * mscale

    def rope(x):  # x [T, H, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    h = sd["transformer.word_embeddings.weight"][input_ids[0]]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        q = (x @ sd[p + "self_attention.query.weight"].T).view(seq, n_h, d)
        kv = (x @ sd[p + "self_attention.key_value.weight"].T).view(seq, n_kv, 2 * d)
        k, v = kv[..., :d], kv[..., d:]
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(n_h // n_kv, dim=1)
        v = v.repeat_interleave(n_h // n_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        scores = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        att = torch.einsum("hqk,khd->qhd", scores, v).reshape(seq, n_h * d)
        h = h + att @ sd[p + "self_attention.dense.weight"].T + sd[p + "self_attention.dense.bias"]
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        mlp = F.silu(x @ sd[p + "mlp.gate_proj.weight"].T) * (x @ sd[p + "mlp.up_proj.weight"].T)
        h = h + mlp @ sd[p + "mlp.down_proj.weight"].T + sd[p + "mlp.down_proj.bias"]
    return rms(h, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seq", [20, 32, 45, 100])  # training_seqlen is 32: plain RoPE, the edge, NTK x2
def test_matches_spec_at_every_length(backend, seq):
    model = small_model(attn=backend)
    ids = torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(seq))
    with torch.no_grad():
        ours = model(input_ids=ids).logits[0].double()
    assert (ours - spec_forward(model, ids)).abs().max().item() < 1e-4


def test_long_sequences_use_ntk_rope():
    """Beyond training_seqlen the first positions' logits change (the base grows with the length)."""
    model = small_model()
    ids = torch.randint(0, 256, (1, 80))
    with torch.no_grad():
        short = model(input_ids=ids[:, :30]).logits
        long = model(input_ids=ids).logits[:, :30]
    assert (short - long).abs().max() > 1e-5  # fp32 noise here is ~1e-7


# ---------------------------------------------------------------- packing and padding


def _documents(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 256, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_row_equals_documents_alone(backend):
    model = small_model(attn=backend)
    docs = _documents([7, 40, 12])  # the 40-token document is past training_seqlen (32): its own NTK
    row = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    cu_seqlens = torch.tensor([0, 7, 47, 59], dtype=torch.int32)
    with torch.no_grad():
        by_positions = model(input_ids=row, position_ids=positions).logits[0]
        by_cu = model(input_ids=row, cu_seqlens=cu_seqlens).logits[0]
        alone = torch.cat([model(input_ids=d[None]).logits[0] for d in docs])
    assert (by_positions - alone).abs().max() < 1e-5
    assert (by_cu - alone).abs().max() < 1e-5
    with torch.no_grad():  # and the same row without boundaries really is different
        unpacked = model(input_ids=row).logits[0]
    assert (unpacked - alone).abs().max() > 1e-5


def test_packed_loss_matches_documents_alone():
    model = small_model()
    docs = _documents([9, 14])
    row = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = row.clone()
    labels[0, 9] = -100  # the first token of the second document is never a target of the first
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=positions, labels=labels).loss
        losses = [model(input_ids=d[None], labels=d[None]).loss * (len(d) - 1) for d in docs]
    assert packed.item() == pytest.approx((sum(losses) / (9 - 1 + 14 - 1)).item(), abs=1e-5)


def test_bad_cu_seqlens_is_refused():
    model = small_model()
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(input_ids=torch.ones(1, 10, dtype=torch.long), cu_seqlens=torch.tensor([0, 4, 9]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_right_padding_leaves_real_tokens_unchanged(backend):
    model = small_model(attn=backend)
    short, long = _documents([6, 11])
    batch = torch.stack([F.pad(short, (0, 5), value=3), long])
    mask = torch.tensor([[1] * 6 + [0] * 5, [1] * 11])
    with torch.no_grad():
        padded = model(input_ids=batch, attention_mask=mask).logits
        alone = model(input_ids=short[None]).logits
    assert (padded[0, :6] - alone[0]).abs().max() < 1e-5


# ---------------------------------------------------------------- incremental decoding


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generate_with_cache_equals_recompute(backend):
    """Up to training_seqlen (here 64) the rotation is fixed and the cache is exact."""
    model = small_model(attn=backend, training_seqlen=64, base_seqlen=64)
    prompt = torch.randint(4, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=44, do_sample=False, eos_token_id=None, pad_token_id=3)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        recomputed = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape[1] == 64
    assert torch.equal(cached, recomputed)
    with torch.no_grad():  # and the step logits agree, not only their argmax
        for n in (20, 41, 63):
            cache = model(input_ids=cached[:, :n], use_cache=True).cache
            step = model(input_ids=cached[:, n : n + 1], cache=cache).logits[0, -1]
            full = model(input_ids=cached[:, : n + 1]).logits[0, -1]
            assert (step - full).abs().max() < 1e-4


def test_left_padded_batch_generation_matches_single():
    model = small_model()
    a, b = _documents([5, 9], seed=3)
    batch = torch.stack([F.pad(a, (4, 0), value=3), b])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=3)
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, **kwargs)
        single = model.generate(a[None], **kwargs)
    assert torch.equal(both[0, 4:], single[0])


# ---------------------------------------------------------------- training features


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(4, 256, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = small_model()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.transformer.h[0].self_attention.key_value.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_stays_close(dtype, tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path)
    half = Telechat2ForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    assert half.lm_head.weight.dtype == dtype
    ids = torch.randint(4, 256, (1, 24))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = half(input_ids=ids, labels=ids)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    assert (out.logits.float() - ref).abs().max() < 0.05 * ref.abs().max()


# ---------------------------------------------------------------- checkpoints


def test_sharded_checkpoint_with_official_names_loads(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    names = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"])
    assert "transformer.h.1.self_attention.key_value.weight" in names
    assert "transformer.h.0.mlp.down_proj.bias" in names and "lm_head.weight" in names
    loaded = Telechat2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(4, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def _official_style_dir(tmp_path, model, **config_changes):
    """A checkpoint laid out like the release: its own config.json (model_type telechat, extra
    fields, auto_map to remote code that must never run) and model.safetensors."""
    cfg = {
        "architectures": ["Telechat2ForCausalLM"],
        "model_type": "telechat",
        "vocab_size": 256,
        "hidden_size": 64,
        "n_layer": 2,
        "n_head": 4,
        "num_key_value_heads": 2,
        "ffn_hidden_size": 96,
        "layer_norm_epsilon": 1e-5,
        "training_seqlen": 32,
        "base_seqlen": 32,
        "flash_attn": True,
        "logn": True,
        "some_future_field": {"x": 1},
        "torch_dtype": "float32",
        "auto_map": {
            "AutoConfig": "configuration_telechat2.Telechat2Config",
            "AutoModelForCausalLM": "modeling_telechat2.Telechat2ForCausalLM",
        },
    }
    cfg.update(config_changes)
    cfg = {k: v for k, v in cfg.items() if v != "ABSENT"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    boom = "raise RuntimeError('remote code was executed')\n"
    (tmp_path / "configuration_telechat2.py").write_text(boom)
    (tmp_path / "modeling_telechat2.py").write_text(boom)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    return tmp_path


@pytest.mark.parametrize("kv_heads", [None, "ABSENT"])
def test_null_or_absent_kv_heads_mean_n_head(tmp_path, kv_heads):
    model = small_model(num_key_value_heads=4)
    _official_style_dir(tmp_path, model, num_key_value_heads=kv_heads)
    loaded = Telechat2ForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_key_value_heads == 4
    assert loaded.transformer.h[0].self_attention.key_value.weight.shape == (2 * 4 * 16, 64)


def test_official_dir_loads_without_running_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM

    model = small_model()
    _official_style_dir(tmp_path, model)
    ids = torch.randint(4, 256, (1, 10))
    for loaded in (Telechat2ForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert isinstance(loaded, Telechat2ForCausalLM)
        assert loaded.config.flash_attn is True  # unknown fields are kept, and ignored
        with torch.no_grad():
            assert torch.equal(loaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


def test_key_value_is_interleaved_per_head():
    """K of head h is rows [2h*d, 2h*d+d) of key_value, V the next d rows (not all-K then all-V)."""
    model = small_model()
    attn = model.transformer.h[0].self_attention
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        kv = attn.key_value(x).view(1, 3, 2, 32)
        w = attn.key_value.weight
        assert torch.allclose(kv[..., 1, :16], x @ w[32:48].T)  # K of head 1
        assert torch.allclose(kv[..., 1, 16:], x @ w[48:64].T)  # V of head 1


def test_flash_attention_without_package_names_the_extra(tmp_path):
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here; the error path cannot be shown")
    except ImportError:
        pass
    small_model().save_pretrained(tmp_path)
    with pytest.raises(ImportError, match=r"telechat-lab\[flash\]"):
        Telechat2ForCausalLM.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


def test_config_rejects_inconsistent_heads():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Telechat2Config(hidden_size=64, n_head=4, num_key_value_heads=3)

"""What only a CUDA GPU can check (skipped elsewhere, with the reason): DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 with
CPU offload through Lightning's DeepSpeedStrategy (the first steps' losses equal a plain run's, a run resumes,
the written adapter or model is whole and reloads), flex_attention on packed rows (equal to sdpa's dense mask,
chosen by `auto`), QLoRA with bitsandbytes' CUDA kernels, compiled blocks.

Run there with `bash scripts/gpu_bench.sh check` (or `pytest tests/test_gpu.py` where everything is installed)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import QUICK, adapter_weights, losses, train_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = [*QUICK, "hardware.precision=bf16-mixed", "adapter.dropout=0", "optim.warmup_steps=0"]


def gpu_run(tmp_path, name, *overrides, check=True):
    out = tmp_path / name
    proc = train_cli([*GPU, *overrides, f"output_dir={out}", f"data.cache_dir={tmp_path}/cache"], tmp_path, check=check)
    return out, proc


@pytest.mark.parametrize("hardware", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"])
@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_deepspeed_trains_as_the_plain_run_resumes_and_writes_whole_weights(tmp_path, hardware, adapter):
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    plain, _ = gpu_run(tmp_path, "plain", "hardware=gpu", f"adapter={adapter}", "trainer.max_steps=4")
    ds, proc = gpu_run(tmp_path, "ds", f"hardware={hardware}", f"adapter={adapter}", "trainer.max_steps=4")
    # bf16 on both sides; DeepSpeed keeps bf16 module weights and fp32 master weights, ours fp32 trained weights
    assert losses(ds)[0] == pytest.approx(losses(plain)[0], rel=1e-3), proc.stdout[-2000:]
    assert losses(ds) == pytest.approx(losses(plain), rel=2e-2)

    split, _ = gpu_run(
        tmp_path, "split", f"hardware={hardware}", f"adapter={adapter}", "trainer.max_steps=4", "save_steps=1",
        "+callbacks.stop._target_=helpers.StopAfter", "+callbacks.stop.step=2",
    )  # fmt: skip
    assert len(losses(split)) == 2 and (split / "checkpoints").is_dir()
    gpu_run(tmp_path, "split", "resume=true", "trainer.max_steps=4", "save_steps=1", "+callbacks.stop=null")
    assert losses(split) == pytest.approx(losses(ds), rel=1e-3)

    if adapter == "lora":
        from peft import PeftModel

        from telechat_lab.model import Telechat2ForCausalLM

        written = adapter_weights(ds)
        assert written and all(t.numel() > 0 and bool(torch.isfinite(t).all()) for t in written.values())
        assert any(bool(t.abs().sum() > 0) for k, t in written.items() if "lora_B" in k)  # trained, not the init
        base = json.loads((ds / "adapter_config.json").read_text())["base_model_name_or_path"]
        PeftModel.from_pretrained(Telechat2ForCausalLM.from_pretrained(base), ds)
    else:
        from telechat_lab.model import Telechat2ForCausalLM

        model = Telechat2ForCausalLM.from_pretrained(ds)
        reference = Telechat2ForCausalLM.from_pretrained(plain)
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            assert p.shape == q.shape and p.numel() > 0, name  # whole tensors, not ZeRO-3's empty slices


def test_flex_attention_on_packed_rows_equals_the_dense_mask(tmp_path):
    from telechat_lab.model import Telechat2ForCausalLM
    from telechat_lab.resolve import model_dir

    ids = torch.randint(20, 3000, (2, 256), device="cuda")  # the tiny tokenizer has 3072 pieces
    positions = torch.cat([torch.arange(100), torch.arange(156)]).expand(2, -1).cuda()  # two documents a row
    results = {}
    for attention in ("sdpa", "flex_attention"):
        model = Telechat2ForCausalLM.from_pretrained(
            model_dir(None), dtype=torch.bfloat16, attn_implementation=attention
        )
        model = model.cuda().train()
        loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
        loss.backward()
        results[attention] = (loss.detach().float(), model.lm_head.weight.grad.float())
    torch.testing.assert_close(results["flex_attention"][0], results["sdpa"][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results["flex_attention"][1], results["sdpa"][1], rtol=5e-2, atol=5e-3)

    out, proc = gpu_run(tmp_path, "packed", "hardware=gpu", "data.packing=true", "trainer.max_steps=3")
    assert "flex_attention attention" in proc.stdout and len(losses(out)) == 3


def test_qlora_and_compiled_blocks_train_on_the_gpu(tmp_path):
    pytest.importorskip("bitsandbytes", reason="the qlora extra is not installed")
    out, proc = gpu_run(tmp_path, "qlora", "hardware=gpu", "adapter=qlora", "trainer.max_steps=3")
    assert "4-bit" in proc.stdout and len(losses(out)) == 3
    plain, _ = gpu_run(tmp_path, "plain", "hardware=gpu", "trainer.max_steps=3")
    compiled, proc = gpu_run(tmp_path, "compiled", "hardware=gpu", "trainer.max_steps=3", "model.compile=true")
    assert "compiled blocks" in proc.stdout
    assert losses(compiled) == pytest.approx(losses(plain), rel=1e-2)

"""merge.py export_mode=vllm_adapter writes an adapter in the module layout vLLM's TeleChat2 serves, exactly: merged
by hand into q/k/v-layout weights it equals our merged export split the same way. Adapters vLLM cannot serve are
refused up front, also by chat.py's vLLM engine, before vLLM is needed."""

import json
import shlex

import pytest
import torch
from helpers import make_adapter, run_script
from safetensors.torch import load_file

from telechat_lab.api import merge
from telechat_lab.errors import ConfigError

SERVED = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def converted(tiny_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm_adapter")
    lora = make_adapter(tiny_dir, work / "lora", seed=3)
    out = work / "vllm adapter"  # a space: the printed command must still paste back into a shell
    proc = run_script("merge.py", [f"adapter_path={lora}", f"export_dir={out}", "export_mode=vllm_adapter"], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"dir": out, "lora": lora, "work": work, "stdout": proc.stdout}


def test_converted_adapter_has_the_names_vllm_maps(converted, tiny_dir):
    config = json.loads((converted["dir"] / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(SERVED)
    keys = load_file(converted["dir"] / "adapter_model.safetensors").keys()
    layers = json.loads((tiny_dir / "config.json").read_text())["n_layer"]
    expected = {
        f"base_model.model.transformer.h.{i}.{block}.{module}.lora_{ab}.weight"
        for i in range(layers)
        for block, modules in [("self_attention", ["q_proj", "k_proj", "v_proj", "o_proj"]), ("mlp", SERVED)]
        for module in modules
        if block == "self_attention" or module.endswith(("gate_proj", "up_proj", "down_proj"))
        for ab in "AB"
    }
    assert set(keys) == expected
    command = converted["stdout"].split("serve it: ", 1)[1].splitlines()[0]
    assert shlex.split(command)[-4:] == ["--max-lora-rank", "8", "--lora-modules", f"lora={converted['dir']}"]


def test_converted_adapter_merges_exactly_into_the_merged_export(converted, tiny_dir):
    """Independent of the converter: W + scale * B @ A per q/k/v/o module, against merge.py's fp32 export with
    its key_value rows split per KV head (head_dim K rows, then head_dim V rows)."""
    merged_dir = converted["work"] / "merged"
    merge([f"adapter_path={converted['lora']}", f"export_dir={merged_dir}", "dtype=float32"])
    merged = load_file(merged_dir / "model.safetensors")
    base = load_file(tiny_dir / "model.safetensors")
    lora = load_file(converted["dir"] / "adapter_model.safetensors")
    config = json.loads((tiny_dir / "config.json").read_text())
    adapter_config = json.loads((converted["dir"] / "adapter_config.json").read_text())
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    kv, head_dim = config["num_key_value_heads"], config["hidden_size"] // config["n_head"]

    def split(w):  # [2*kv*head_dim, hidden] -> K rows, V rows
        per_head = w.reshape(kv, 2, head_dim, -1)
        return per_head[:, 0].reshape(kv * head_dim, -1), per_head[:, 1].reshape(kv * head_dim, -1)

    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        base_k, base_v = split(base[p + "self_attention.key_value.weight"])
        merged_k, merged_v = split(merged[p + "self_attention.key_value.weight"])
        attention, mlp = p + "self_attention.", p + "mlp."
        pairs = {
            "self_attention.q_proj": (base[attention + "query.weight"], merged[attention + "query.weight"]),
            "self_attention.k_proj": (base_k, merged_k),
            "self_attention.v_proj": (base_v, merged_v),
            "self_attention.o_proj": (base[attention + "dense.weight"], merged[attention + "dense.weight"]),
            **{
                f"mlp.{m}": (base[f"{mlp}{m}.weight"], merged[f"{mlp}{m}.weight"])
                for m in ("gate_proj", "up_proj", "down_proj")
            },
        }
        for module, (w, expected) in pairs.items():
            a = lora[f"base_model.model.{p}{module}.lora_A.weight"]
            b = lora[f"base_model.model.{p}{module}.lora_B.weight"]
            assert (w + (b @ a) * scale - expected).abs().max().item() == 0, f"{p}{module}"


def test_a_new_conversion_replaces_an_earlier_one(converted):
    out = converted["dir"]
    merge([f"adapter_path={converted['lora']}", f"export_dir={out}", "export_mode=vllm_adapter"])
    assert (out / "adapter_model.safetensors").is_file()


def peft_adapter(base_dir, out, **options):
    from peft import LoraConfig, get_peft_model

    from telechat_lab.model import Telechat2ForCausalLM

    model = get_peft_model(Telechat2ForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, **options))
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(out)
    return out


KINDS = {
    "DoRA": {"target_modules": ["query", "key_value"], "use_dora": True},
    "modules_to_save": {"target_modules": ["query"], "modules_to_save": ["lm_head"]},
    "bias": {"target_modules": ["dense"], "bias": "lora_only"},
    "lm_head": {"target_modules": ["query", "lm_head"]},
}


@pytest.mark.parametrize("kind", sorted(KINDS))
# making the lm_head adapter, PEFT says it will save the embeddings too: what the test builds, not what it checks
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")
def test_adapters_vllm_cannot_serve_are_refused(tiny_dir, tmp_path, kind):
    adapter = peft_adapter(tiny_dir, tmp_path / kind, **KINDS[kind])
    with pytest.raises(ConfigError, match="vLLM's LoRA support cannot serve|cannot be served by vLLM"):
        merge([f"adapter_path={adapter}", f"export_dir={tmp_path / 'out'}", "export_mode=vllm_adapter"])
    assert not (tmp_path / "out").exists()

    from telechat_lab.chat.engines import VLLMEngine  # refused before vLLM is imported (it is absent here)

    with pytest.raises(ConfigError, match=kind):
        VLLMEngine(tiny_dir, [adapter])


def test_chat_vllm_engine_converts_the_adapter_on_the_fly(converted, tiny_dir, monkeypatch):
    """chat.py infer_backend=vllm adapter_path=RUN: vLLM (a stand-in recording its arguments; it needs a GPU) is
    given the adapter in its own layout, the same as merge.py export_mode=vllm_adapter writes."""
    import sys
    import types

    started = {}
    fake = types.ModuleType("vllm")
    fake.LLM = lambda **kwargs: started.update(kwargs)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    from telechat_lab.chat.engines import VLLMEngine

    engine = VLLMEngine(tiny_dir, [converted["lora"]])
    assert started["enable_lora"] and started["model"] == str(tiny_dir)
    served = engine.adapters[0]
    assert json.loads((served / "adapter_config.json").read_text())["target_modules"] == sorted(SERVED)
    expected = load_file(converted["dir"] / "adapter_model.safetensors")
    got = load_file(served / "adapter_model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)

"""An export's config.json and generation_config.json carry what its users' tools read: flash_attn false unless
asked (the release's base says true), an auto_map naming only classes its files define, seq_length (vLLM's
max_model_len), and the release's recommended sampling, overridable in conf/merge.yaml."""

import ast
import json
import shutil
import warnings

import pytest
from helpers import make_adapter

from telechat_lab.api import merge

RELEASE_SAMPLING = {"temperature": 0.3, "top_k": 5, "top_p": 0.85, "repetition_penalty": 1.03, "do_sample": True}


@pytest.fixture(scope="module")
def release_like(tiny_dir, tmp_path_factory):
    """The tiny base with a real release's flash_attn: true; no seq_length (as some bases have none)."""
    base = tmp_path_factory.mktemp("release_like") / "base"
    shutil.copytree(tiny_dir, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "flash_attn": True}))
    return {"base": base, "adapter": make_adapter(base, base.parent / "lora")}


def exported(release_like, tmp_path, *overrides):
    out = tmp_path / "out"
    merge([f"adapter_path={release_like['adapter']}", f"export_dir={out}", "dtype=float32", *overrides])
    return out, json.loads((out / "config.json").read_text())


def test_export_config_for_the_release_files_and_vllm(release_like, tmp_path):
    out, config = exported(release_like, tmp_path)
    assert config["flash_attn"] is False
    assert config["seq_length"] == config["training_seqlen"] == 256
    for entry in config["auto_map"].values():  # each names a class its module file defines
        module, name = entry.split(".")
        tree = ast.parse((out / f"{module}.py").read_text())
        classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
        assert name in classes, entry
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}


def test_generation_config_has_the_release_sampling_and_loads_without_warning(release_like, tmp_path):
    from transformers import GenerationConfig

    out, _ = exported(release_like, tmp_path)
    generation = json.loads((out / "generation_config.json").read_text())
    assert {k: generation[k] for k in RELEASE_SAMPLING} == RELEASE_SAMPLING
    assert generation["max_new_tokens"] == 4096 and generation["eos_token_id"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert GenerationConfig.from_pretrained(out).top_k == 5


def test_merge_settings_override_flash_attn_seq_length_and_sampling(release_like, tmp_path):
    out, config = exported(release_like, tmp_path, "flash_attn=true", "seq_length=128", "generation.temperature=0.6")
    assert config["flash_attn"] is True and config["seq_length"] == 128
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.6

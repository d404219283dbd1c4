"""An export's config.json and generation_config.json carry what its users' tools read: flash_attn false unless
asked (the release's base says true), an auto_map naming only classes its files define, seq_length (vLLM's
max_model_len), and the release's recommended sampling, overridable in conf/merge.yaml."""

import ast
import json
import shutil
import warnings
from pathlib import Path

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


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_chat_and_serve_sample_as_an_export_does_by_default(command):
    """chat.py and serve sample with the release's recommended settings, as `vllm serve` does with an export."""
    from telechat_lab import api

    generation = dict(api.compose(command).generation)
    assert {k: generation[k] for k in RELEASE_SAMPLING} == RELEASE_SAMPLING


def test_merge_settings_override_flash_attn_seq_length_and_sampling(release_like, tmp_path):
    out, config = exported(release_like, tmp_path, "flash_attn=true", "seq_length=128", "generation.temperature=0.6")
    assert config["flash_attn"] is True and config["seq_length"] == 128
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.6


# --------------------------------------------------------------------------------------------------------------
# the export in other transformers versions: the release's pin (4.45) and the latest 4.x, beside this venv's 5.x
# --------------------------------------------------------------------------------------------------------------

PINNED = {  # transformers and the tokenizers / huggingface-hub it needs; the venv's torch, numpy, ... are reused
    "4.45": ("transformers==4.45.2", "tokenizers==0.20.3", "huggingface-hub==0.36.2"),
    "4.57": ("transformers==4.57.6", "tokenizers==0.22.1", "huggingface-hub==0.36.2"),
}
UNREACHABLE = ("No matching distribution", "Could not find a version", "connection", "Connection", "Network")

# the release docs' snippet (fp32 on CPU, greedy, few tokens), in a Python that cannot import telechat_lab
SNIPPET = """
import json, sys
sys.modules["telechat_lab"] = None
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
path = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, torch_dtype=torch.float32)
defaults = model.generation_config
messages = [{"role": "user", "content": "生抽与老抽的区别？<_user>1+1"}]
text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
model_inputs = tokenizer([text], return_tensors="pt")
generated_ids = model.generate(**model_inputs, max_new_tokens=6)  # the export's own sampling
generated_ids = [out[len(inp):] for inp, out in zip(model_inputs.input_ids, generated_ids)]
sampled = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)[0]
# greedy, to compare across versions (4.5x fills a generation_config= argument's defaults from the model's own)
model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=2, pad_token_id=3)
generated_ids = model.generate(**model_inputs)
generated_ids = [out[len(inp):] for inp, out in zip(model_inputs.input_ids, generated_ids)]
response = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)[0]
with torch.no_grad():
    logits = model(**model_inputs).logits[0]
print(json.dumps({
    "version": transformers.__version__,
    "input_ids": model_inputs.input_ids[0].tolist(),
    "generated": generated_ids[0].tolist(),
    "response": response,
    "sampled": len(sampled) > 0,
    "logits": logits.tolist(),
    "special": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token],
    "sampling": [defaults.do_sample, defaults.top_k, defaults.temperature],
}))
"""


def transformers_env(pins: tuple[str, ...]) -> Path:
    """A directory holding `pins` (pip install --target, no deps), cached between runs under ~/.cache."""
    import hashlib
    import subprocess
    import sys

    from filelock import FileLock

    root = Path.home() / ".cache" / "telechat-lab-test"
    root.mkdir(parents=True, exist_ok=True)
    target = root / ("tf-" + hashlib.sha256(" ".join(pins).encode()).hexdigest()[:16])
    with FileLock(str(target) + ".lock"):
        if not (target / "transformers").is_dir():
            staging = Path(str(target) + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(staging), *pins],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode:
                shutil.rmtree(staging, ignore_errors=True)
                if any(marker in proc.stderr for marker in UNREACHABLE):
                    pytest.skip(f"PyPI is unreachable, cannot install {pins}: {proc.stderr.strip()[-300:]}")
                raise AssertionError(proc.stderr[-3000:])
            staging.rename(target)
    return target


def run_snippet(export_dir: Path, cwd: Path, pythonpath: str = "") -> dict:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "error::UserWarning"}
    proc = subprocess.run(
        [sys.executable, "-c", SNIPPET, str(export_dir)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def export_and_reference(release_like, tmp_path_factory):
    """A tiny export and what the release docs' snippet gives with this venv's transformers (5.x)."""
    work = tmp_path_factory.mktemp("compat")
    out = work / "export"
    merge([f"adapter_path={release_like['adapter']}", f"export_dir={out}", "dtype=float32"])
    return out, run_snippet(out, work)


@pytest.mark.slow
@pytest.mark.parametrize("version", sorted(PINNED))
def test_export_loads_and_matches_in_older_transformers(export_and_reference, tmp_path, version):
    """AutoTokenizer / AutoModelForCausalLM with trust_remote_code and the release docs' generate snippet, under
    transformers 4.45 (the release's pin) and the latest 4.x: the same prompt ids (control strings in text stay
    text), the same greedy tokens and logits as under 5.x; the release's special tokens; no warning."""
    import torch

    out, reference = export_and_reference
    got = run_snippet(out, tmp_path, str(transformers_env(PINNED[version])))
    assert got["version"].startswith(version) and not reference["version"].startswith("4.")
    assert got["input_ids"] == reference["input_ids"]
    assert got["input_ids"].count(4) == 1  # the "<_user>" in the text stayed text
    assert got["generated"] == reference["generated"] and got["response"] == reference["response"]
    diff = (torch.tensor(got["logits"]) - torch.tensor(reference["logits"])).abs().max().item()
    assert diff < 1e-5, diff
    assert got["special"] == reference["special"] == [None, "<_end>", "<_end>", "<_pad>"]
    assert got["sampling"] == reference["sampling"] == [True, 5, 0.3] and got["sampled"]

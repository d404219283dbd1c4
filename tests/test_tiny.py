"""The tiny checkpoint writer: a directory laid out like a release that the model, the tokenizer and
generation all read."""

import json

import pytest
import torch

from telechat_lab.model import Telechat2ForCausalLM
from telechat_lab.tiny import main, write_tiny_checkpoint
from telechat_lab.tokenizer import CONTROL_TOKENS, SPECIAL_TOKENS, load_tokenizer


def test_tiny_checkpoint_is_a_complete_telechat2_directory(tiny_dir):
    files = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "generation_config.json"} <= files
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "telechat"
    assert config["hidden_size"] == 64 and config["n_layer"] == 2 and config["num_key_value_heads"] == 2
    tok = load_tokenizer(tiny_dir)
    assert config["vocab_size"] == len(tok) == 3072
    for name, idx in SPECIAL_TOKENS.items():  # the same control pieces at the same ids as TeleChat2
        assert tok.convert_tokens_to_ids(name) == idx
    assert tok("<_user>hi<_bot>")["input_ids"][0] == CONTROL_TOKENS["<_user>"]


def test_tiny_checkpoint_chats_end_to_end(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    model = Telechat2ForCausalLM.from_pretrained(tiny_dir).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    assert ids[0, 0].item() == CONTROL_TOKENS["<_system>"] and ids[0, -1].item() == CONTROL_TOKENS["<_bot>"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert isinstance(tok.decode(out[0, ids.shape[1] :]), str)
    assert model.generation_config.eos_token_id == CONTROL_TOKENS["<_end>"]
    assert model.generation_config.pad_token_id == CONTROL_TOKENS["<_pad>"]


def test_tiny_checkpoint_is_reused_when_unchanged_and_rewritten_otherwise(tmp_path):
    out = write_tiny_checkpoint(tmp_path, hidden_size=64)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    write_tiny_checkpoint(tmp_path, hidden_size=64)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    write_tiny_checkpoint(tmp_path, hidden_size=64, seed=1)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64
    assert "1, 'torch.float32'" in (out / ".telechat_tiny").read_text()


def test_tiny_checkpoint_refuses_non_tiny_sizes(tmp_path):
    with pytest.raises(ValueError, match="hidden_size"):
        write_tiny_checkpoint(tmp_path, hidden_size=1024)


def test_tiny_command_line(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--hidden-size", "64", "--n-layer", "3"])
    assert "written to" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["n_layer"] == 3


def test_tiny_with_real_vocabulary(tiny_real_vocab_dir):
    config = json.loads((tiny_real_vocab_dir / "config.json").read_text())
    assert config["vocab_size"] == 131072
    model = Telechat2ForCausalLM.from_pretrained(tiny_real_vocab_dir).eval()
    tok = load_tokenizer(tiny_real_vocab_dir)
    batch = tok(["你好，世界", "hello world"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    assert out.logits.shape[-1] == 131072 and torch.isfinite(out.loss)

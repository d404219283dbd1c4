"""merge.py refuses broken or mismatched weight files before it writes anything: an adapter whose tensors are not
finite or do not match its adapter_config.json and the base (missing keys, another rank, another base's shapes),
and a base checkpoint whose files do not match its config.json (truncated, misshapen, a shard missing). One
message naming the file and the first bad key, exit 2, no traceback."""

import json
import shutil

import pytest
import torch
from helpers import make_adapter, run_script
from safetensors.torch import load_file, save_file

from telechat_lab.api import merge
from telechat_lab.errors import CheckpointError

WEIGHTS = "adapter_model.safetensors"
QUERY_A = "base_model.model.transformer.h.0.self_attention.query.lora_A.weight"


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory):
    return make_adapter(tiny_dir, tmp_path_factory.mktemp("adapter") / "lora")


def corrupted(adapter, tmp_path, change) -> tuple:
    """A copy of `adapter` whose tensors `change` edits in place (a dict name -> tensor)."""
    copy = shutil.copytree(adapter, tmp_path / "bad")
    tensors = load_file(copy / WEIGHTS)
    change(tensors)
    save_file(tensors, copy / WEIGHTS, metadata={"format": "pt"})
    return copy, tmp_path / "out"


def refused(tmp_path, *overrides) -> str:
    with pytest.raises(CheckpointError) as err:
        merge([*overrides, "dtype=float32"])
    message = str(err.value)
    assert message.endswith("refusing to merge (nothing was written)"), message
    assert not (tmp_path / "out").exists()
    return message


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_a_non_finite_adapter_tensor_is_refused(adapter, tmp_path, value, kind):
    def poison(tensors):
        tensors[QUERY_A][1, 2] = value

    bad, out = corrupted(adapter, tmp_path, poison)
    message = refused(tmp_path, f"adapter_path={bad}", f"export_dir={out}")
    assert message.startswith(f"{bad / WEIGHTS}: {QUERY_A} holds {kind}"), message


def test_an_adapter_missing_every_lora_b_is_refused(adapter, tmp_path):
    def drop_b(tensors):
        for key in [k for k in tensors if ".lora_B." in k]:
            del tensors[key]

    bad, out = corrupted(adapter, tmp_path, drop_b)
    message = refused(tmp_path, f"adapter_path={bad}", f"export_dir={out}")
    first_b = "base_model.model.transformer.h.0.self_attention.query.lora_B.weight"
    assert message.startswith(f"{bad / WEIGHTS}: {first_b} is missing"), message


def test_an_adapter_whose_rank_is_not_its_configs_is_refused(adapter, tmp_path):
    bad, out = corrupted(adapter, tmp_path, lambda tensors: None)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    message = refused(tmp_path, f"adapter_path={bad}", f"export_dir={out}")
    assert message.startswith(f"{bad / WEIGHTS}: {QUERY_A} has shape [4, 64] where adapter_config.json (r=8"), message


def test_an_adapter_of_another_base_is_refused(adapter, tmp_path):
    from telechat_lab.tiny import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "wider", hidden_size=96, training_seqlen=256)
    message = refused(tmp_path, f"model.path={other}", f"adapter_path={adapter}", f"export_dir={tmp_path / 'out'}")
    assert message.startswith(f"{adapter / WEIGHTS}: {QUERY_A} has shape [4, 64] where"), message
    assert str(other) in message


@pytest.mark.slow
def test_merge_cli_refuses_a_nan_adapter_with_one_message(adapter, tmp_path):
    bad, out = corrupted(adapter, tmp_path, lambda tensors: tensors[QUERY_A].fill_(float("nan")))
    proc = run_script("merge.py", [f"adapter_path={bad}", f"export_dir={out}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        proc.stderr.strip() == f"error: {bad / WEIGHTS}: {QUERY_A} holds NaN: a diverged or corrupt adapter: "
        "refusing to merge (nothing was written)"
    ), proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------- the base checkpoint (model.path)


@pytest.fixture
def base_copy(tiny_dir, tmp_path):
    return shutil.copytree(tiny_dir, tmp_path / "base")


def test_a_truncated_base_is_named(base_copy, adapter, tmp_path):
    weights = base_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    message = refused(tmp_path, f"model.path={base_copy}", f"adapter_path={adapter}", f"export_dir={tmp_path / 'out'}")
    assert message.startswith(f"{weights} is not a complete safetensors file"), message


def test_a_base_whose_shapes_are_not_its_configs_is_named(base_copy, adapter, tmp_path):
    config = json.loads((base_copy / "config.json").read_text())
    (base_copy / "config.json").write_text(json.dumps({**config, "ffn_hidden_size": 2 * config["ffn_hidden_size"]}))
    message = refused(tmp_path, f"model.path={base_copy}", f"adapter_path={adapter}", f"export_dir={tmp_path / 'out'}")
    key = "transformer.h.0.mlp.gate_proj.weight"
    assert message.startswith(f"{base_copy / 'model.safetensors'}: {key} has shape [128, 64] where "), message
    assert str(base_copy / "config.json") in message


def test_a_shard_missing_from_the_base_is_named(base_copy, adapter, tmp_path):
    tensors = load_file(base_copy / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    save_file({n: tensors[n] for n in names[:5]}, base_copy / "model-00001-of-00002.safetensors")
    (base_copy / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {n: shard for shard, ns in shards.items() for n in ns}}
    (base_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    message = refused(tmp_path, f"model.path={base_copy}", f"adapter_path={adapter}", f"export_dir={tmp_path / 'out'}")
    assert message.startswith(f"{base_copy / 'model-00002-of-00002.safetensors'} is missing"), message
    assert f"for {len(names) - 5} tensor(s), {names[5]} first" in message


def test_a_tensor_missing_from_the_base_is_named(base_copy, adapter, tmp_path):
    tensors = load_file(base_copy / "model.safetensors")
    del tensors["transformer.ln_f.weight"]
    save_file(tensors, base_copy / "model.safetensors", metadata={"format": "pt"})
    message = refused(tmp_path, f"model.path={base_copy}", f"adapter_path={adapter}", f"export_dir={tmp_path / 'out'}")
    assert message.startswith(f"{base_copy / 'model.safetensors'}: transformer.ln_f.weight is missing"), message


def test_an_adapter_with_tensors_its_config_does_not_make_is_refused(adapter, tmp_path):
    extra = QUERY_A.replace(".h.0.", ".h.7.")  # a deeper model's layer

    def add_layer(tensors):
        tensors[extra] = tensors[QUERY_A].clone()

    bad, out = corrupted(adapter, tmp_path, add_layer)
    message = refused(tmp_path, f"adapter_path={bad}", f"export_dir={out}")
    assert message.startswith(f"{bad / WEIGHTS}: {extra} is not a tensor of adapter_config.json"), message


def test_a_base_weight_saved_beside_the_adapter_is_accepted(adapter, tiny_dir, tmp_path):
    """PEFT saves an embedding beside the adapter (save_embedding_layers, after a vocabulary resize) and loads it
    into the base: not a mismatch."""
    embedding = "base_model.model.transformer.word_embeddings.weight"
    saved = load_file(tiny_dir / "model.safetensors")["transformer.word_embeddings.weight"] + 1.0

    def add_embedding(tensors):
        tensors[embedding] = saved

    bad, out = corrupted(adapter, tmp_path, add_embedding)
    merge([f"adapter_path={bad}", f"export_dir={out}", "dtype=float32"])
    exported = load_file(out / "model.safetensors")["transformer.word_embeddings.weight"]
    assert torch.equal(exported, saved)


def test_an_export_does_not_replace_a_tiny_checkpoint(tiny_dir, adapter, tmp_path):
    """A tiny checkpoint carries the remote code an export does, but it is not an earlier export."""
    from telechat_lab.errors import OutputDirError
    from telechat_lab.tiny import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other_tiny", hidden_size=64, training_seqlen=256)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(OutputDirError, match="holds no earlier export"):
        merge([f"adapter_path={adapter}", f"export_dir={other}"])
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before

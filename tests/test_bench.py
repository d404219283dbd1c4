"""bench/train_throughput.py on CPU (its --cpu-smoke mode, what CI can run): both stacks train on the same padded
batches from the same adapter weights and agree on every step's loss; the figures and the exact command are
recorded, labelled as CPU figures. (Speed itself is measured by the benchmark, never asserted here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))


def test_shapes_hold_the_release_sizes_and_count_their_parameters():
    import torch
    from random_model import parameter_count, shape_config

    from telechat_lab.model import Telechat2Config, Telechat2ForCausalLM

    sizes = {name: parameter_count(shape_config(name)) / 1e9 for name in ("telechat2_3b", "telechat2_7b")}
    assert 3.0 < sizes["telechat2_3b"] < 3.5 and 7.0 < sizes["telechat2_7b"] < 8.0, sizes
    big = shape_config("telechat2_115b")
    assert (big["hidden_size"], big["n_layer"], big["n_head"], big["num_key_value_heads"]) == (8192, 96, 64, 8)
    assert big["ffn_hidden_size"] == 40960 and big["vocab_size"] == 131072
    assert 110 < parameter_count(big) / 1e9 < 125
    values = shape_config("telechat2_115b", layers=1, vocab_size=512)
    values.update(hidden_size=256, n_head=8, num_key_value_heads=2, ffn_hidden_size=512)  # the 115B's GQA layout
    with torch.device("meta"):
        model = Telechat2ForCausalLM(Telechat2Config(**values))
    assert parameter_count(values) == sum(p.numel() for p in model.parameters())
    with pytest.raises(SystemExit, match="has 30 blocks"):
        shape_config("telechat2_7b", layers=31)


def test_cpu_smoke_run_compares_both_stacks_on_the_same_batches(tmp_path):
    out = tmp_path / "results"
    args = [
        "--cpu-smoke",
        "--tokenizer", str(REPO / "telechat_lab" / "assets" / "tiny_tokenizer.model"),
        "--data", str(REPO / "telechat_lab" / "demo_data"),
        "--work", str(tmp_path / "work"),
        "--out", str(out),
        "--name", "smoke",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "train_throughput.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "smoke.json").read_text())
    assert report["command"].startswith("python bench/train_throughput.py --cpu-smoke")
    assert report["environment"]["gpu"] is False and report["environment"]["versions"]["torch"]
    runs = {(r["stack"], r["layout"]): r for r in report["runs"]}
    assert set(runs) == {("ours", "padded"), ("hf", "padded"), ("ours", "packed")}
    ours, hf = runs["ours", "padded"], runs["hf", "padded"]
    assert ours["tokens_per_step"] == hf["tokens_per_step"] > 0  # the very same batches
    assert len(ours["losses"]) == len(hf["losses"]) == 4
    assert report["loss_agreement"]["max_abs_diff"] < 1e-4, report["loss_agreement"]
    assert runs["ours", "packed"]["tokens_per_s"] > 0 and runs["ours", "packed"]["losses"]
    # on a CPU the peak is the resident memory each run took above its start, sampled
    # (a later run may reuse what an earlier one freed and the allocator kept: 0 above its start, never less)
    assert all(r["peak_mem_gib"] is None and r["peak_rss_gib"] >= 0 for r in report["runs"]), report["runs"]
    assert report["runs"][0]["peak_rss_gib"] > 0, report["runs"]
    assert report["ratios_vs_hf"]["ours padded"]["peak_mem"] == round(ours["peak_rss_gib"] / hf["peak_rss_gib"], 3)
    table = (out / "smoke.md").read_text()
    assert "CPU figures" in table and "HF Trainer + PEFT" in table and "| packed |" in table and " RSS |" in table


def test_gpu_scripts_parse_and_name_every_part():
    for script in ("bundle_gpu.sh", "gpu_bench.sh"):
        proc = subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    text = (REPO / "scripts" / "gpu_bench.sh").read_text()
    for part in ("check", "lora", "qlora", "compile", "cutoffs", "sizes", "full"):
        assert f"#   {part} " in text and f"{part}|all)" in text, part


def test_loss_memory_bench_measures_every_path_and_their_losses_agree(tmp_path):
    """bench/loss_memory.py at a small size: the whole [tokens, 131072] logits cost several times the chunked and
    fused losses' few [chunk, 131072] blocks, every path is timed, and the losses and gradients agree."""
    cmd = [sys.executable, str(REPO / "bench" / "loss_memory.py"), "--tokens", "512", "--hidden", "64"]
    proc = subprocess.run([*cmd, "--chunk", "64", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "loss_memory_cpu.json").read_text())
    (row,) = record["rows"]
    assert record["command"].startswith("python bench/loss_memory.py --tokens 512")
    whole_logits_mib = 512 * 131072 * 4 / 2**20  # 256 MiB: the whole path holds it at least once
    mib = row["peak_extra_mib"]
    assert mib["whole"] >= whole_logits_mib
    assert mib["chunked"] < mib["whole"] / 2 and mib["fused"] < mib["whole"] / 2
    assert all(row["seconds"][p] > 0 for p in ("whole", "chunked", "fused"))
    assert row["loss_abs_diff"] < 1e-4 and row["grad_checksum_rel_diff"] < 1e-3


def _bench(script: str, *args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_tokenizer_speed_smoke_checks_every_way_against_the_spec_encoding():
    out = _bench("tokenizer_speed.py", "--smoke").stdout
    assert "(40 with tool tags)" in out and "ids as SPEC section 4 encodes them for every way below" in out
    assert out.count("x\n") == 6  # a row for each of the six ways


def test_tokenizer_speed_reference_encodes_the_tool_tags_as_their_control_ids():
    import sentencepiece as spm
    from tokenizer_speed import spec_encode

    from telechat_lab.tokenizer import TINY_TOKENIZER_PATH, load_tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(TINY_TOKENIZER_PATH))
    text = 'look it up <tool_call>\n{"name": "search"}\n</tool_call><tool_response>\nfound\n</tool_response>'
    ids = spec_encode(sp, text)
    assert [i for i in ids if i < 13] == [9, 10, 11, 12] and not set(sp.encode(text)) & {9, 10, 11, 12}
    assert ids == load_tokenizer(TINY_TOKENIZER_PATH)(text, add_special_tokens=False)["input_ids"]


def test_data_prep_smoke_times_the_pipeline_on_the_bundled_data(tmp_path):
    out = _bench("data_prep.py", "--smoke", env={**os.environ, "TMPDIR": str(tmp_path)}).stdout
    record = json.loads(out.strip().splitlines()[-1])
    assert record["examples"] == 40 and len(record["examples_per_s"]) == 5
    cpu = record["cpu_seconds"]
    assert cpu["1 process"]["main"] > 0 and cpu["a worker's start"]["workers"] > 0
    assert all(rate > 0 for rate in record["examples_per_s"].values())
    assert list(tmp_path.iterdir()) == []  # its copies of the data and its caches are removed


def test_train_throughput_keeps_results_already_there(tmp_path):
    from train_throughput import free_name

    assert free_name(tmp_path, "run") == "run"
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "run-2.md").write_text("")
    assert free_name(tmp_path, "run") == "run-3"


def test_the_readme_examples_outputs_are_ignored_by_git():
    paths = ["runs/try1/adapter_model.safetensors", "lora.db", "study.db", "multirun/train/x/0/run.json"]
    command = ["git", "-C", str(REPO), "check-ignore", "--no-index", *paths]
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.stdout.split() == paths, proc.stdout + proc.stderr


def test_step_profile_times_our_hooks_around_the_models_work(tmp_path):
    out = tmp_path / "profile.json"
    args = ["--cutoff", "256", "--batch-size", "2", "--steps", "3", "--work", str(tmp_path / "work"), "--out", str(out)]
    args += ["--tokenizer", str(REPO / "telechat_lab" / "assets" / "tiny_tokenizer.model")]
    args += ["--data", str(REPO / "telechat_lab" / "demo_data")]
    printed = _bench("step_profile.py", *args, cwd=tmp_path).stdout
    report = json.loads(out.read_text())
    parts = report["seconds_a_step"]
    assert report["steps_timed"] == 2 and report["command"].startswith("python bench/step_profile.py --cutoff 256")
    for part in ("module: self.log", "module: grad norm + its check", "module: loss finite check"):
        assert parts[part] > 0, parts
    assert any(k.startswith("callback SpeedAndMemory") for k in parts)
    assert abs(sum(parts.values()) - report["step_s"]) < 1e-6 and parts["forward, backward, optimizer (the rest)"] > 0
    assert "| **step** |" in printed


def test_startup_bench_times_every_command_against_import_torch(tmp_path):
    out = tmp_path / "startup.json"
    _bench("startup.py", "--repeat", "1", "--first-step-runs", "0", "--out", str(out), cwd=tmp_path)
    record = json.loads(out.read_text())
    figures = record["figures"]
    assert record["command"] == f"python bench/startup.py --repeat 1 --first-step-runs 0 --out {out}"
    for name in ("--help", "--cfg job", "-sc install=bash", "optim.lr=fast (a config error)"):
        assert figures[f"python train.py {name}"]["wall_s"] > 0
    assert figures['python -c "import torch"']["wall_vs_import_torch"] == 1.0
    assert all(f["wall_vs_import_torch"] == round(f["wall_s"] / figures['python -c "import torch"']["wall_s"], 2)
               for f in figures.values())  # fmt: skip
    assert record["to_first_step"] is None

"""An optimizer step trains on the mean over all of its tokens, however they are split: accumulated batches, DDP
ranks, or two nodes give the losses and weights of one process with the same global batch; validation counts
every example once on any number of ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import QUICK, REPO, adapter_weights, losses, run_train, train_cli

from telechat_lab.data.dataset import EncodedDataset
from telechat_lab.data.packing import PackedDataset, join_examples
from telechat_lab.tokenizer import IGNORE_INDEX as IGNORE

# padded batches of varying lengths (the case where a mean of batch means is wrong), no dropout; 12 training
# examples (a whole number of global batches of 4: no rank repeats one), 5 validation examples (not a multiple of 2).
# optim.eps: with Adam's 1e-8 an element whose gradient is ~0 (lora_A after the first step) moves by lr x the sign of
# its rounding noise, so a different summation order (ranks, accumulation) could flip it; 1e-4 damps those alone
SAME = [*QUICK, "data.max_samples=17", "data.val_size=5", "adapter.dropout=0", "trainer.max_steps=3", "optim.eps=1e-4"]


def test_targets_count_what_the_loss_counts():
    tokens = np.arange(9)
    labels = np.array([IGNORE, 5, 6, IGNORE, IGNORE, 7, 8, 9, IGNORE])  # example 0: 3 tokens, example 1: 6
    offsets = np.array([0, 3, 9])
    ds = EncodedDataset(tokens, labels, offsets, index=np.array([1, 0, 1]))
    assert ds.targets().tolist() == [3, 2, 3]
    first_label_set = EncodedDataset(tokens, np.array([4, 5, 6, 7, 8, 9, 1, 2, 3]), offsets)
    assert first_label_set.targets().tolist() == [2, 5]  # an example's first label predicts nothing
    packed = PackedDataset(ds, capacity=9)
    for row, count in zip(packed.rows, packed.targets()):
        joined = join_examples([ds[i] for i in row])
        assert count == int((joined["labels"][1:] != IGNORE).sum())


def test_accumulated_batches_equal_one_batch_of_them_all(tmp_path):
    one = run_train(tmp_path / "one", *SAME, "data.batch_size=4")
    two = run_train(tmp_path / "two", *SAME, "data.batch_size=2", "trainer.accumulate_grad_batches=2")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    a, b = adapter_weights(tmp_path / "one"), adapter_weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=2e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_and_two_nodes_equal_one_process_with_the_same_global_batch(tmp_path):
    """2 ranks x batch 2 (DDP on one node, then two nodes of one process each, as torchrun/SLURM start them) give
    the losses, validation loss and weights of 1 process x batch 4; 5 validation examples on 2 ranks count once."""
    cache = f"data.cache_dir={tmp_path}/cache"
    run_train(tmp_path / "one", *SAME, "data.batch_size=4")
    common = [*SAME, "data.batch_size=2", "hardware.accelerator=cpu", cache]
    train_cli([*common, "hardware=ddp", "hardware.devices=2", f"output_dir={tmp_path / 'ddp'}"], tmp_path)

    nodes = [*common, "hardware=multinode", "hardware.devices=1", "hardware.num_nodes=2"]
    port = str(free_port())
    procs = []
    for node in (0, 1):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "NODE_RANK": str(node),
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "2",
            "PYTHONUNBUFFERED": "1",
        }
        args = [sys.executable, str(REPO / "train.py"), *nodes, f"output_dir={tmp_path / 'nodes'}"]
        procs.append(subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out.decode()[-3000:]

    expected = losses(tmp_path / "one")
    for run in ("ddp", "nodes"):
        assert losses(tmp_path / run) == pytest.approx(expected, rel=1e-5), run
        assert losses(tmp_path / run, "val") == pytest.approx(losses(tmp_path / "one", "val"), rel=1e-5), run
        weights, reference = adapter_weights(tmp_path / run), adapter_weights(tmp_path / "one")
        for name in reference:
            torch.testing.assert_close(weights[name], reference[name], rtol=1e-4, atol=2e-5)

"""python preference_ddp.py TINY_DIR OUT WORLD STAGE: a few dpo / kto steps on WORLD gloo processes (ddp_spawn), each
rank its share of the same global batches, the logged metrics and the final LoRA weights written to OUT (a JSON
file and a .pt file). Run by tests/test_stage_train.py to compare 2 ranks with 1."""

from __future__ import annotations

import json
import sys

import lightning as L
import torch
from test_preference import kto_batch, pairs_batch

from telechat_lab.config import AdapterConfig, ModelConfig, OptimConfig
from telechat_lab.config.schema import StageConfig
from telechat_lab.training.module import TelechatLitModule

STEPS, GLOBAL = 3, 4  # optimizer steps; pairs (or KTO examples) per global batch


def shard(batch: dict, rank: int, world: int, paired: bool) -> dict:
    n = GLOBAL
    rows = [i for i in range(n) if i % world == rank]
    if paired:
        rows = rows + [i + n for i in rows]
    return {k: v[rows] for k, v in batch.items()}


class Shards(L.LightningDataModule):
    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage
        self.kind = "pairwise" if stage == "dpo" else "kto"

    def train_dataloader(self):
        paired = self.stage == "dpo"
        rank, world = self.trainer.global_rank, self.trainer.world_size
        batches = [
            pairs_batch(seed=s, pairs=GLOBAL) if paired else kto_batch(seed=s, n=GLOBAL)[0] for s in range(STEPS)
        ]
        shards = [shard(b, rank, world, paired) for b in batches]
        for b in shards:
            b["step_examples"] = torch.tensor(float(GLOBAL))
        return torch.utils.data.DataLoader(shards, batch_size=None)


class Record(L.Callback):
    """Rank 0 writes each step's train/ metrics and, at the end, the trained weights (in the training process:
    ddp_spawn's parent never builds the model)."""

    def __init__(self, out: str):
        self.out, self.rows = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            with open(self.out + ".json", "w") as f:
                json.dump(self.rows, f)
            trained = {n: p.detach() for n, p in pl_module.model.named_parameters() if p.requires_grad}
            torch.save(trained, self.out + ".pt")


def main(tiny_dir: str, out: str, world: int, stage: str) -> None:
    torch.manual_seed(0)
    settings = StageConfig(name=stage, beta=0.5)
    # eps 1e-4 as tests/test_distributed.py: with 1e-8 an element whose gradient is ~0 moves by lr x the sign of
    # its rounding noise, which another summation order (ranks) may flip
    optim = OptimConfig(lr=1e-2, eps=1e-4)
    module = TelechatLitModule(tiny_dir, ModelConfig(), AdapterConfig(dropout=0.0), optim, stage=settings)
    record = Record(out)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp_spawn" if world > 1 else "auto",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
        use_distributed_sampler=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=Shards(stage))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])

"""Near names for an unknown key: the keys of its group (Lightning's Trainer arguments for `trainer.`), the
other groups' keys of the same name (`lr` -> `optim.lr`), and the HF Trainer / LLaMA-Factory names users bring
along (`learning_rate` -> `optim.lr`). Suggested before `+key` (adding a key) is offered."""

from __future__ import annotations

import difflib
import functools

from omegaconf import DictConfig, OmegaConf

# HF TrainingArguments / LLaMA-Factory name -> this project's key (tests check each exists in the train config)
ALIASES = {
    "learning_rate": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "adam_beta1": "optim.betas",
    "adam_beta2": "optim.betas",
    "adam_epsilon": "optim.eps",
    "lr_scheduler_type": "optim.scheduler",
    "warmup_steps": "optim.warmup_steps",
    "warmup_ratio": "optim.warmup_ratio",
    "num_train_epochs": "trainer.max_epochs",
    "epochs": "trainer.max_epochs",
    "max_steps": "trainer.max_steps",
    "gradient_accumulation_steps": "trainer.accumulate_grad_batches",
    "max_grad_norm": "trainer.gradient_clip_val",
    "eval_steps": "trainer.val_check_interval",
    "per_device_train_batch_size": "data.batch_size",
    "batch_size": "data.batch_size",
    "per_device_eval_batch_size": "data.eval_batch_size",
    "dataset": "data.datasets",
    "dataset_dir": "data.dataset_dir",
    "cutoff_len": "data.cutoff_len",
    "max_length": "data.cutoff_len",
    "max_seq_length": "data.cutoff_len",
    "max_samples": "data.max_samples",
    "val_size": "data.val_size",
    "packing": "data.packing",
    "train_on_prompt": "data.train_on_prompt",
    "mask_history": "data.mask_history",
    "preprocessing_num_workers": "data.preprocessing_num_workers",
    "model_name_or_path": "model.path",
    "flash_attn": "model.attn_implementation",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "lora_rank": "adapter.rank",
    "lora_r": "adapter.rank",
    "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout",
    "lora_target": "adapter.target",
    "target_modules": "adapter.target",
    "use_rslora": "adapter.rslora",
    "use_dora": "adapter.use_dora",
    "freeze_trainable_layers": "adapter.trainable_layers",
    "ddp_timeout": "hardware.ddp_timeout",
    "output_dir": "output_dir",
    "logging_steps": "logging_steps",
    "save_steps": "save_steps",
    "save_total_limit": "save_total_limit",
    "resume_from_checkpoint": "resume",
}


@functools.cache
def trainer_arguments() -> tuple[str, ...]:
    """The arguments of lightning.pytorch.Trainer (the `trainer` group takes any of them)."""
    import inspect

    from lightning.pytorch import Trainer

    return tuple(name for name in inspect.signature(Trainer.__init__).parameters if name != "self")


def _keys(cfg: DictConfig, parent: str) -> list[str]:
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    known = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    if parent == "trainer" and "trainer" in cfg:
        known += [name for name in trainer_arguments() if name not in known]
    return known


def _exists(cfg: DictConfig, dotted: str) -> bool:
    parent, _, name = dotted.rpartition(".")
    return name in _keys(cfg, parent)


def near_names(key: str, cfg: DictConfig) -> list[str]:
    """Known keys a misspelt or foreign `key` probably means, nearest first (at most a few)."""
    parent, _, name = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    near = [prefix + n for n in difflib.get_close_matches(name, _keys(cfg, parent), n=3, cutoff=0.6)]
    alias = ALIASES.get(name)
    if alias and alias != key and _exists(cfg, alias):
        near.insert(0, alias)
    if not parent:  # `lr=...`: the same name inside a group (optim.lr)
        near += [f"{g}.{name}" for g in _keys(cfg, "") if isinstance(cfg.get(g), DictConfig) and name in cfg[g]]
    return list(dict.fromkeys(n for n in near if n != key))[:4]

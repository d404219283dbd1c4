"""The LightningModule: TeleChat2 built in `configure_model` (so strategies can shard it), the adapter
applied there, AdamW with warmup and a cosine / linear / constant schedule."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from telechat_lab.model import DTYPES

from .adapters import apply_adapter, count_parameters, quantization_config


def load_base_model(model_dir: Path, model: dict, adapter: dict, precision: str = "32-true"):
    from telechat_lab.model import Telechat2ForCausalLM

    attn = model.get("attn_implementation", "auto")
    if attn == "auto":
        attn = "sdpa"
        if torch.cuda.is_available():
            try:
                import flash_attn  # noqa: F401

                attn = "flash_attention_2"
            except ImportError:
                pass
    dtype = model.get("dtype", "auto")
    if dtype == "auto":
        # mixed precision keeps fp32 master weights; "-true" precisions load in that dtype
        dtype = {"bf16-true": "bfloat16", "16-true": "float16"}.get(precision, "float32")
    kwargs = {"dtype": DTYPES[dtype], "attn_implementation": attn}
    quant = quantization_config(adapter)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["dtype"] = quant.bnb_4bit_compute_dtype if getattr(quant, "load_in_4bit", False) else kwargs["dtype"]
    return Telechat2ForCausalLM.from_pretrained(str(model_dir), **kwargs)


class TelechatLitModule(L.LightningModule):
    def __init__(self, model_dir: str | Path, model: dict, adapter: dict, optim: dict):
        super().__init__()
        self.model_dir = Path(model_dir)
        self.model_cfg, self.adapter_cfg, self.optim_cfg = model, adapter, optim
        self.model = None
        self.strict_loading = False  # checkpoints hold only the trained parameters

    def configure_model(self) -> None:
        if self.model is not None:
            return
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        model = load_base_model(self.model_dir, self.model_cfg, self.adapter_cfg, precision)
        checkpointing = bool(self.model_cfg.get("gradient_checkpointing"))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.model = apply_adapter(model, self.adapter_cfg, checkpointing)
        if checkpointing and self.adapter_cfg["type"] in ("lora", "dora", "qlora"):
            self.model.enable_input_require_grads()
        self.n_trainable, self.n_params = count_parameters(self.model)

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss, on_step=True, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        from transformers import get_scheduler

        opt = self.optim_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": opt["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
        fused = opt.get("fused", "auto")
        on_cuda = any(p.is_cuda for p in params)
        fused = on_cuda if fused == "auto" else bool(fused) and on_cuda
        optimizer = torch.optim.AdamW(groups, lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"], fused=fused)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = opt["warmup_steps"] or math.ceil(opt.get("warmup_ratio", 0.0) * total)
        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[opt["scheduler"]]
        extra = {}
        if name == "cosine" and opt.get("min_lr_ratio"):
            name, extra = "cosine_with_min_lr", {"min_lr_rate": opt["min_lr_ratio"]}
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                                  scheduler_specific_kwargs=extra)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
        if grads:
            self.log("grad_norm", torch.stack(grads).norm(), on_step=True, on_epoch=False)

    def on_save_checkpoint(self, checkpoint):
        # keep only what is trained (the adapter, or every weight for full fine-tuning)
        trained = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}

"""The LightningModule: TeleChat2 built in `configure_model` (so strategies can shard it), the adapter applied
there, AdamW with warmup and a cosine / linear / constant schedule, and the guard against NaN / infinite losses
and gradients (`nan_policy`)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from telechat_lab.config import AdapterConfig, ModelConfig, OptimConfig
from telechat_lab.errors import NonFiniteLoss

from .adapters import apply_adapter, count_parameters, describe, quantization_config


def load_base_model(model_dir: Path, model: ModelConfig, adapter: AdapterConfig, precision: str = "32-true"):
    from telechat_lab.model.loading import load_model, resolve_attention, resolve_dtype

    dtype = resolve_dtype(model.dtype, precision=precision)
    kwargs = {}
    quant = quantization_config(adapter)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if getattr(quant, "load_in_4bit", False):
            dtype = quant.bnb_4bit_compute_dtype
    return load_model(
        model_dir, dtype, resolve_attention(model.attn_implementation, torch.cuda.is_available()), **kwargs
    )


class TelechatLitModule(L.LightningModule):
    def __init__(
        self,
        model_dir: str | Path,
        model: ModelConfig,
        adapter: AdapterConfig,
        optim: OptimConfig,
        nan_policy: str = "stop",
        nan_max_skips: int = 10,
    ):
        super().__init__()
        self.model_dir = Path(model_dir)
        self.model_cfg, self.adapter_cfg, self.optim_cfg = model, adapter, optim
        self.nan_policy, self.nan_max_skips = nan_policy, nan_max_skips
        self.skipped_steps = 0
        self.epoch_position = 0.0  # epochs trained, fractional
        self.loss_logged_at = -1
        self.model = None
        self.strict_loading = False  # checkpoints hold only the trained parameters

    def configure_model(self) -> None:
        if self.model is not None:
            return
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        model = load_base_model(self.model_dir, self.model_cfg, self.adapter_cfg, precision)
        checkpointing = self.model_cfg.gradient_checkpointing
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.model = apply_adapter(model, self.adapter_cfg, checkpointing).train()  # from_pretrained: eval mode
        if checkpointing and self.adapter_cfg.type in ("lora", "dora", "qlora"):
            self.model.enable_input_require_grads()
        self.n_trainable, self.n_params = count_parameters(self.model)
        if self._trainer is None or self.trainer.is_global_zero:
            print(
                f"training {self.n_trainable:,} of {self.n_params:,} parameters ({describe(self.adapter_cfg)}), "
                f"{model.dtype} weights, {model.config._attn_implementation} attention"
                + (", gradient checkpointing" if checkpointing else ""),
                flush=True,
            )

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        if not self._finite_everywhere(loss):
            return self._non_finite("loss", loss)
        self.epoch_position = self.trainer.current_epoch + (batch_idx + 1) / max(1, self.trainer.num_training_batches)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=size)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], on_step=True, batch_size=size)
        self.log("epoch", self.epoch_position, on_step=True, batch_size=size)  # fractional (Lightning's is whole)
        self.log("step", float(self.trainer.global_step + 1), on_step=True, batch_size=size)  # 1-based, as checkpoints
        self.loss_logged_at = self.trainer.global_step + 1  # the step this loss belongs to
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.model(**batch, return_logits=False).loss  # the chunked loss: no [tokens, vocab] logits
        size = batch["input_ids"].shape[0]
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=size)
        # the epoch of the weights being validated (also for the validation after the last step)
        self.log("epoch", float(self.epoch_position), on_epoch=True, on_step=False, batch_size=size)
        self.log("step", float(self.trainer.global_step), on_epoch=True, on_step=False, batch_size=size)

    def on_before_optimizer_step(self, optimizer):
        # torch's foreach norm, not lightning's grad_norm: that one turns every parameter's norm into a Python
        # float (a device sync per parameter) to report them one by one
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads)
        if "16-mixed" not in str(self.trainer.precision) and not bool(torch.isfinite(norm)):
            self._non_finite("gradient norm", norm)  # fp16's grad scaler skips overflowing steps itself
            for p in self.model.parameters():
                p.grad = None  # nan_policy=skip: this step changes nothing
            return
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def _finite_everywhere(self, value: torch.Tensor) -> bool:
        finite = torch.isfinite(value.detach()).float()
        if self.trainer.world_size > 1:  # every rank must take the same decision
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        return bool(finite)

    def _non_finite(self, what: str, value: torch.Tensor) -> None:
        step = self.trainer.global_step + 1
        if self.nan_policy == "stop" or self.skipped_steps >= self.nan_max_skips:
            why = (
                "nan_policy=stop"
                if self.nan_policy == "stop"
                else f"{self.skipped_steps} steps were skipped already (nan_max_skips={self.nan_max_skips})"
            )
            raise NonFiniteLoss(
                f"the {what} is {float(value)} at step {step} ({why}): training stopped and nothing "
                "of this step was saved; the checkpoints written before it are intact. A lower "
                "optim.lr, more optim.warmup_steps or trainer.gradient_clip_val usually help; "
                "nan_policy=skip skips such steps"
            )
        self.skipped_steps += 1
        self.print(
            f"skipping step {step}: the {what} is {float(value)} (nan_policy=skip, "
            f"{self.skipped_steps} of at most {self.nan_max_skips})"
        )
        return None

    def configure_optimizers(self):
        from transformers import get_scheduler

        opt = self.optim_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        on_cuda = any(p.is_cuda for p in params)
        fused = on_cuda if opt.fused == "auto" else bool(opt.fused) and on_cuda
        optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, fused=fused)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = opt.warmup_steps or math.ceil(opt.warmup_ratio * total)
        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[opt.scheduler]
        extra = {}
        if name == "cosine" and opt.min_lr_ratio:
            name, extra = "cosine_with_min_lr", {"min_lr_rate": opt.min_lr_ratio}
        scheduler = get_scheduler(
            name, optimizer, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=extra
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        # keep only what is trained (the adapter, or every weight for full fine-tuning)
        trained = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint):
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))

"""The LightningModule: TeleChat2 built in `configure_model` (so strategies can shard it), the adapter applied
there, AdamW with warmup and a cosine / linear / constant schedule, and the guard against NaN / infinite losses
and gradients (`nan_policy`). One module for every stage (stages.py): sft and pt train the language-model loss,
dpo and kto a preference objective (objectives.py) with its reference policy."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from telechat_lab.adapter_kinds import adapter_kind
from telechat_lab.config import AdapterConfig, ModelConfig, OptimConfig
from telechat_lab.config.schema import StageConfig
from telechat_lab.errors import NonFiniteLoss
from telechat_lab.model.loading import upcast_trained
from telechat_lab.private_apis import attn_implementation, set_last_lr
from telechat_lab.stages import LOSSES, STAGE_SETTINGS, settings, stage_of
from telechat_lab.tokenizer import IGNORE_INDEX as IGNORE

from .adapters import apply_adapter, count_parameters, describe, quantization_config, weight_dtypes
from .zero import created_whole, partitioned_loading, uses_deepspeed, zero3_config


def load_base_model(
    model_dir: Path, model: ModelConfig, adapter: AdapterConfig, precision: str = "32-true", packed: bool = False
):
    """The base as training needs it: a frozen base (adapters) in the dtype autocast computes in, 4-bit for QLoRA,
    fp32 master weights for full fine-tuning under mixed precision; attention for padded or packed rows."""
    from telechat_lab.model.loading import load_model, resolve_attention, resolve_dtype

    dtype = resolve_dtype(
        model.dtype, precision=precision, frozen_base=not adapter_kind(adapter.type).trains_whole_base
    )
    kwargs = {}
    quant = quantization_config(adapter)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if getattr(quant, "load_in_4bit", False):
            dtype = quant.bnb_4bit_compute_dtype
    attention = resolve_attention(model.attn_implementation, torch.cuda.is_available(), packed)
    return load_model(model_dir, dtype, attention, **kwargs)


class TelechatLitModule(L.LightningModule):
    def __init__(
        self,
        model_dir: str | Path,
        model: ModelConfig,
        adapter: AdapterConfig,
        optim: OptimConfig,
        nan_policy: str = "stop",
        nan_max_skips: int = 10,
        packed: bool = False,
        stage: StageConfig | None = None,
    ):
        super().__init__()
        self.stage = settings(stage if stage is not None else StageConfig())  # with the stage's defaults
        self.objective = None  # dpo / kto: built in configure_model; sft / pt: the language-model loss
        self.reference = None  # their reference policy (objectives.Reference), None where reference-free
        self.step_stats: dict = {}  # the preference metrics' (sum, count) over the optimizer step so far
        self.packed = packed  # rows hold several documents (data.packing or data.padding_free)
        self.model_dir = Path(model_dir)
        self.model_cfg, self.adapter_cfg, self.optim_cfg = model, adapter, optim
        self.nan_policy, self.nan_max_skips = nan_policy, nan_max_skips
        self.skipped_steps = 0
        self.epoch_position = 0.0  # epochs trained, fractional
        self.loss_logged_at = -1
        self.step_loss: torch.Tensor | float = 0.0  # this rank's part of the optimizer step's loss so far
        self.model = None
        self.strict_loading = False  # checkpoints hold only the trained parameters

    def configure_model(self) -> None:
        if self.model is not None:
            return
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        checkpointing = self.model_cfg.gradient_checkpointing
        zero3 = zero3_config(self._trainer)
        with partitioned_loading(zero3):  # under ZeRO-3 straight into each rank's slices
            model = load_base_model(self._start_dir(), self.model_cfg, self.adapter_cfg, precision, self.packed)
            model = self._merged_reference_adapter(model)
            model.config.loss_implementation = self.model_cfg.loss_implementation
            if checkpointing:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                model.config.use_cache = False
            with created_whole(zero3):
                self.model = apply_adapter(model, self.adapter_cfg).train()  # from_pretrained: eval mode
        if not uses_deepspeed(self._trainer):
            upcast_trained(self.model, precision)  # DeepSpeed keeps fp32 master weights itself
        if self.model_cfg.compile:
            for block in getattr(self.model, "get_base_model", lambda: self.model)().transformer.h:
                block.compile()  # in place: parameter names, checkpoints and PEFT's saving are unchanged
        if checkpointing and adapter_kind(self.adapter_cfg.type).uses_peft:
            self.model.enable_input_require_grads()
        self._build_objective()
        self.n_trainable, self.n_params = count_parameters(self.model)
        if self._trainer is None or self.trainer.is_global_zero:
            print(
                f"training {self.n_trainable:,} of {self.n_params:,} parameters ({describe(self.adapter_cfg)}), "
                f"{weight_dtypes(self.model)}, {attn_implementation(model.config)} attention"
                + (", gradient checkpointing" if checkpointing else "")
                + (", compiled blocks" if self.model_cfg.compile else ""),
                flush=True,
            )
            if self.objective is not None:
                print(self._describe_stage(), flush=True)

    def forward(self, **batch):
        return self.model(**batch)

    # ------------------------------------------------------------------------------------ the stage's objective

    def _reference_dir(self) -> Path | None:
        reference = self.stage.get("reference")
        return Path(reference).expanduser().resolve() if reference else None

    def _start_dir(self) -> Path:
        """Where the base weights come from: stage.reference when it is a whole (full fine-tuned) model."""
        reference = self._reference_dir()
        if reference is not None and not (reference / "adapter_config.json").is_file():
            return reference
        return self.model_dir

    def _merged_reference_adapter(self, model):
        """stage.reference's SFT adapter merged in memory into the base: both the policy's start and, with the
        fresh adapter trained on top disabled, the reference (LoRA on LoRA; never the bare base)."""
        reference = self._reference_dir()
        if reference is None or not (reference / "adapter_config.json").is_file():
            return model
        from peft import PeftModel

        from telechat_lab.model.checks import check_adapter_weights
        from telechat_lab.resolve import check_adapter

        check_adapter(reference)
        check_adapter_weights(reference, self.model_dir)
        return PeftModel.from_pretrained(model, str(reference)).merge_and_unload()

    def finish_export(self, directory: Path) -> None:
        """Called after the adapter is saved (checkpoints.save_pretrained): with stage.reference, the saved
        adapter made a whole policy on its own (objectives.stack_onto_reference)."""
        reference = self._reference_dir()
        if reference is not None and hasattr(self.model, "peft_config"):
            from .objectives import stack_onto_reference

            stack_onto_reference(Path(directory), reference, self.stage["name"])

    def _describe_stage(self) -> str:
        """One line: the stage's settings in effect (its defaults filled in) and where its reference comes from."""
        loss = LOSSES.get(self.stage.get("loss"))
        unused = set(STAGE_SETTINGS) - {"beta", "loss", *loss.settings} if loss is not None else set()
        shown = {k: v for k, v in self.stage.items() if k not in {"name", "reference", "precompute_reference", *unused}}
        settings_text = ", ".join(f"{k} {v}" for k, v in shown.items())
        reference = self._reference_dir()
        if self.reference is None:
            where = "none (reference-free)"
        elif self.reference.copy is not None:
            where = "a frozen copy of the starting weights"
        elif hasattr(self.model, "peft_config"):
            where = "the base with the adapters disabled"
        else:
            where = "the starting weights"
        if self.reference is not None and reference is not None:  # merged into the base: never the bare base
            where = f"the SFT policy of {reference} (merged into the base; the new adapter disabled)"
        if self.reference is not None and self.stage["precompute_reference"]:
            where += ", precomputed before training"
        return f"stage={self.stage['name']}: {settings_text}; reference: {where}"

    def _uses_reference(self) -> bool:
        if not stage_of(self.stage["name"]).preference:
            return False
        return self.stage["name"] == "kto" or LOSSES[self.stage["loss"]].uses_reference

    def _build_objective(self) -> None:
        from .objectives import Kto, PairedPreference, Reference

        row = stage_of(self.stage["name"])
        if not row.preference:
            return
        reference = Reference(self) if self._uses_reference() else None
        if reference is not None and not self.stage["precompute_reference"] and not hasattr(self.model, "peft_config"):
            import copy

            # full / freeze fine-tuning: a frozen copy of the starting weights, held outside the module's
            # parameters (not trained, not checkpointed, not in the optimizer)
            reference.copy = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.reference = reference
        self.objective = (PairedPreference if row.paired else Kto)(self, self.stage, reference)

    def training_step(self, batch, batch_idx):
        """The loss of an optimizer step is the mean over all the tokens it trains on, however they are split into
        accumulated batches and ranks (as one batch of them all would give): each batch's summed loss is divided
        by the step's token count, then scaled back for what Lightning (the mean over accumulated batches),
        DDP (the mean over ranks) and DeepSpeed (again the mean over accumulated batches) divide by."""
        trainer = self.trainer
        accumulate, world = trainer.accumulate_grad_batches, trainer.world_size
        first = batch_idx - batch_idx % accumulate
        stop = min(first + accumulate, trainer.num_training_batches)
        if self.objective is None:
            share = self.model(**batch, num_items_in_batch=self._step_targets(batch)).loss
        else:  # the batch's summed preference loss over the step's pairs (or KTO examples)
            divisor = self._step_examples(batch)
            total, stats = self.objective.summed(batch)
            share = total / divisor
        if not self._finite_everywhere(share):
            return self._non_finite("loss", share)
        if self.objective is not None:
            self.step_stats = _add_stats(self.step_stats, stats)
        self.step_loss = self.step_loss + share.detach()
        if batch_idx + 1 == stop:  # the step's last batch: its loss is complete on this rank
            loss = trainer.strategy.reduce(self.step_loss, reduce_op="sum") if world > 1 else self.step_loss
            self.step_loss = 0.0
            self.epoch_position = trainer.current_epoch + (batch_idx + 1) / max(1, trainer.num_training_batches)
            if trainer.num_training_batches == float("inf"):  # data.streaming: the stream's own (whole) epoch
                self.epoch_position = float(getattr(trainer.datamodule, "stream_epoch", trainer.current_epoch))
            self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=1)
            self.log("train/lr", self.lr_schedulers().get_last_lr()[0], on_step=True, batch_size=1)
            self.log("epoch", self.epoch_position, on_step=True, batch_size=1)  # fractional (Lightning's is whole)
            self.log("step", float(trainer.global_step + 1), on_step=True, batch_size=1)  # 1-based, as checkpoints
            self.loss_logged_at = trainer.global_step + 1  # the step this loss belongs to
            if self.objective is not None:
                self._log_stats("train", self.step_stats, on_step=True)
                self.step_stats = {}
        twice = accumulate if trainer.strategy.handles_gradient_accumulation else 1  # DeepSpeed divides again
        return share * (accumulate * twice * world)

    def _step_targets(self, batch) -> torch.Tensor:
        """Tokens this batch's optimizer step trains on, over every rank: what the data module put in the batch
        (`step_targets`); without that data module, this batch's own tokens as if each batch were a step."""
        if "step_targets" in batch:
            return batch.pop("step_targets").to(self.device)
        count = int((batch["labels"][..., 1:] != IGNORE).sum())
        count *= self.trainer.accumulate_grad_batches * self.trainer.world_size
        return torch.tensor(max(count, 1), dtype=torch.float32, device=self.device)

    def on_fit_start(self):
        """The data module yields the stage's kind of batches; stage.precompute_reference: the reference
        log-probabilities of the data, before the first step."""
        row = stage_of(self.stage["name"])
        kind = getattr(self.trainer.datamodule, "kind", "sft")  # the stage data module's (contract_stages)
        if kind != row.data and {kind, row.data} != {"sft", "pt"}:  # pt batches have sft's shape
            from telechat_lab.errors import DataError

            raise DataError(
                f"stage={row.name} trains on {row.data} data, but the data module yields {kind} batches "
                "(this build reads no preference data yet)"
            )
        if self.objective is None or self.reference is None or not self.stage["precompute_reference"]:
            return
        from telechat_lab import cache_root

        from .objectives import precompute_reference

        datamodule = self.trainer.datamodule
        loaders = [datamodule.train_dataloader()]
        if self.trainer.limit_val_batches != 0:
            val = datamodule.val_dataloader()
            loaders += [val] if not isinstance(val, list) else val
        data_cfg = getattr(datamodule, "cfg", None)
        root = Path(data_cfg.cache_dir).expanduser() if getattr(data_cfg, "cache_dir", None) else cache_root()
        resumed = self.trainer.ckpt_path is not None
        self.reference.table = precompute_reference(self, loaders, root, resumed)

    def _step_examples(self, batch) -> torch.Tensor:
        """Pairs (dpo) or examples (kto) of this batch's optimizer step over every rank (`step_examples` of the
        data module's batch; without it, this batch's as if each batch were a step)."""
        batch.pop("step_targets", None)
        if "step_examples" in batch:
            return batch.pop("step_examples").to(self.device).float()
        count = self.objective.examples(batch) * self.trainer.accumulate_grad_batches * self.trainer.world_size
        return torch.tensor(float(max(count, 1)), device=self.device)

    def _log_stats(self, split: str, stats: dict, on_step: bool) -> None:
        """The preference metrics, each its sum over the step (or validation) and every rank / its count."""
        from .objectives import margins

        if not stats:
            return
        names = sorted(stats)
        packed = torch.stack([torch.stack([stats[n][0], stats[n][1]]) for n in names]).to(self.device)
        if self.trainer.world_size > 1:
            packed = self.trainer.strategy.reduce(packed, reduce_op="sum")
        values = {n: float(packed[i, 0] / packed[i, 1]) for i, n in enumerate(names) if float(packed[i, 1]) > 0}
        for name, value in margins(values).items():
            self.log(f"{split}/{name}", value, on_step=on_step, on_epoch=not on_step, batch_size=1, sync_dist=False)

    def on_validation_epoch_start(self):
        self.val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.val_count = torch.zeros((), dtype=torch.float64, device=self.device)
        self.val_stats = {}

    def validation_step(self, batch, batch_idx):
        if self.objective is not None:  # val/loss: the preference loss, the mean over the validation pairs
            batch.pop("step_examples", None)
            batch.pop("step_targets", None)
            total, stats = self.objective.summed(batch)
            self.val_sum += total.detach().double()
            self.val_count += self.objective.examples(batch)
            self.val_stats = _add_stats(self.val_stats, stats)
            return
        # summed, with the chunked loss (no [tokens, vocab] logits); val/loss is the mean over all tokens
        total = self.model(**batch, return_logits=False, num_items_in_batch=1).loss
        self.val_sum += total.detach().double()
        self.val_count += (batch["labels"][..., 1:] != IGNORE).sum()

    def on_validation_epoch_end(self):
        total, count = self.val_sum, self.val_count
        if self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        self.log("val/loss", (total / count.clamp(min=1)).float(), prog_bar=True)
        if self.objective is not None:
            self._log_stats("val", self.val_stats, on_step=False)
        # the epoch of the weights being validated (also for the validation after the last step)
        self.log("epoch", float(self.epoch_position))
        self.log("step", float(self.trainer.global_step))

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
        step, value = self.trainer.global_step + 1, value.detach()  # only its value is printed (no autograd warning)
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

    def on_train_start(self):
        """After a resume: the learning rate of the step about to run, from this run's schedule. The restored
        optimizer holds the rate the previous process computed for it, from its own schedule: 0 at the end of a
        run that stopped at max_steps and is now extended (its first step would not train)."""
        scheduler = self.lr_schedulers()
        if scheduler is None or not hasattr(scheduler, "lr_lambdas") or scheduler.last_epoch == 0:
            return
        rates = [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
        for group, rate in zip(scheduler.optimizer.param_groups, rates):
            group["lr"] = rate
        set_last_lr(scheduler, rates)  # what get_last_lr() (train/lr) reports


def _add_stats(into: dict, stats: dict) -> dict:
    """Metric sums and counts added up over batches."""
    out = dict(into)
    for name, (total, count) in stats.items():
        if name in out:
            out[name] = (out[name][0] + total, out[name][1] + count)
        else:
            out[name] = (total, count)
    return out

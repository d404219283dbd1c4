"""What the training step computes for each preference stage (stages.py: dpo, kto), as one small object the one
LightningModule holds (sft and pt are the module's own language-model loss). Each `summed(batch)` returns the
batch's loss SUMMED over its pairs (or KTO examples), which the module divides by the optimizer step's count
(`step_examples`), and the metrics' sums and counts under TRL's names (rewards/chosen, ...).

The reference policy (`Reference`): precomputed log-probabilities when stage.precompute_reference is set; with a
PEFT adapter the same weights with the adapters disabled (after stage.reference's SFT adapter was merged into the
base, that is the SFT policy); for full / freeze fine-tuning a frozen copy of the starting weights."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from .preference import SequenceLogps, chosen_nll, kto_kl, kto_losses, pair_losses, token_logps

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # metric -> (sum, count)


def core_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Telechat2ForCausalLM inside a PEFT model (whose injected layers it holds), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sequence_logps(model: torch.nn.Module, input_ids, attention_mask, labels) -> SequenceLogps:
    """The rows' reply log-probabilities: the backbone's hidden states, then the LM head by chunks
    (config.loss_chunk_size tokens at a time), never the [tokens, vocab] logits of the whole batch."""
    core = core_model(model)
    hidden = core.transformer(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    per_token = token_logps(core.lm_head, hidden, labels, core.config.loss_chunk_size)
    return SequenceLogps.of(per_token, labels)


def row_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor) -> list[str]:
    """A content key per row (its tokens and labels without the padding): where a precomputed reference
    log-probability is found, whatever the batch order or padding length."""
    ids, lab = input_ids.cpu(), labels.cpu()
    lengths = attention_mask.cpu().sum(-1) if attention_mask is not None else torch.full((ids.shape[0],), ids.shape[1])
    keys = []
    for row in range(ids.shape[0]):
        n = int(lengths[row])
        digest = hashlib.sha1(ids[row, :n].numpy().tobytes())
        digest.update(lab[row, :n].numpy().tobytes())
        keys.append(digest.hexdigest())
    return keys


class Reference:
    """The reference policy's summed reply log-probabilities of a batch's rows."""

    def __init__(self, module: Any):
        self.module = module
        self.table: dict[str, float] | None = None  # precomputed: row key -> summed log-probability
        self.copy: torch.nn.Module | None = None  # full / freeze fine-tuning: the frozen starting weights
        self.precomputing = False  # the pass before training: the untrained policy is the reference

    def logps(self, input_ids, attention_mask, labels) -> torch.Tensor:
        if self.table is not None:
            keys = row_keys(input_ids, attention_mask, labels)
            missing = [k for k in keys if k not in self.table]
            if missing and hasattr(self.module.model, "disable_adapter"):  # the base under the adapters is here
                computed = self.compute(input_ids, attention_mask, labels).tolist()
                self.table.update((k, v) for k, v in zip(keys, computed) if k not in self.table)
            elif missing:
                raise RuntimeError(
                    f"{len(missing)} sequences of this batch have no precomputed reference log-probability "
                    "(the data changed after the precomputing pass?)"
                )
            return torch.tensor([self.table[k] for k in keys], dtype=torch.float32, device=input_ids.device)
        return self.compute(input_ids, attention_mask, labels)

    @torch.no_grad()
    def compute(self, input_ids, attention_mask, labels) -> torch.Tensor:
        model = self.module.model
        if self.copy is not None:
            if next(self.copy.parameters()).device != input_ids.device:
                self.copy.to(input_ids.device)
            return sequence_logps(self.copy, input_ids, attention_mask, labels).total.float()
        if not hasattr(model, "disable_adapter"):
            if self.precomputing:
                return sequence_logps(model, input_ids, attention_mask, labels).total.float()
            raise RuntimeError("no reference policy: neither adapters to disable nor a frozen copy")
        with model.disable_adapter():
            return sequence_logps(model, input_ids, attention_mask, labels).total.float()


def _stat(total: torch.Tensor, count: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return total.detach().float().sum(), torch.as_tensor(count, dtype=torch.float32, device=total.device)


class PairedPreference:
    """stage=dpo: chosen and rejected rows [2B, L] in one forward; stage.loss per pair (preference.pair_losses),
    plus stage.sft_weight * the chosen reply's mean NLL."""

    metrics = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
    metrics += ("logps/chosen", "logps/rejected")

    def __init__(self, module: Any, settings: dict, reference: Reference | None):
        self.module, self.settings, self.reference = module, settings, reference

    def examples(self, batch) -> int:
        return batch["input_ids"].shape[0] // 2

    @staticmethod
    def reference_rows(batch) -> list[tuple]:
        """The rows whose reference log-probabilities the loss reads."""
        return [(batch["input_ids"], batch.get("attention_mask"), batch["labels"])]

    def summed(self, batch) -> tuple[torch.Tensor, Stats]:
        s = self.settings
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
        chosen, rejected = sequence_logps(self.module.model, ids, mask, labels).halves()
        ref_chosen = ref_rejected = None
        if self.reference is not None:
            ref_chosen, ref_rejected = self.reference.logps(ids, mask, labels).chunk(2)
        out = pair_losses(
            s["loss"],
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=s["beta"],
            label_smoothing=s["label_smoothing"],
            simpo_gamma=s["simpo_gamma"],
        )
        losses = out.loss
        if s.get("sft_weight"):
            losses = losses + s["sft_weight"] * chosen_nll(chosen)
        n = losses.shape[0]
        stats = {
            "rewards/chosen": _stat(out.chosen_rewards, n),
            "rewards/rejected": _stat(out.rejected_rewards, n),
            "rewards/accuracies": _stat((out.chosen_rewards > out.rejected_rewards).float(), n),
            "rewards/margins": _stat(out.chosen_rewards - out.rejected_rewards, n),
            "logps/chosen": _stat(out.chosen_logps, n),
            "logps/rejected": _stat(out.rejected_logps, n),
        }
        return losses.sum(), stats


class Kto:
    """stage=kto: the examples [B, L] and their mismatched KL rows (kl_input_ids, ...), KTO's loss per example
    (preference.kto_losses), the KL estimate averaged over the ranks as TRL's gather does."""

    metrics = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl")

    def __init__(self, module: Any, settings: dict, reference: Reference):
        self.module, self.settings, self.reference = module, settings, reference

    def examples(self, batch) -> int:
        return batch["input_ids"].shape[0]

    @staticmethod
    def reference_rows(batch) -> list[tuple]:
        return [
            (batch["input_ids"], batch.get("attention_mask"), batch["labels"]),
            (batch["kl_input_ids"], batch.get("kl_attention_mask"), batch["kl_labels"]),
        ]

    def summed(self, batch) -> tuple[torch.Tensor, Stats]:
        s, model = self.settings, self.module.model
        kl_rows = (batch["kl_input_ids"], batch.get("kl_attention_mask"), batch["kl_labels"])
        with torch.no_grad():
            kl_policy = sequence_logps(model, *kl_rows).total.float()
        kl = kto_kl(kl_policy, self.reference.logps(*kl_rows))
        trainer = getattr(self.module, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:
            kl = trainer.strategy.reduce(kl, reduce_op="mean")
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
        policy = sequence_logps(model, ids, mask, labels).total
        out = kto_losses(
            policy,
            self.reference.logps(ids, mask, labels),
            batch["kto_desirable"],
            kl,
            beta=s["beta"],
            desirable_weight=s["desirable_weight"],
            undesirable_weight=s["undesirable_weight"],
        )
        good = batch["kto_desirable"].to(policy.device).bool()
        n_good, n_bad = int(good.sum()), int((~good).sum())
        stats = {
            "rewards/chosen": _stat(out.rewards[good], n_good),
            "rewards/rejected": _stat(out.rewards[~good], n_bad),
            "logps/chosen": _stat(out.logps[good], n_good),
            "logps/rejected": _stat(out.logps[~good], n_bad),
            "kl": _stat(out.kl, 1),
        }
        return out.loss.sum(), stats


def margins(values: dict[str, float]) -> dict[str, float]:
    """KTO's rewards/margins as TRL logs it: the mean desirable reward minus the mean undesirable one."""
    if "rewards/chosen" in values and "rewards/rejected" in values and "rewards/accuracies" not in values:
        values["rewards/margins"] = values["rewards/chosen"] - values["rewards/rejected"]
    return values


def _file_stats(directory: Path) -> list:
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in directory.glob("*.safetensors"))


def reference_cache_file(cache_root: Path, model_dir: Path, reference: Path | None, precision: str, keys: set) -> Path:
    """Where precomputed reference log-probabilities are cached, keyed by the model (its weight files), the
    stage's reference (an SFT adapter's files), the precision and the data (every row's content key)."""
    digest = hashlib.sha256()
    identity = {"model": str(model_dir.resolve()), "weights": _file_stats(model_dir), "precision": precision}
    if reference is not None:
        identity["reference"] = [str(reference), _file_stats(reference)]
    digest.update(json.dumps(identity, sort_keys=True).encode())
    for key in sorted(keys):
        digest.update(key.encode())
    return cache_root / "reference_logps" / f"{digest.hexdigest()[:32]}.pt"


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _gathered(values: Any) -> list:
    """Every rank's `values` (one item per rank; just this one outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [values]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return out


def precompute_reference(module: Any, loaders: list, cache_root: Path, resumed: bool) -> dict[str, float]:
    """stage.precompute_reference: the reference log-probability of every training and validation row, computed
    in one pass before training (or read from the cache of an earlier run on the same model and data), so that no
    reference model is needed during training. A resumed run must find them cached (its policy is not the
    reference any more), unless the reference is the base under the adapters."""
    from telechat_lab.data.cache_files import write_cache_file

    objective, reference = module.objective, module.reference
    keys: set[str] = set()
    for loader in loaders:
        for batch in loader:
            for rows in objective.reference_rows(batch):
                keys.update(row_keys(*rows))
    keys = set().union(*_gathered(keys))
    path = reference_cache_file(
        cache_root, module._start_dir(), module._reference_dir(), str(module.trainer.precision), keys
    )
    if path.is_file():
        table = torch.load(path, weights_only=True)
        if keys <= table.keys():
            module.print(f"reference log-probabilities of {len(keys):,} sequences: {path}")
            return table
    if resumed and not hasattr(module.model, "disable_adapter"):
        raise RuntimeError(
            f"stage.precompute_reference: the reference log-probabilities of this run are not in {path.parent} any "
            "more, and the resumed policy is no longer the reference: restore the cache, or start the run anew"
        )
    module.print(f"precomputing the reference log-probabilities of {len(keys):,} sequences (one pass)")
    table: dict[str, float] = {}
    was_training = module.model.training
    module.model.eval()
    reference.precomputing = True
    try:
        for loader in loaders:
            for batch in loader:
                batch = _to(batch, module.device)
                for rows in objective.reference_rows(batch):
                    values = reference.compute(*rows).tolist()
                    table.update(zip(row_keys(*rows), values))
    finally:
        reference.precomputing = False
        module.model.train(was_training)
    for part in _gathered(table):
        table.update(part)
    if module.trainer.is_global_zero:
        write_cache_file(path, lambda tmp: torch.save(table, tmp))
        module.print(f"cached: {path}")
    return table


def _lora_scale(config: dict) -> float:
    rank, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (directory / "adapter_model.safetensors").is_file():
        return load_file(directory / "adapter_model.safetensors")
    return torch.load(directory / "adapter_model.bin", weights_only=True, map_location="cpu")


def stack_onto_reference(directory: Path, reference: Path, stage: str) -> None:
    """Make the adapter just saved in `directory`, trained on top of stage.reference, a whole policy again:
    - a reference that is a full model: the adapter's base is that model (not model.path);
    - a reference that is an SFT LoRA adapter (merged into the base in memory for training): the two adapters
      stacked into one LoRA of rank r1 + r2 on the original base, A = [A1; A2], B = [s1 B1, s2 B2] with scale 1,
      so that base + the saved adapter is exactly the trained policy (merge.py, chat.py and vLLM take it as any
      adapter), and recorded so beside it (adapter_origin.py: merge says what it holds). The validator refuses
      the cases this cannot represent (DoRA, modules_to_save, rank patterns)."""
    from safetensors.torch import save_file

    from telechat_lab.adapter_origin import record_stacked

    config_file = directory / "adapter_config.json"
    trained = json.loads(config_file.read_text())
    if not (reference / "adapter_config.json").is_file():
        trained["base_model_name_or_path"] = str(reference)
        config_file.write_text(json.dumps(trained, indent=2, sort_keys=True))
        return
    sft = json.loads((reference / "adapter_config.json").read_text())
    first, second = _adapter_tensors(reference), _adapter_tensors(directory)
    r1, r2, s1, s2 = sft["r"], trained["r"], _lora_scale(sft), _lora_scale(trained)
    modules = sorted({k.split(".lora_A.")[0] for k in [*first, *second] if ".lora_A." in k})
    stacked: dict[str, torch.Tensor] = {}
    for module in modules:
        a1, b1 = first.get(f"{module}.lora_A.weight"), first.get(f"{module}.lora_B.weight")
        a2, b2 = second.get(f"{module}.lora_A.weight"), second.get(f"{module}.lora_B.weight")
        like_a, like_b = (a1, b1) if a1 is not None else (a2, b2)
        if a1 is None:
            a1, b1 = like_a.new_zeros(r1, like_a.shape[1]), like_b.new_zeros(like_b.shape[0], r1)
        if a2 is None:
            a2, b2 = like_a.new_zeros(r2, like_a.shape[1]), like_b.new_zeros(like_b.shape[0], r2)
        stacked[f"{module}.lora_A.weight"] = torch.cat([a1, a2.to(a1.dtype)]).contiguous()
        stacked[f"{module}.lora_B.weight"] = torch.cat([b1.float() * s1, b2.float() * s2], dim=1).to(b1.dtype)
    targets = sorted(set(sft.get("target_modules") or []) | set(trained.get("target_modules") or []))
    trained.update(r=r1 + r2, lora_alpha=r1 + r2, use_rslora=False, target_modules=targets)
    trained["base_model_name_or_path"] = sft.get("base_model_name_or_path") or trained.get("base_model_name_or_path")
    save_file(stacked, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_model.bin").unlink(missing_ok=True)
    config_file.write_text(json.dumps(trained, indent=2, sort_keys=True))
    record_stacked(directory, reference, stage)

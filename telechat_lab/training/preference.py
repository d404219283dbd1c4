"""The preference losses (stage=dpo's stage.loss, and stage=kto) as pure functions of sequence log-probabilities,
and those log-probabilities from a model's hidden states without the [tokens, vocab] logits. No Lightning here:
the module (training/objectives.py) calls these, and the tests compare them with TRL.

What TRL 1.16 computes, followed here (its source read for the facts, no code copied):
- sigmoid / ipo (DPOTrainer): a sequence's log-probability is the SUM over its reply tokens; rewards are
  beta * (log pi - log pi_ref) of those sums; ipo divides each log-ratio by its reply's token count in the loss.
- orpo (ORPOTrainer) and simpo (CPOTrainer, loss_type=simpo): the MEAN over the reply tokens; rewards are
  beta * that mean (no reference).
- kto (KTOTrainer): sums; the KL estimate is the batch mean of the log-ratios of mismatched prompt/completion pairs,
  computed without gradients, averaged over ranks, clamped at 0.
Where this project differs (a decision, tested against the papers' formulas): ORPO's NLL term, and stage.sft_weight's,
is each chosen reply's mean token NLL averaged over pairs (the papers' per-sequence L_SFT), where TRL takes the mean
over every token of the batch (ORPO: the prompt's tokens too); the two agree on replies of equal length. The label
smoothing of sigmoid is cDPO's (as TRL's CPOTrainer and TRL before 1.0 compute it); TRL 1.16's DPOTrainer keeps it
for its separate "robust" loss only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _chunk_token_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each token of one chunk (0 where the target is IGNORE); the logits live only here."""
    logits = lm_head(hidden).float()
    return -F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")


def token_logps(
    lm_head: torch.nn.Module, hidden_states: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Per-token log-probabilities [N, L] of `labels` (each position t: log p(labels[t + 1] | tokens <= t); 0 where
    the next label is IGNORE, and at the last position) from the backbone's hidden states [N, L, H], `chunk_size`
    tokens through `lm_head` at a time under activation checkpointing: no [N * L, vocab] logits exist at once."""
    shifted = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shifted.reshape(-1).to(hidden.device)
    parts = []
    for start in range(0, targets.numel(), chunk_size):
        stop = start + chunk_size
        if torch.is_grad_enabled():
            parts.append(
                checkpoint(_chunk_token_logps, lm_head, hidden[start:stop], targets[start:stop], use_reentrant=False)
            )
        else:
            parts.append(_chunk_token_logps(lm_head, hidden[start:stop], targets[start:stop]))
    return torch.cat(parts).view(labels.shape)


def logits_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same as token_logps from full logits [N, L, V] (scoring, tests)."""
    shifted = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    flat = -F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    return flat.view(labels.shape)


def target_counts(labels: torch.Tensor) -> torch.Tensor:
    """The number of predicted (reply) tokens of each row [N]."""
    return (labels[..., 1:] != IGNORE).sum(-1)


@dataclass
class SequenceLogps:
    """A batch's per-row log-probabilities: `total` [N] the sum over the reply tokens, `count` [N] their number."""

    total: torch.Tensor
    count: torch.Tensor

    @classmethod
    def of(cls, per_token: torch.Tensor, labels: torch.Tensor) -> SequenceLogps:
        return cls(per_token.sum(-1), target_counts(labels).to(per_token.device))

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)

    def halves(self) -> tuple[SequenceLogps, SequenceLogps]:
        """Rows 0..B-1 (chosen) and B..2B-1 (rejected) of a paired batch."""
        n = self.total.shape[0] // 2
        return SequenceLogps(self.total[:n], self.count[:n]), SequenceLogps(self.total[n:], self.count[n:])


@dataclass
class PairLosses:
    """Per pair [B]: the loss (what the step averages), and for the metrics (detached) the rewards and the
    sequence log-probabilities as TRL logs them (logps/chosen: sums for sigmoid/ipo, means for orpo/simpo)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - e) log sigma(z) - e log sigma(-z): cDPO's loss of a pair whose label is wrong with chance e."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = loss * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    return loss


def pair_losses(
    loss: str,
    chosen: SequenceLogps,
    rejected: SequenceLogps,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> PairLosses:
    """stage.loss of each pair, from the policy's chosen / rejected log-probabilities (SequenceLogps: sums and token
    counts) and, for the losses with a reference (sigmoid, ipo), the reference's summed log-probabilities [B]."""
    if loss in ("sigmoid", "ipo"):
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"stage.loss={loss} needs the reference log-probabilities")
        chosen_ratio, rejected_ratio = chosen.total - ref_chosen, rejected.total - ref_rejected
        if loss == "sigmoid":
            losses = _smoothed_sigmoid(beta * (chosen_ratio - rejected_ratio), label_smoothing)
        else:  # IPO's Eq. 17, each log-ratio per reply token
            per_token = chosen_ratio / chosen.count.clamp(min=1) - rejected_ratio / rejected.count.clamp(min=1)
            losses = (per_token - 1 / (2 * beta)) ** 2
        return PairLosses(
            losses,
            beta * chosen_ratio.detach(),
            beta * rejected_ratio.detach(),
            chosen.total.detach(),
            rejected.total.detach(),
        )
    chosen_mean, rejected_mean = chosen.mean, rejected.mean
    if loss == "simpo":
        losses = _smoothed_sigmoid(beta * (chosen_mean - rejected_mean) - simpo_gamma, label_smoothing)
    elif loss == "orpo":
        # log odds(y) = log p - log(1 - p) with log p the mean token log-probability (ORPO Eq. 4, 6, 7)
        log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
        losses = -chosen_mean - beta * F.logsigmoid(log_odds)  # NLL(chosen) + lambda * L_OR
    else:
        raise ValueError(f"unknown stage.loss={loss}")
    return PairLosses(
        losses,
        beta * chosen_mean.detach(),
        beta * rejected_mean.detach(),
        chosen_mean.detach(),
        rejected_mean.detach(),
    )


@dataclass
class KtoLosses:
    """Per example [B]: the weighted loss, and (detached) the rewards beta * h(y), the summed log-probabilities and
    the KL estimate z the batch used."""

    loss: torch.Tensor
    rewards: torch.Tensor
    logps: torch.Tensor
    kl: torch.Tensor


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """The batch's KL estimate before averaging over ranks and clamping: the mean log-ratio of the mismatched
    pairs, detached (no gradient flows through z, as in the paper and TRL)."""
    return (kl_logps - ref_kl_logps).mean().detach()


def kto_losses(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KtoLosses:
    """KTO (Eq. 7) per example from summed log-probabilities [B], `desirable` bool [B] and the KL estimate (already
    averaged over ranks: kto_kl); z = max(kl, 0)."""
    z = kl.detach().clamp(min=0)
    ratio = logps - ref_logps
    desirable = desirable.to(ratio.device).bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio))),
    )
    return KtoLosses(losses, beta * ratio.detach(), logps.detach(), z)


def chosen_nll(chosen: SequenceLogps) -> torch.Tensor:
    """Each pair's chosen reply's mean token negative log-likelihood [B] (stage.sft_weight's term, RPO's)."""
    return -chosen.mean

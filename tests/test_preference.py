"""The preference stages against an independent oracle: TRL 1.16 (the dev extra) computes each stage.loss on the same
tiny model, weights and batch, and our loss and LoRA gradients must equal it. Where TRL computes a loss otherwise
than this project decided (cDPO's label smoothing on the sigmoid loss, the per-pair SFT term), the test writes the
paper's formula itself. Tolerance: fp32 on CPU, the same per-token log-probabilities summed in another order
(chunked LM head here, TRL's fused one there): 1e-5 relative, 1e-6 absolute, for losses and every gradient."""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from types import MethodType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from telechat_lab.config import AdapterConfig, ModelConfig, OptimConfig
from telechat_lab.config.schema import StageConfig
from telechat_lab.training.module import TelechatLitModule
from telechat_lab.training.objectives import sequence_logps
from telechat_lab.training.preference import IGNORE, SequenceLogps, kto_kl, kto_losses, logits_token_logps, pair_losses

trl = pytest.importorskip("trl", reason="trl (the dev extra) is the oracle of these tests")

RTOL, ATOL = 1e-5, 1e-6


def padded(rows: list[list[int]], label_from: list[int]) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels: labels from position label_from[i] on (the reply)."""
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, label_from[i] : len(row)] = torch.tensor(row[label_from[i] :])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pairs_batch(seed: int = 0, pairs: int = 3, equal_chosen: bool = False) -> dict[str, torch.Tensor]:
    """A paired batch of the data contract's shape: rows 0..B-1 prompt + chosen, B..2B-1 prompt + rejected."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(3, 8, (pairs,), generator=g)
    prompts = [torch.randint(5, 500, (int(n),), generator=g).tolist() for n in sizes]
    lengths = torch.randint(2, 9, (2, pairs), generator=g)
    if equal_chosen:
        lengths[0] = 5
    chosen = [torch.randint(5, 500, (int(n),), generator=g).tolist() for n in lengths[0]]
    rejected = [torch.randint(5, 500, (int(n),), generator=g).tolist() for n in lengths[1]]
    rows = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
    return padded(rows, [len(p) for p in prompts] * 2)


def make_module(tiny_dir, stage: StageConfig, perturb: bool = True, seed: int = 0) -> TelechatLitModule:
    """The one LightningModule on the tiny model with a LoRA adapter; `perturb`: LoRA's B weights random (at
    adapter init they are 0 and the policy equals the reference)."""
    torch.manual_seed(seed)
    module = TelechatLitModule(tiny_dir, ModelConfig(), AdapterConfig(), OptimConfig(), stage=stage)
    module.configure_model()
    if perturb:
        with torch.no_grad():
            for name, p in module.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    return module


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_grads_equal(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=RTOL, atol=ATOL, msg=name)
    assert any(float(g.abs().max()) > 0 for g in ours.values())


def ours_loss(module, batch) -> tuple[torch.Tensor, dict]:
    total, stats = module.objective.summed(dict(batch))
    n = module.objective.examples(batch)
    return total / n, {k: float(s / c) for k, (s, c) in stats.items() if float(c) > 0}


def trl_fake(model, **attrs) -> SimpleNamespace:
    """The attributes TRL's trainers' _compute_loss reads (its own code then runs on our model unchanged)."""
    from accelerate import Accelerator

    base = dict(
        model=model,
        ref_model=None,
        accelerator=Accelerator(cpu=True),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    return SimpleNamespace(**{**base, **attrs})


def trl_dpo(module, batch, loss_type: str, beta: float, loss_weights=None):
    """TRL's DPOTrainer._compute_loss (its whole path: fused LM head, the reference through PEFT's disabled
    adapters, the loss, the metrics) on a copy of our LoRA model."""
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model = copy.deepcopy(module.model)
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    types = loss_type if isinstance(loss_type, list) else [loss_type]
    fake = trl_fake(
        model,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=types,
        loss_weights=loss_weights or [1.0] * len(types),
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
    )
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != IGNORE).long(),
    }
    loss = DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in fake._metrics["train"].items()}
    return loss.detach(), lora_grads(model), metrics


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_losses_and_gradients_equal_trl(tiny_dir, loss):
    module = make_module(tiny_dir, StageConfig(name="dpo", loss=loss, beta=0.3))
    batch = pairs_batch(seed=1)
    theirs, their_grads, their_metrics = trl_dpo(module, batch, loss, beta=0.3)
    ours, metrics = ours_loss(module, batch)
    ours.backward()
    torch.testing.assert_close(ours.detach(), theirs, rtol=RTOL, atol=ATOL)
    assert_grads_equal(lora_grads(module.model), their_grads)
    for name in module.objective.metrics:  # TRL's names, TRL's values
        assert metrics[name] == pytest.approx(their_metrics[name], rel=1e-5, abs=1e-6), name
    assert float(ours.detach()) != pytest.approx(math.log(2), abs=1e-3)  # the policy differs from the reference


def test_sft_weight_equals_trl_sigmoid_plus_sft_on_equal_reply_lengths(tiny_dir):
    """stage.sft_weight is each pair's mean chosen-token NLL averaged over pairs; TRL's "sft" loss averages over
    the batch's chosen tokens: the same where the chosen replies have one length (else see the next test)."""
    module = make_module(tiny_dir, StageConfig(name="dpo", beta=0.1, sft_weight=0.7))
    batch = pairs_batch(seed=2, equal_chosen=True)
    theirs, their_grads, _ = trl_dpo(module, batch, ["sigmoid", "sft"], beta=0.1, loss_weights=[1.0, 0.7])
    ours, _ = ours_loss(module, batch)
    ours.backward()
    torch.testing.assert_close(ours.detach(), theirs, rtol=RTOL, atol=ATOL)
    assert_grads_equal(lora_grads(module.model), their_grads)


def full_logits_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities from the model's full logits (an independent path from our chunked one)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits, logits_token_logps(logits, batch["labels"])


def test_sigmoid_label_smoothing_and_sft_weight_follow_the_papers(tiny_dir):
    """cDPO (Mitchell 2023): -(1 - e) log sigma(beta d) - e log sigma(-beta d); RPO's SFT term (Pang et al. 2024):
    the chosen reply's NLL divided by its length; unequal reply lengths."""
    module = make_module(tiny_dir, StageConfig(name="dpo", beta=0.2, label_smoothing=0.2, sft_weight=0.5))
    batch = pairs_batch(seed=3)
    ours, _ = ours_loss(module, batch)
    with torch.no_grad():
        _, per_token = full_logits_logps(module.model, batch)
        with module.model.disable_adapter():
            _, ref_per_token = full_logits_logps(module.model, batch)
    logps, ref = per_token.sum(-1), ref_per_token.sum(-1)
    counts = (batch["labels"][:, 1:] != IGNORE).sum(-1)
    b = logps.shape[0] // 2
    d = (logps[:b] - ref[:b]) - (logps[b:] - ref[b:])
    cdpo = -(0.8) * F.logsigmoid(0.2 * d) - 0.2 * F.logsigmoid(-0.2 * d)
    nll = -logps[:b] / counts[:b]
    torch.testing.assert_close(ours.detach(), (cdpo + 0.5 * nll).mean(), rtol=RTOL, atol=ATOL)
    assert len(set(counts[:b].tolist())) > 1  # the per-pair normalisation is exercised


def test_simpo_equals_trl_cpo(tiny_dir):
    """SimPO is TRL's CPOTrainer with loss_type=simpo (cpo_alpha=0: no NLL term): its get_batch_logps (mean over
    the reply tokens) and cpo_loss, on the same model's logits, with label smoothing."""
    from trl.experimental.cpo import CPOTrainer

    stage = StageConfig(name="dpo", loss="simpo", beta=2.0, simpo_gamma=0.8, label_smoothing=0.1)
    module = make_module(tiny_dir, stage)
    batch = pairs_batch(seed=4)
    model = copy.deepcopy(module.model)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = CPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    b = logps.shape[0] // 2
    accelerator = trl_fake(None).accelerator
    fake = SimpleNamespace(
        alpha=0.0, beta=2.0, simpo_gamma=0.8, label_smoothing=0.1, loss_type="simpo", accelerator=accelerator
    )
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(fake, logps[:b], logps[b:])
    losses.mean().backward()
    ours, metrics = ours_loss(module, batch)
    ours.backward()
    torch.testing.assert_close(ours.detach(), losses.mean().detach(), rtol=RTOL, atol=ATOL)
    assert_grads_equal(lora_grads(module.model), lora_grads(model))
    assert metrics["rewards/chosen"] == pytest.approx(float(chosen_rewards.mean()), rel=1e-5)
    assert metrics["logps/rejected"] == pytest.approx(float(logps[b:].mean().detach()), rel=1e-5)


def test_orpo_equals_trl_on_equal_chosen_lengths(tiny_dir):
    """ORPO: TRL's ORPOTrainer.odds_ratio_loss on its get_batch_logps (means), minus from its NLL term (the mean
    cross-entropy over the batch's chosen tokens, given our labels: the reply; TRL's own labels would include the
    prompt). With one chosen length the per-pair NLL here equals TRL's batch mean."""
    from trl.experimental.orpo import ORPOTrainer

    module = make_module(tiny_dir, StageConfig(name="dpo", loss="orpo", beta=0.25))
    batch = pairs_batch(seed=5, equal_chosen=True)
    model = copy.deepcopy(module.model)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    b = logps.shape[0] // 2
    nll = F.cross_entropy(logits[:b, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:b, 1:].reshape(-1))
    fake = SimpleNamespace(beta=0.25, accelerator=trl_fake(None).accelerator)
    losses, chosen_rewards, _, _, _ = ORPOTrainer.odds_ratio_loss(fake, logps[:b], logps[b:])
    theirs = nll - losses.mean()
    theirs.backward()
    ours, metrics = ours_loss(module, batch)
    ours.backward()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=RTOL, atol=ATOL)
    assert_grads_equal(lora_grads(module.model), lora_grads(model))
    assert metrics["rewards/chosen"] == pytest.approx(float(chosen_rewards.mean()), rel=1e-5)


def kto_batch(seed: int = 0, n: int = 4) -> tuple[dict, dict]:
    """Our KTO batch (the contract's: kl rows = prompt i with completion (i - 1) mod n) and TRL's inputs."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 500, (int(k),), generator=g).tolist() for k in torch.randint(3, 7, (n,), generator=g)]
    replies = [torch.randint(5, 500, (int(k),), generator=g).tolist() for k in torch.randint(2, 7, (n,), generator=g)]
    desirable = torch.tensor([True, False, True, False][:n])
    main = padded([p + r for p, r in zip(prompts, replies)], [len(p) for p in prompts])
    rotated = [replies[(i - 1) % n] for i in range(n)]
    kl = padded([p + r for p, r in zip(prompts, rotated)], [len(p) for p in prompts])
    ours = {**main, "kto_desirable": desirable}
    ours.update({"kl_input_ids": kl["input_ids"], "kl_attention_mask": kl["attention_mask"], "kl_labels": kl["labels"]})
    theirs = {
        "input_ids": main["input_ids"],
        "attention_mask": main["attention_mask"],
        "completion_mask": (F.pad(main["labels"], (0, 0)) != IGNORE).long(),
        "label": desirable,
        "KL_input_ids": kl["input_ids"],
        "KL_attention_mask": kl["attention_mask"],
        "KL_completion_mask": (kl["labels"] != IGNORE).long(),
    }
    return ours, theirs


@pytest.mark.parametrize(("seed", "kl_sign"), [(0, 1), (1, -1)])
def test_kto_equals_trl_kto_trainer(tiny_dir, seed, kl_sign):
    """KTOTrainer._compute_loss on the same batch (its KL rows, the reference through disabled adapters, the KL
    estimate clamped at 0): weights for which the estimate is positive, and negative (clamped)."""
    from trl import KTOTrainer
    from trl.trainer.utils import add_fused_lm_head

    stage = StageConfig(name="kto", beta=0.5, desirable_weight=1.3, undesirable_weight=0.8)
    module = make_module(tiny_dir, stage, seed=seed)
    ours_batch, their_inputs = kto_batch(seed=6)
    with torch.no_grad():
        rows = (ours_batch["kl_input_ids"], ours_batch["kl_attention_mask"], ours_batch["kl_labels"])
        raw = kto_kl(sequence_logps(module.model, *rows).total, module.reference.logps(*rows))
    assert float(raw) * kl_sign > 0
    model = copy.deepcopy(module.model)
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits"))
    fake = trl_fake(model, calculate_KL=True, loss_type="kto", beta=0.5, desirable_weight=1.3, undesirable_weight=0.8)
    fake._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, fake)
    theirs = KTOTrainer._compute_loss(fake, model, their_inputs, return_outputs=False)
    theirs.backward()
    ours, metrics = ours_loss(module, ours_batch)
    ours.backward()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=RTOL, atol=ATOL)
    assert_grads_equal(lora_grads(module.model), lora_grads(model))
    trl_metrics = {k: v[-1] for k, v in fake._metrics["train"].items()}
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"):
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name


def test_kto_kl_is_clamped_and_detached():
    logps = torch.tensor([-3.0, -4.0], requires_grad=True)
    kl = kto_kl(torch.tensor([-5.0, -6.0]), torch.tensor([-4.0, -4.0]))  # mean log-ratio -1.5: z = 0
    out = kto_losses(logps, torch.tensor([-3.5, -3.0]), torch.tensor([True, False]), kl, beta=1.0)
    assert float(out.kl) == 0.0 and not kl.requires_grad
    expected = torch.stack([1 - torch.sigmoid(torch.tensor(0.5)), 1 - torch.sigmoid(torch.tensor(1.0))])
    torch.testing.assert_close(out.loss.detach(), expected)


def test_first_lora_dpo_step_is_ln2_with_zero_rewards(tiny_dir):
    """Adapter init (LoRA B = 0): the policy is the reference, so the sigmoid loss is ln 2 and every reward 0."""
    module = make_module(tiny_dir, StageConfig(name="dpo"), perturb=False)
    loss, metrics = ours_loss(module, pairs_batch(seed=7))
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name] == 0.0, name
    assert metrics["logps/chosen"] < 0


def test_losses_refuse_a_missing_reference():
    half = SequenceLogps(torch.tensor([-1.0]), torch.tensor([2]))
    with pytest.raises(ValueError, match="reference"):
        pair_losses("sigmoid", half, half)


def test_chunked_sequence_logps_equal_the_full_logits_and_their_gradients(tiny_dir):
    """The LM head by chunks of 3 tokens (no [tokens, vocab] logits of the batch) gives the full logits' per-token
    log-probabilities and gradients."""
    from telechat_lab.training.preference import token_logps

    module = make_module(tiny_dir, StageConfig(name="dpo"))
    batch = pairs_batch(seed=8)
    core = module.model.get_base_model()
    hidden = core.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    chunked = token_logps(core.lm_head, hidden, batch["labels"], chunk_size=3)
    (chunked.sum()).backward(retain_graph=True)
    ours = lora_grads(module.model)
    module.model.zero_grad()
    full = logits_token_logps(core.lm_head(hidden), batch["labels"])
    full.sum().backward()
    torch.testing.assert_close(chunked, full, rtol=RTOL, atol=ATOL)
    theirs = lora_grads(module.model)
    assert ours.keys() == theirs.keys() and ours
    for name in ours:  # summed over ~60 tokens in another order: gradients of size ~1 agree to 1e-4
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)
    assert bool((chunked[batch["labels"].roll(-1, 1) == IGNORE] == 0).all())  # nothing where nothing is predicted


def test_gradient_checkpointing_gives_the_same_dpo_loss_and_gradients(tiny_dir):
    batch = pairs_batch(seed=9)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = TelechatLitModule(
            tiny_dir,
            ModelConfig(gradient_checkpointing=checkpointing),
            AdapterConfig(),
            OptimConfig(),
            stage=StageConfig(name="dpo"),
        )
        module.configure_model()
        with torch.no_grad():
            for name, p in module.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        loss, _ = ours_loss(module, batch)
        loss.backward()
        results.append((loss.detach(), lora_grads(module.model)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=RTOL, atol=ATOL)
    assert_grads_equal(results[1][1], results[0][1])

"""Preference distillation: DPO over sequence log-probabilities with the teacher (or any frozen model) as reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "kto_pair")


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    average: bool = False,
    shift: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    """Per-sequence log-probability of the labelled (answer) tokens, in float32.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` long; ``ignore_index`` on tokens that are not scored (prompt, image, padding).
        average: Mean over the scored tokens instead of the sum (IPO and length-normalised variants).
        shift: Hugging Face convention: ``labels`` are aligned with ``input_ids`` and the logits at position
            ``t`` score ``labels[t + 1]``. Pass False when the labels are already shifted
            (logits at ``t`` score ``labels[t]``).
        ignore_index: Label value of unscored positions.

    Returns:
        ``(B,)`` float32; 0 for a sequence without scored tokens.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)}: expected {tuple(logits.shape[:2])} (B, T)")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    scored = labels != ignore_index
    targets = labels.masked_fill(~scored, 0).unsqueeze(-1)
    logits32 = logits.float()
    token_logp = logits32.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits32, dim=-1)
    total = (token_logp * scored).sum(-1)
    return total / scored.sum(-1).clamp(min=1) if average else total


class DPODistill(nn.Module):
    """Direct preference optimisation against a frozen reference (LLaVA-MoD's preference distillation).

    With ``h = (log π(y_w) − log π(y_l)) − (log π_ref(y_w) − log π_ref(y_l))``:

    * ``"sigmoid"`` (DPO, Rafailov et al., 2023): ``−(1−ε)·log σ(β h) − ε·log σ(−β h)``; ``ε`` is the label
      smoothing of conservative DPO (the probability that a preference label is flipped).
    * ``"ipo"`` (Azar et al., 2023): ``(h − 1/(2β))²``; IPO is meant for length-averaged log-probabilities
      (``sequence_logprobs(..., average=True)``).
    * ``"hinge"`` (SLiC, Zhao et al., 2023): ``max(0, 1 − β h)``.
    * ``"kto_pair"`` (the paired KTO of the HALOs report, Ethayarajh et al., 2023; LLaVA-MoD's default): with the
      log-ratios ``r_w = log π(y_w) − log π_ref(y_w)``, ``r_l`` likewise, and the batch KL estimates
      ``KL_w = max(0, mean_batch r_w)``, ``KL_l = max(0, mean_batch r_l)``, each answer is scored against the
      *other* half's estimate: ``1 − σ(β (r_w − KL_l))`` for every chosen answer and ``1 − σ(β (KL_w − r_l))`` for
      every rejected one; the loss is the mean of those ``2B`` values. As in TRL's DPOTrainer (0.7) and the official
      LLaVA-MoD code, the KL estimates are not detached, so the gradient also flows through them.

    ``label_smoothing`` applies to ``"sigmoid"`` only (TRL ignores it for the others with a warning; here it is an
    error).

    In LLaVA-MoD the reference is the teacher, so the student is pushed to prefer what the teacher prefers
    relative to the teacher's own likelihoods; any frozen model (e.g. the SFT student) works the same way.

    Args:
        beta: Strength of the implicit KL regulariser.
        loss_type: ``"sigmoid"``, ``"ipo"``, ``"hinge"`` or ``"kto_pair"``.
        label_smoothing: ``ε`` in ``[0, 0.5)``, sigmoid loss only.
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not beta > 0:
            raise ValueError(f"beta={beta}: expected a positive number")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={label_smoothing}: expected 0 <= label_smoothing < 0.5")
        if loss_type != "sigmoid" and label_smoothing:
            raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, not {loss_type!r}")
        self.beta = float(beta)
        self.loss_type = loss_type
        self.label_smoothing = float(label_smoothing)

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor,
        reference_rejected_logps: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The batch-mean loss and logging metrics.

        Args:
            policy_chosen_logps: ``(B,)`` student log-probs of the chosen answers.
            policy_rejected_logps: ``(B,)`` student log-probs of the rejected answers.
            reference_chosen_logps: ``(B,)`` reference log-probs (detached here).
            reference_rejected_logps: ``(B,)``.

        Returns:
            The scalar float32 loss (the batch mean; for ``"kto_pair"`` the mean over the ``2B`` answer scores), and
            detached batch means ``chosen_reward`` (``β·(log π − log π_ref)`` of
            the chosen answers), ``rejected_reward``, ``margin`` (their difference) and ``accuracy`` (fraction
            with chosen reward > rejected reward).
        """
        shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                            reference_rejected_logps)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"the four log-prob tensors must share one (B,) shape, got {sorted(shapes)}")
        chosen = policy_chosen_logps.float() - reference_chosen_logps.detach().float()
        rejected = policy_rejected_logps.float() - reference_rejected_logps.detach().float()
        h = chosen - rejected
        if self.loss_type == "sigmoid":
            eps = self.label_smoothing
            losses = -(1 - eps) * F.logsigmoid(self.beta * h) - eps * F.logsigmoid(-self.beta * h)
        elif self.loss_type == "ipo":
            losses = (h - 1 / (2 * self.beta)) ** 2
        elif self.loss_type == "hinge":
            losses = torch.relu(1 - self.beta * h)
        else:
            # Each half's KL reference is estimated from the other half (KTO report), clamped at 0.
            chosen_kl = chosen.mean().clamp(min=0)
            rejected_kl = rejected.mean().clamp(min=0)
            losses = torch.cat([1 - torch.sigmoid(self.beta * (chosen - rejected_kl)),
                                1 - torch.sigmoid(self.beta * (chosen_kl - rejected))])
        chosen_reward = self.beta * chosen.detach()
        rejected_reward = self.beta * rejected.detach()
        metrics = {
            "chosen_reward": chosen_reward.mean(),
            "rejected_reward": rejected_reward.mean(),
            "margin": (chosen_reward - rejected_reward).mean(),
            "accuracy": (chosen_reward > rejected_reward).float().mean(),
        }
        return losses.mean(), metrics

    def extra_repr(self) -> str:
        return f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}"

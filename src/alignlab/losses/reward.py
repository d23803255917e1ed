"""Reward-model losses on pairs of scalar scores.

Notation: for a batch of ``B`` preference pairs, ``chosen_scores = r(x, y_w)`` and
``rejected_scores = r(x, y_l)``, both ``(B,)``, in reward units (the reward head's raw output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    margin: float | torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise Bradley-Terry loss ``-log sigmoid(r_w - r_l - m)``, optionally plus ``c * (r_w + r_l)^2``.

    The first term is the negative log-likelihood that ``y_w`` is preferred under the Bradley-Terry model;
    the margin ``m`` asks for a larger score gap on pairs rated more distinct; the second term pulls the
    rewards towards mean 0, which fixes the scale the Bradley-Terry loss leaves free.

    Source: Ouyang et al. 2022, InstructGPT (arXiv 2203.02155), eq. 1; margin: Touvron et al. 2023, Llama 2
    (arXiv 2307.09288), eq. 2; centring: Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles
    Mitigate but do not Eliminate Reward Hacking" (arXiv 2312.09244). TRL 1.16: ``RewardTrainer.compute_loss``
    (``margin`` column, ``center_rewards_coefficient``, e.g. 0.01), which returns the batch mean of this
    per-pair loss. OpenRLHF: ``PairWiseLoss`` (``openrlhf/models/loss.py``).

    Args:
        chosen_scores, rejected_scores: ``(B,)`` scores; both get gradients.
        margin: ``m``, a number or a ``(B,)`` tensor (reward units); ``None`` means 0.
        center_rewards_coefficient: ``c`` >= 0 (per squared reward unit); ``None`` means no centring term.

    Returns:
        ``(loss, metrics)``: ``(B,)`` per-pair losses (nats, plus the centring term), and detached ``(B,)``
        per-pair metrics whose batch means are TRL's numbers:

        * ``accuracy``: 1 where ``r_w - r_l > 0`` strictly (ties and the margin do not count), else 0;
        * ``margin``: ``r_w - r_l`` (the score gap, not the ``margin`` argument);
        * ``rewards/chosen``, ``rewards/rejected``: the scores.

    Raises:
        ValueError: scores not both ``(B,)`` of one shape; margin tensor not ``(B,)`` or 0-d;
            center_rewards_coefficient < 0.
    """
    if chosen_scores.dim() != 1 or chosen_scores.shape != rejected_scores.shape:
        raise ValueError(
            f"chosen_scores and rejected_scores must both be (B,), got {tuple(chosen_scores.shape)} and "
            f"{tuple(rejected_scores.shape)}"
        )
    if isinstance(margin, torch.Tensor) and margin.shape not in (chosen_scores.shape, torch.Size([])):
        raise ValueError(
            f"margin must be a number or have shape {tuple(chosen_scores.shape)}, got {tuple(margin.shape)}"
        )
    if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
        raise ValueError(f"center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}")

    gap = chosen_scores - rejected_scores
    loss = -F.logsigmoid(gap if margin is None else gap - margin)
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * (chosen_scores + rejected_scores) ** 2
    metrics = {
        "accuracy": (gap > 0).float().detach(),
        "margin": gap.detach(),
        "rewards/chosen": chosen_scores.detach(),
        "rewards/rejected": rejected_scores.detach(),
    }
    return loss, metrics

"""RLOO: REINFORCE with a leave-one-out baseline, each completion against the mean of its prompt's others."""

from __future__ import annotations

import torch

from alignlab.advantages.group import STD_EPS, checked_rewards
from alignlab.advantages.registry import AdvantageInputs, register_advantage_estimator


def check_reward_clip_range(reward_clip_range: tuple[float, float] | None) -> None:
    """Raise ValueError unless ``reward_clip_range`` is ``None`` or a ``(low, high)`` pair with low < high."""
    if reward_clip_range is None:
        return
    if len(reward_clip_range) != 2 or not reward_clip_range[0] < reward_clip_range[1]:
        raise ValueError(f"reward_clip_range must be (low, high) with low < high, got {tuple(reward_clip_range)}")


def sequence_kl(kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(N, L)`` per-token KL summed over each completion's masked tokens: ``(N,)`` detached (nats).

    Raises:
        ValueError: ``kl`` not 2-D or not of ``mask``'s shape.
    """
    if kl.dim() != 2 or kl.shape != mask.shape:
        raise ValueError(f"kl and mask must be (N, L) of one shape, got {tuple(kl.shape)} and {tuple(mask.shape)}")
    return torch.where(mask.bool(), kl.detach(), 0).sum(-1)


def rloo_advantages(
    scores: torch.Tensor,
    num_generations: int,
    *,
    normalize_advantages: bool = False,
    reward_clip_range: tuple[float, float] | None = None,
    beta: float = 0.0,
    sequence_kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RLOO advantages: ``A_i = R_i - 1/(G-1) sum_{j != i} R_j`` over the ``G`` completions of a prompt.

    In order, as TRL 1.16 ``RLOOTrainer._generate_and_score_completions``:

    1. ``R = clamp(scores, *reward_clip_range)`` when a range is given (TRL ``reward_clip_range``);
    2. ``R = R - beta * sequence_kl`` when ``beta > 0``: the KL penalty is folded into the sequence reward,
       with ``sequence_kl`` the sum over completion tokens of ``k1 = log pi_old - log pi_ref`` (TRL, after the
       RLOO paper; can be negative);
    3. ``A_i = R_i - (sum_group R - R_i) / (G - 1)``, which equals ``G / (G - 1) * (R_i - mean_group R)``;
       ``G = 1`` gives 0 (TRL);
    4. with ``normalize_advantages``, ``A = (A - mean(A)) / (std(A) + 1e-4)`` over all ``N`` completions
       (unbiased std; std 0 for ``N = 1``, where TRL's NaN std also ends in 0).

    Source: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
    Human Feedback in LLMs" (arXiv 2402.14740), the RLOO estimator (eq. 3), from Kool et al. 2019 ("Buy 4
    REINFORCE Samples, Get a Baseline for Free!"). TRL 1.16 ``RLOOTrainer`` (same options and defaults,
    without its NaN handling of unscorable completions); OpenRLHF ``--algo.advantage.estimator rloo`` (which
    clips after the baseline and puts the KL per token instead). veRL ``compute_rloo_outcome_advantage``.

    Args:
        scores: ``(N,)`` finite sequence rewards, ``N = P * G``, prompt by prompt (reward units).
        num_generations: ``G`` >= 1 (TRL ``num_generations``, 2 by default for RLOO).
        normalize_advantages: whiten over the batch (TRL ``normalize_advantages``, default False).
        reward_clip_range: ``(low, high)`` clamp on the scores before anything else (TRL, default ``None``).
        beta: KL coefficient, reward units per nat, >= 0 (TRL RLOO ``beta``, default 0.05 there; 0 here so
            that calling without ``sequence_kl`` works).
        sequence_kl: ``(N,)`` summed per-token k1 KL of each completion (nats), needed when ``beta > 0``;
            :func:`sequence_kl` builds it from ``(N, L)`` tensors.

    Returns:
        ``(advantages, metrics)``: ``(N,)`` detached advantages (reward units, or unitless when normalised) and
        detached 0-d metrics, TRL's: ``reward`` and ``reward_std`` (mean and unbiased std of the raw ``scores``)
        and ``frac_reward_zero_std`` (fraction of prompts whose rewards after steps 1-2 are all equal: their
        advantages are 0 before normalisation).

    Raises:
        ValueError: bad ``scores`` / ``num_generations`` (see :func:`alignlab.advantages.group.checked_rewards`);
            ``beta < 0``; ``beta > 0`` without ``sequence_kl`` of shape ``(N,)``; bad ``reward_clip_range``.
    """
    raw = checked_rewards(scores, num_generations, name="scores")
    check_reward_clip_range(reward_clip_range)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    rewards = raw
    if reward_clip_range is not None:
        rewards = rewards.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    if beta > 0:
        if sequence_kl is None or sequence_kl.shape != raw.shape:
            got = None if sequence_kl is None else tuple(sequence_kl.shape)
            raise ValueError(f"beta > 0 needs sequence_kl of shape {tuple(raw.shape)}, got {got}")
        rewards = rewards - beta * sequence_kl.detach().to(rewards.dtype)

    grouped = rewards.view(-1, num_generations)  # (P, G)
    if num_generations > 1:
        group_std = grouped.std(dim=1)
        baselines = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)  # (P, G)
        advantages = (grouped - baselines).view(-1)
    else:
        group_std = torch.zeros_like(grouped[:, 0])
        advantages = torch.zeros_like(rewards)
    if normalize_advantages:
        batch_std = advantages.std() if advantages.numel() > 1 else torch.zeros_like(advantages[0])
        advantages = (advantages - advantages.mean()) / (batch_std + STD_EPS)

    metrics = {
        "reward": raw.mean(),
        "reward_std": raw.std() if raw.numel() > 1 else torch.zeros_like(raw[0]),
        "frac_reward_zero_std": torch.isclose(group_std, torch.zeros_like(group_std)).float().mean(),
    }
    return advantages, metrics


@register_advantage_estimator("rloo")
def rloo_estimator(
    inputs: AdvantageInputs,
    *,
    normalize_advantages: bool = False,
    reward_clip_range: tuple[float, float] | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Registry entry ``"rloo"``: :func:`rloo_advantages` (``(N,)`` advantages).

    Reads ``scores`` and ``num_generations``, and ``kl`` and ``mask`` when ``beta > 0`` (summed per
    completion by :func:`sequence_kl`; pass k1 to match TRL).

    Raises:
        ValueError: as :func:`rloo_advantages`; ``beta > 0`` without ``inputs.kl`` and ``inputs.mask``.
    """
    seq_kl = None
    if beta > 0:
        if inputs.kl is None or inputs.mask is None:
            raise ValueError("rloo with beta > 0 needs the per-token kl and the completion mask")
        seq_kl = sequence_kl(inputs.kl, inputs.mask)
    return rloo_advantages(
        inputs.scores,
        inputs.num_generations,
        normalize_advantages=normalize_advantages,
        reward_clip_range=reward_clip_range,
        beta=beta,
        sequence_kl=seq_kl,
    )

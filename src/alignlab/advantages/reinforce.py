"""REINFORCE++: per-token KL-penalised returns, whitened over every completion token of the batch.

Shapes: ``N`` completions (``N = P * G`` prompt by prompt for the baseline variant) right-padded to ``L``
tokens; ``scores`` ``(N,)``, ``kl`` and ``mask`` ``(N, L)`` (see :mod:`alignlab.advantages.gae` for the mask
convention). Outputs are ``(N, L)`` per-token advantages, detached, 0 on padding.
"""

from __future__ import annotations

import torch

from alignlab.advantages.gae import _completion_mask, token_rewards
from alignlab.advantages.group import checked_rewards
from alignlab.advantages.registry import AdvantageInputs, register_advantage_estimator
from alignlab.advantages.rloo import check_reward_clip_range

WHITEN_VAR_MIN = 1e-8
"""Floor on the batch variance before ``rsqrt``, as OpenRLHF (``var.clamp(min=1e-8).rsqrt()``)."""


def reward_to_go(rewards: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``(N, L)`` discounted returns ``G_t = sum_{s >= t} gamma^(s - t) r_s`` of ``(N, L)`` per-token rewards
    (reward units; 0 rewards on padding give 0 returns there). ``gamma = 1``: a reversed cumulative sum, as
    veRL's ``compute_remax_outcome_advantage`` and OpenRLHF's ``get_cumulative_returns``."""
    if gamma == 1.0:
        return rewards.flip(-1).cumsum(-1).flip(-1)
    running = torch.zeros_like(rewards[:, 0])
    reversed_returns = []
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        reversed_returns.append(running)
    return torch.stack(reversed_returns[::-1], dim=1)


def reinforce_plus_plus_advantages(
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None = None,
    *,
    kl_coef: float = 0.01,
    gamma: float = 1.0,
    no_std_norm: bool = False,
    reward_clip_range: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE++ advantages, one per completion token.

    1. ``r = clamp(scores, *reward_clip_range)`` when a range is given;
    2. token rewards ``r_t = -kl_coef * kl_t`` on every completion token, plus ``r`` on the last one;
    3. returns ``G_t = sum_{s >= t} gamma^(s - t) r_s`` (the discounted reward-to-go; with ``gamma = 1``,
       ``G_t = r - kl_coef * sum_{s >= t} kl_s``);
    4. advantages ``A_t = (G_t - mean) / sqrt(max(var, 1e-8))``, the mean and the (biased) variance taken over
       every completion token of the batch (global normalisation); ``no_std_norm`` keeps only ``G_t - mean``.

    Source: Hu 2025, "REINFORCE++" (arXiv 2501.03262): token-level KL penalty in the reward, the advantage
    ``r(x, y) - beta sum_{i >= t} KL(i)`` and its global batch normalisation. OpenRLHF
    ``--algo.advantage.estimator reinforce`` (``experience_maker.py``: ``compute_reward``,
    ``get_cumulative_returns``, then the masked mean / variance normalisation of
    ``compute_advantages_and_returns``), reproduced number for number, except that padded positions get 0
    here (OpenRLHF leaves ``-mean * rstd`` there, masked out by its loss) and the KL is used as given
    (OpenRLHF clamps its estimate to [-10, 10] in ``compute_approx_kl``). veRL
    ``compute_reinforce_plus_plus_outcome_advantage`` is the same without the KL term (veRL adds it
    elsewhere).

    Args:
        scores: ``(N,)`` finite sequence rewards (reward units).
        mask: ``(N, L)`` right-padded completion mask with at least one token per row (its last token carries
            the score).
        kl: ``(N, L)`` per-token KL estimate between the sampling policy and the reference (nats; OpenRLHF's
            default ``--algo.kl.estimator k1``: ``log pi_old - log pi_ref``); ``None`` means no penalty and
            needs ``kl_coef = 0``.
        kl_coef: ``beta`` >= 0, reward units per nat (OpenRLHF ``--algo.kl.init_coef``, default 0.01).
        gamma: discount in [0, 1] (OpenRLHF ``--algo.advantage.gamma``, default 1).
        no_std_norm: subtract the mean only (OpenRLHF ``--algo.advantage.no_std_norm``, default False).
        reward_clip_range: ``(low, high)`` clamp of the scores (OpenRLHF ``--reward.clip_range``, default
            ``(-10, 10)`` there; ``None`` here: no clamp).

    Returns:
        ``(advantages, metrics)``: ``(N, L)`` detached advantages (unitless, or reward units with
        ``no_std_norm``), 0 on padding; detached 0-d metrics ``reward`` and ``reward_std`` (mean and unbiased
        std of the raw scores, TRL's names) and ``return`` (mean over completions of the summed token rewards,
        OpenRLHF's ``return``).

    Raises:
        ValueError: bad scores; mask not ``(N, L)``, not right-padded or with an empty row; ``kl`` not of the
            mask's shape; ``kl`` missing with ``kl_coef > 0``; ``kl_coef < 0``; ``gamma`` outside [0, 1]; bad
            ``reward_clip_range``.
    """
    raw = checked_rewards(scores, 1, name="scores")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    check_reward_clip_range(reward_clip_range)
    if mask.dim() != 2 or mask.shape[0] != raw.shape[0]:
        raise ValueError(f"mask must have shape ({raw.shape[0]}, L), got {tuple(mask.shape)}")
    m = _completion_mask(mask, mask.shape)
    lengths = m.sum(-1)
    if (lengths == 0).any():
        raise ValueError("every row of mask needs at least one completion token to carry its score")
    if kl is None and kl_coef > 0:
        raise ValueError("kl_coef > 0 needs the per-token kl (pass kl_coef=0 without a reference model)")
    if kl is not None and kl.shape != m.shape:
        raise ValueError(f"kl must have shape {tuple(m.shape)}, got {tuple(kl.shape)}")

    r = raw if reward_clip_range is None else raw.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    rewards = token_rewards(r, m, kl, kl_coef=kl_coef)  # (N, L)
    returns = reward_to_go(rewards, gamma)

    count = m.sum()
    mean = torch.where(m, returns, 0).sum() / count
    advantages = returns - mean
    if not no_std_norm:
        var = torch.where(m, advantages**2, 0).sum() / count
        advantages = advantages * var.clamp(min=WHITEN_VAR_MIN).rsqrt()
    advantages = torch.where(m, advantages, 0)

    metrics = {
        "reward": raw.mean(),
        "reward_std": raw.std() if raw.numel() > 1 else torch.zeros_like(raw[0]),
        "return": rewards.sum(-1).mean(),
    }
    return advantages, metrics


def reinforce_plus_plus_baseline_advantages(
    scores: torch.Tensor,
    mask: torch.Tensor,
    num_generations: int,
    kl: torch.Tensor | None = None,
    *,
    kl_coef: float = 0.01,
    gamma: float = 1.0,
    no_std_norm: bool = False,
    reward_clip_range: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE++ with a group baseline: each score minus its prompt's mean score, then
    :func:`reinforce_plus_plus_advantages` (KL tokens, returns, global whitening).

    ``r_i = scores_i - mean_group(scores)`` (no division by the group std: the global whitening does the
    scaling), then steps 1-4 of :func:`reinforce_plus_plus_advantages`; so ``reward_clip_range`` clamps the
    baselined reward, as OpenRLHF. ``gamma`` must be 1: OpenRLHF forces it for this estimator.

    Source: Hu 2025, "REINFORCE++" (arXiv 2501.03262), "REINFORCE++ w/ Baseline" (group sampling, ``G > 1``).
    OpenRLHF ``--algo.advantage.estimator reinforce_baseline`` (``rewards - rewards.mean(-1)`` over
    ``n_samples_per_prompt``); veRL ``compute_reinforce_plus_plus_baseline_outcome_advantage``.

    Args:
        scores, mask, kl, kl_coef, no_std_norm, reward_clip_range: as :func:`reinforce_plus_plus_advantages`.
        num_generations: ``G`` >= 1, completions per prompt (``N = P * G``, prompt by prompt); OpenRLHF
            requires ``G > 1`` (with ``G = 1`` every baselined reward is 0).
        gamma: must be 1.0 (kept so one set of hyperparameters serves both variants).

    Returns:
        As :func:`reinforce_plus_plus_advantages`; ``reward`` and ``reward_std`` describe the raw scores,
        ``return`` the baselined ones.

    Raises:
        ValueError: as :func:`reinforce_plus_plus_advantages`; ``gamma != 1``; scores not a multiple of
            ``num_generations``.
    """
    if gamma != 1.0:
        raise ValueError(f"reinforce_plus_plus_baseline uses gamma = 1 (as OpenRLHF), got {gamma}")
    raw = checked_rewards(scores, num_generations, name="scores")
    grouped = raw.view(-1, num_generations)
    baselined = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    advantages, metrics = reinforce_plus_plus_advantages(
        baselined, mask, kl, kl_coef=kl_coef, gamma=1.0, no_std_norm=no_std_norm, reward_clip_range=reward_clip_range
    )
    metrics["reward"] = raw.mean()
    metrics["reward_std"] = raw.std() if raw.numel() > 1 else torch.zeros_like(raw[0])
    return advantages, metrics


def _needs_mask(inputs: AdvantageInputs, name: str) -> torch.Tensor:
    if inputs.mask is None:
        raise ValueError(f"{name} needs the (N, L) completion mask")
    return inputs.mask


@register_advantage_estimator("reinforce_plus_plus")
def reinforce_plus_plus_estimator(inputs: AdvantageInputs, **hyperparameters) -> tuple[torch.Tensor, dict]:
    """Registry entry ``"reinforce_plus_plus"``: :func:`reinforce_plus_plus_advantages` of ``inputs.scores``,
    ``inputs.mask`` and ``inputs.kl`` (``(N, L)`` advantages); hyperparameters as that function's keywords.

    Raises:
        ValueError: as :func:`reinforce_plus_plus_advantages`; no ``inputs.mask``.
    """
    mask = _needs_mask(inputs, "reinforce_plus_plus")
    return reinforce_plus_plus_advantages(inputs.scores, mask, inputs.kl, **hyperparameters)


@register_advantage_estimator("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline_estimator(inputs: AdvantageInputs, **hyperparameters) -> tuple[torch.Tensor, dict]:
    """Registry entry ``"reinforce_plus_plus_baseline"``: :func:`reinforce_plus_plus_baseline_advantages` with
    ``inputs.num_generations`` (``(N, L)`` advantages); hyperparameters as that function's keywords.

    Raises:
        ValueError: as :func:`reinforce_plus_plus_baseline_advantages`; no ``inputs.mask``.
    """
    mask = _needs_mask(inputs, "reinforce_plus_plus_baseline")
    return reinforce_plus_plus_baseline_advantages(
        inputs.scores, mask, inputs.num_generations, inputs.kl, **hyperparameters
    )

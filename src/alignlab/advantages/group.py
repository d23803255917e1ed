"""Group-relative advantages for GRPO: each completion's reward against the other completions of its prompt."""

from __future__ import annotations

import torch

from alignlab.advantages.registry import AdvantageInputs, register_advantage_estimator

SCALE_REWARDS = ("group", "batch", "none")
"""Accepted ``scale_rewards`` values (TRL ``GRPOConfig.scale_rewards``)."""

STD_EPS = 1e-4
"""Added to the standard deviation before dividing, as TRL."""


def checked_rewards(rewards: torch.Tensor, num_generations: int, name: str = "rewards") -> torch.Tensor:
    """``rewards`` detached and floating-point, after checking the group layout shared by the estimators.

    Raises:
        ValueError: ``num_generations`` < 1; ``rewards`` not 1-D, empty, not a multiple of ``num_generations``
            long, or not finite.
    """
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(rewards.shape)}")
    if rewards.numel() % num_generations:
        raise ValueError(
            f"the number of {name} ({rewards.numel()}) must be a multiple of num_generations ({num_generations})"
        )
    rewards = rewards.detach()
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if not torch.isfinite(rewards).all():
        raise ValueError(f"{name} must be finite")
    return rewards


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    scale_rewards: str = "group",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO outcome advantages: ``A_i = (r_i - mean(group)) / (std + 1e-4)``, one value per completion.

    ``rewards`` holds ``N = P * G`` completions laid out prompt by prompt: ``rewards[g*G:(g+1)*G]`` are the
    ``G = num_generations`` completions of prompt ``g`` (TRL's layout, ``rewards.view(-1, G)``). The baseline is
    always the group mean; the divisor depends on ``scale_rewards``:

    * ``"group"``: the group's std (the GRPO paper);
    * ``"batch"``: the std of all ``N`` rewards (group mean, batch std: Liu et al. 2025, "Part I: Tricks or
      Traps? A Deep Dive into RL for LLM Reasoning" (Lite PPO), arXiv 2508.08221, as TRL's docs cite);
    * ``"none"``: no division (Liu et al. 2025, Dr. GRPO, arXiv 2503.20783).

    Standard deviations are unbiased (Bessel's correction, ``torch.std``), as TRL's ``nanstd``; a group of one
    completion (or a batch of one) gets std 0, as TRL, so its advantage is 0.

    Source: Shao et al. 2024, "DeepSeekMath" (arXiv 2402.03300), section 4.1.2 (outcome supervision:
    ``A_i = (r_i - mean(r)) / std(r)``), used in the objective of eq. 3. TRL 1.16: ``GRPOTrainer.
    _generate_and_score_completions`` with ``multi_objective_aggregation="sum_then_normalize"`` (its default).
    OpenRLHF: ``advantage_estimator="group_norm"``.

    Args:
        rewards: ``(N,)`` finite scalar reward per completion (reward units; summed over reward functions).
        num_generations: completions per prompt ``G`` >= 1; ``N`` must be a multiple of it.
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"``.

    Returns:
        ``(advantages, metrics)``: ``(N,)`` detached advantages (reward units divided by std for ``"group"``
        and ``"batch"``, reward units for ``"none"``), and detached 0-d metrics:

        * ``reward``: mean reward;
        * ``reward_std``: unbiased std of all ``N`` rewards (what TRL 1.16 logs under this name);
        * ``reward_std_within_group``: mean over prompts of the group stds (what older TRL logged as
          ``reward_std``);
        * ``frac_reward_zero_std``: fraction of prompts whose group std is 0 (``torch.isclose(std, 0)``, as
          TRL), i.e. whose completions carry no learning signal. TRL 1.16 measures this on the std it divides
          by, so with ``scale_rewards="batch"`` its number is 0 or 1 (is the whole batch's std 0); here it is
          always the per-prompt fraction.

    Raises:
        ValueError: unknown ``scale_rewards``; ``num_generations`` < 1; ``rewards`` not 1-D, empty, not a
            multiple of ``num_generations`` long, or not finite (TRL's NaN handling for unscorable completions
            is not reproduced).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; choose from {', '.join(SCALE_REWARDS)}")
    rewards = checked_rewards(rewards, num_generations)

    grouped = rewards.view(-1, num_generations)
    group_mean = grouped.mean(dim=1)
    group_std = grouped.std(dim=1) if num_generations > 1 else torch.zeros_like(group_mean)
    batch_std = rewards.std() if rewards.numel() > 1 else torch.zeros_like(rewards[0])

    advantages = rewards - group_mean.repeat_interleave(num_generations)
    if scale_rewards == "group":
        advantages = advantages / (group_std.repeat_interleave(num_generations) + STD_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (batch_std + STD_EPS)

    metrics = {
        "reward": rewards.mean(),
        "reward_std": batch_std,
        "reward_std_within_group": group_std.mean(),
        "frac_reward_zero_std": torch.isclose(group_std, torch.zeros_like(group_std)).float().mean(),
    }
    return advantages, metrics


MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
"""Accepted ``multi_objective_aggregation`` values (TRL 1.16 ``GRPOConfig``)."""


def normalize_then_sum(per_source: torch.Tensor, weights: torch.Tensor, num_generations: int) -> torch.Tensor:
    """GDPO's decoupled rewards (Liu et al. 2026, "GDPO: Group reward-Decoupled Normalization Policy
    Optimization for Multi-reward RL Optimization", arXiv 2601.05242): each reward source is normalised within
    each group first, ``(r_k - mean_group(r_k)) / (std_group(r_k) + 1e-4)``, then the weighted sum is taken,
    ``sum_k w_k r_k_normalised``, so that a source with a wide spread cannot drown the others. NaN (a source
    that does not apply to a completion) is left out of its group's mean and std (unbiased) and counts as 0 in
    the sum. The result is group-centred; TRL then divides it by its batch std (``group_advantages`` with
    ``scale_rewards="batch"`` does exactly that, the group mean being 0).

    TRL 1.16 counterpart: ``GRPOTrainer._generate_and_score_completions`` with
    ``multi_objective_aggregation="normalize_then_sum"`` (up to the final batch normalisation).

    Args:
        per_source: ``(N, K)`` unweighted rewards of ``K`` sources, ``N = P * num_generations`` prompt-major.
        weights: ``(K,)`` source weights (``--reward_weights``).
        num_generations: completions per prompt.

    Raises:
        ValueError: shapes that do not match or ``N`` not a multiple of ``num_generations``.
    """
    if per_source.dim() != 2 or weights.shape != per_source.shape[1:] or per_source.shape[0] % num_generations:
        raise ValueError(f"per_source must be (N, K) with N a multiple of {num_generations} and weights (K,), got "
                         f"{tuple(per_source.shape)} and {tuple(weights.shape)}")
    grouped = per_source.detach().float().view(-1, num_generations, per_source.shape[1])
    present = ~grouped.isnan()
    count = present.sum(dim=1, keepdim=True)
    values = torch.where(present, grouped, 0.0)
    mean = values.sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(present, grouped - mean, 0.0)
    std = (centred.pow(2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
    std = torch.where(count > 1, std, 0.0)
    normalised = (centred / (std + STD_EPS)).view(per_source.shape)
    return (normalised * weights.float()).sum(dim=1)


@register_advantage_estimator("grpo")
def grpo_estimator(
    inputs: AdvantageInputs, *, scale_rewards: str = "group"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Registry entry ``"grpo"``: :func:`group_advantages` of ``inputs.scores`` (``(N,)`` advantages).

    Reads ``scores`` and ``num_generations``; ``kl`` and ``mask`` are not used (GRPO puts its KL term in the
    loss, TRL ``beta``). Same numbers, metrics and errors as :func:`group_advantages`.
    """
    return group_advantages(inputs.scores, inputs.num_generations, scale_rewards=scale_rewards)

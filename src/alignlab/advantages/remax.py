"""ReMax: REINFORCE with the reward of each prompt's greedy completion as the baseline of its sampled ones.

Shapes: ``N = P * G`` sampled completions prompt by prompt, right-padded to ``L`` tokens; ``scores`` ``(N,)``,
``baseline_scores`` ``(P,)``, ``kl`` and ``mask`` ``(N, L)`` (the mask convention of
:mod:`alignlab.advantages.gae`). Outputs are ``(N, L)`` per-token advantages, detached, 0 on padding.
"""

from __future__ import annotations

import torch

from alignlab.advantages.gae import token_rewards
from alignlab.advantages.group import checked_rewards
from alignlab.advantages.registry import AdvantageInputs, register_advantage_estimator
from alignlab.advantages.reinforce import reward_to_go


def remax_advantages(
    scores: torch.Tensor,
    baseline_scores: torch.Tensor,
    mask: torch.Tensor,
    num_generations: int = 1,
    kl: torch.Tensor | None = None,
    *,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ReMax advantages, one per completion token.

    1. token rewards ``r_t = -kl_coef * kl_t`` on every completion token, plus the score on the last one
       (:func:`~alignlab.advantages.gae.token_rewards`; no KL: the score alone);
    2. returns ``G_t = sum_{s >= t} r_s`` (undiscounted reward-to-go);
    3. ``A_t = G_t - b`` on the completion tokens, ``b`` the score of the greedy completion of the same prompt.
       Without a KL every token of completion ``i`` gets ``score_i - b``.

    The greedy completion's reward does not depend on the sampled one, so subtracting it leaves the policy
    gradient unbiased and lowers its variance; no value model and no second sample per prompt are needed.

    Source: Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for
    Aligning Large Language Models" (arXiv 2310.10505), Algorithm 1 (the gradient weight ``r(x, a) - r(x,
    a_greedy)``). veRL ``compute_remax_outcome_advantage`` (``verl/trainer/ppo/core_algos.py``:
    ``returns = (token_level_rewards * response_mask)`` reversed cumulative sum, ``advantages = returns -
    reward_baselines * response_mask``), with veRL's ``use_kl_in_reward`` shaping of the token rewards (its
    ReMax example: ``kl_penalty=kl``, i.e. k1); reproduced number for number in the test. veRL samples
    ``rollout.n`` completions per prompt against one greedy baseline, as ``num_generations`` here.

    Args:
        scores: ``(N,)`` finite sequence rewards of the sampled completions (reward units).
        baseline_scores: ``(P,)`` finite scores of each prompt's greedy completion, ``P = N / num_generations``
            (same reward sources and penalties as ``scores``).
        mask: ``(N, L)`` right-padded completion mask with at least one token per row.
        num_generations: ``G`` >= 1 sampled completions per prompt (prompt by prompt).
        kl: ``(N, L)`` per-token KL between the sampling policy and the reference (nats; k1 ``log pi_old - log
            pi_ref`` as veRL's example), or ``None`` with ``kl_coef = 0``.
        kl_coef: >= 0, reward units per nat (veRL ``algorithm.kl_ctrl.kl_coef``; TRL-style flag ``beta``).

    Returns:
        ``(advantages, metrics)``: ``(N, L)`` detached advantages (reward units), 0 on padding; detached 0-d
        metrics ``reward`` and ``reward_std`` (mean and unbiased std of the sampled scores, TRL's names),
        ``baseline_reward`` (mean greedy score) and ``return`` (mean over completions of the summed token
        rewards, OpenRLHF's name).

    Raises:
        ValueError: bad ``scores`` / ``num_generations`` (:func:`~alignlab.advantages.group.checked_rewards`);
            ``baseline_scores`` not ``(N / G,)`` or not finite; as :func:`~alignlab.advantages.gae.token_rewards`
            (mask, ``kl``, ``kl_coef``).
    """
    raw = checked_rewards(scores, num_generations, name="scores")
    prompts = raw.numel() // num_generations
    if baseline_scores.shape != (prompts,):
        raise ValueError(f"baseline_scores must have shape ({prompts},) (one per prompt), "
                         f"got {tuple(baseline_scores.shape)}")
    baseline = checked_rewards(baseline_scores, 1, name="baseline_scores").to(raw.dtype)
    m = mask.bool()
    rewards = token_rewards(raw, mask, kl, kl_coef=kl_coef)  # (N, L)
    returns = reward_to_go(rewards)
    advantages = torch.where(m, returns - baseline.repeat_interleave(num_generations).unsqueeze(1), 0)
    metrics = {
        "reward": raw.mean(),
        "reward_std": raw.std() if raw.numel() > 1 else torch.zeros_like(raw[0]),
        "baseline_reward": baseline.mean(),
        "return": rewards.sum(-1).mean(),
    }
    return advantages, metrics


@register_advantage_estimator("remax")
def remax_estimator(inputs: AdvantageInputs, *, kl_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Registry entry ``"remax"``: :func:`remax_advantages` of ``inputs.scores``, ``inputs.baseline_scores``,
    ``inputs.mask``, ``inputs.num_generations`` and ``inputs.kl`` (``(N, L)`` advantages). Declares
    ``needs_greedy_baseline``: the rollout samples and scores one greedy completion per prompt for it.

    Raises:
        ValueError: as :func:`remax_advantages`; no ``inputs.mask`` or ``inputs.baseline_scores``.
    """
    if inputs.mask is None or inputs.baseline_scores is None:
        raise ValueError("remax needs the (N, L) completion mask and the greedy completions' baseline_scores")
    return remax_advantages(inputs.scores, inputs.baseline_scores, inputs.mask, inputs.num_generations, inputs.kl,
                            kl_coef=kl_coef)


remax_estimator.needs_greedy_baseline = True

"""Generalised advantage estimation and KL-penalised per-token rewards for PPO-RLHF.

Notation, shared by the functions here: a batch of ``B`` completions padded on the right to ``T`` tokens.

* ``mask``: ``(B, T)`` bool or 0/1 completion mask, ones for the completion's tokens, then zeros for padding
  (right padding only: a one after a zero raises). A row may be all zeros (no token, no advantage).
* Step ``t`` of the episode is the generation of completion token ``t``; ``values[:, t]`` is the critic's
  estimate ``V(s_t)`` of the return from the state before that token (the value head read at the position
  that predicts token ``t``), in reward units.
* The episode ends after the last valid token: there is no bootstrap from the padding (the value after the
  last valid token is 0), and padded positions get 0 advantage and 0 return.

Both functions return detached tensors: rewards, advantages and returns are targets, not parts of the graph.
"""

from __future__ import annotations

import torch

from alignlab.advantages.registry import AdvantageInputs, AdvantageOutputs
from alignlab.ops.kl import KL_ESTIMATORS
from alignlab.ops.masked import masked_whiten


def _completion_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``mask`` as bool, after checking its shape and that it is right-padded."""
    if len(shape) != 2:
        raise ValueError(f"expected (B, T) per-token tensors, got shape {tuple(shape)}")
    if mask.shape != shape:
        raise ValueError(f"mask must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    m = mask.bool()
    if (m[:, 1:] & ~m[:, :-1]).any():
        raise ValueError("mask must be right-padded: in each row, ones (completion tokens) then zeros (padding)")
    return m


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) advantages and lambda-returns over completion tokens.

    ``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)`` with ``V(s_{t+1}) = 0`` after the last valid token;
    ``A_t = delta_t + gamma * lam * A_{t+1}`` (so ``A_t = sum_l (gamma lam)^l delta_{t+l}``);
    ``returns_t = A_t + V(s_t)`` (the value-function target).

    Source: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation" (arXiv 1506.02438), eq. 16 (``delta`` from eq. 10). TRL: the reverse loop of ``PPOTrainer``
    (trl 0.24 ``ppo_trainer.py``, ``lastgaelam``), which gives the same numbers for the same mask because it
    zeroes rewards and values past the episode before its unmasked loop. TRL then whitens the advantages
    (``masked_whiten``); this function does not: call :func:`alignlab.ops.masked.masked_whiten` and zero the
    padding afterwards. Returns are computed from the raw advantages, as TRL. OpenRLHF: ``get_advantages_and_returns``
    (``openrlhf/trainer/ppo_utils/experience_maker.py``).

    Args:
        rewards: ``(B, T)`` per-token rewards (reward units, e.g. from :func:`kl_penalized_rewards`).
        values: ``(B, T)`` critic values ``V(s_t)`` (reward units).
        mask: ``(B, T)`` right-padded completion mask; rewards and values at padded positions are ignored.
        gamma: discount factor in [0, 1] (TRL default 1).
        lam: GAE lambda in [0, 1] (TRL default 0.95); 0 gives one-step TD errors, 1 gives Monte-Carlo
            returns minus the baseline.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, detached, 0 at padded positions.

    Raises:
        ValueError: gamma or lam outside [0, 1]; tensors not ``(B, T)`` of one shape; mask not right-padded.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if rewards.shape != values.shape:
        raise ValueError(
            f"rewards and values must have the same shape, got {tuple(rewards.shape)} and {tuple(values.shape)}"
        )
    m = _completion_mask(mask, rewards.shape)
    rewards = torch.where(m, rewards.detach(), 0)
    values = torch.where(m, values.detach(), 0)
    if rewards.shape[1] == 0:
        return rewards.clone(), values.clone()

    last_advantage = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    reversed_advantages = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_advantage = delta + gamma * lam * last_advantage
        reversed_advantages.append(last_advantage)
        next_value = values[:, t]
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


def kl_penalized_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """Per-token PPO-RLHF rewards: ``-kl_coef * KL_t`` on every completion token, plus the sequence score on
    the last one.

    ``rewards[b, t] = -kl_coef * k(logps, ref_logps)[b, t] + scores[b] * [t == last valid token of b]``, 0 on
    padding, with ``k`` the ``k1`` or ``k3`` estimator of :mod:`alignlab.ops.kl`.

    Source: Ouyang et al. 2022 (InstructGPT, arXiv 2203.02155), eq. 2 (``r(x, y) - beta log(pi / pi_SFT)``),
    spread over tokens as in Ziegler et al. 2019 (arXiv 1909.08593) and TRL ``PPOTrainer`` (trl 0.24, "4.
    compute rewards"). OpenRLHF: ``compute_reward`` (``openrlhf/models/utils.py``), which also puts the score
    on the last token of the action mask. Difference from TRL: TRL adds the score at ``sequence_lengths + 1``,
    one position *after* its last non-pad token (the EOS token when ``pad == eos``), and its value mask is
    one token longer than its policy mask (``padding_mask_p1``); here the score goes on the last token the
    caller's mask selects, so include the EOS token in ``mask`` to reproduce TRL.

    Args:
        scores: ``(B,)`` sequence-level rewards (reward-model scores).
        logps, ref_logps: ``(B, T)`` policy and reference log-probs of the sampled tokens (nats).
        mask: ``(B, T)`` right-padded completion mask with at least one token per row.
        kl_coef: KL penalty coefficient (TRL ``kl_coef``, default 0.05 there), >= 0; reward units per nat.
        estimator: ``"k1"`` (TRL's default) or ``"k3"``.

    Returns:
        ``(B, T)`` detached per-token rewards, 0 at padded positions.

    Raises:
        ValueError: kl_coef < 0; unknown estimator; shape mismatch; mask not right-padded or with an empty row.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose from {', '.join(KL_ESTIMATORS)}")
    kl = KL_ESTIMATORS[estimator](logps.detach(), ref_logps.detach())
    _completion_mask(mask, kl.shape)
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores must have shape ({kl.shape[0]},), got {tuple(scores.shape)}")
    return token_rewards(scores.to(kl.dtype), mask, kl, kl_coef=kl_coef)


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, *,
                  kl_coef: float) -> torch.Tensor:
    """Per-token rewards from sequence scores and a per-token KL: ``-kl_coef * kl`` on every completion token,
    plus the score on the last one, 0 on padding (``kl`` ``None``: the score alone).

    ``rewards[b, t] = -kl_coef * kl[b, t] + scores[b] * [t == last valid token of b]``. The shaping of
    :func:`kl_penalized_rewards` (PPO), REINFORCE++ and ReMax: Ouyang et al. 2022 (InstructGPT), eq. 2, spread
    over tokens as Ziegler et al. 2019; OpenRLHF ``compute_reward``; veRL ``apply_kl_penalty``.

    Args:
        scores: ``(B,)`` floating-point sequence rewards (reward units); the result has their dtype.
        mask: ``(B, T)`` right-padded completion mask with at least one token per row.
        kl: ``(B, T)`` per-token KL estimate (nats), or ``None`` (needs ``kl_coef = 0``).
        kl_coef: >= 0, reward units per nat.

    Returns:
        ``(B, T)`` detached rewards.

    Raises:
        ValueError: ``kl_coef < 0``; ``kl`` missing with ``kl_coef > 0``; shapes that do not match; mask not
            right-padded or with an empty row.
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl is None and kl_coef > 0:
        raise ValueError("kl_coef > 0 needs the per-token kl")
    if mask.dim() != 2 or scores.shape != mask.shape[:1]:
        raise ValueError(f"scores (B,) and mask (B, T) must agree, got {tuple(scores.shape)} and {tuple(mask.shape)}")
    m = _completion_mask(mask, mask.shape if kl is None else kl.shape)
    lengths = m.sum(-1)
    if (lengths == 0).any():
        raise ValueError("every row of mask needs at least one completion token to carry its score")
    if kl is None:
        rewards = torch.zeros(m.shape, dtype=scores.dtype, device=scores.device)
    else:
        rewards = torch.where(m, -kl_coef * kl.detach().to(scores.dtype), 0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    return rewards.index_put((rows, lengths - 1), scores.detach(), accumulate=True)


def gae_advantages(
    scores: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None = None,
    *,
    kl_coef: float = 0.05,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_rewards: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-RLHF's advantages and value targets, in TRL ``PPOTrainer``'s order (trl 0.24, "4. compute rewards"
    to "6. compute advantages and returns"):

    1. per-token rewards ``-kl_coef * kl_t``, plus the score on the last token (:func:`token_rewards`);
    2. with ``whiten_rewards``, the rewards scaled to unit variance over the completion tokens (mean kept,
       :func:`~alignlab.ops.masked.masked_whiten` with ``shift_mean=False``; TRL ``whiten_rewards``);
    3. GAE advantages and returns (:func:`compute_gae`);
    4. the advantages whitened over the completion tokens (mean 0, unit variance), the returns left raw.

    Args:
        scores: ``(B,)`` sequence rewards (reward units).
        values: ``(B, T)`` critic values at sampling time (reward units).
        mask: ``(B, T)`` right-padded completion mask with at least one token per row, two tokens in all.
        kl: ``(B, T)`` per-token KL between the sampling policy and the reference (nats; TRL's ``kl_estimator``
            k1 or k3), or ``None`` with ``kl_coef = 0``.
        kl_coef, gamma, lam, whiten_rewards: TRL ``PPOConfig``'s (0.05, 1.0, 0.95, False).

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, detached, 0 on padding.

    Raises:
        ValueError: as :func:`token_rewards` and :func:`compute_gae`; fewer than two completion tokens in all.
    """
    m = mask.bool()
    rewards = token_rewards(scores, mask, kl, kl_coef=kl_coef)
    if whiten_rewards:
        rewards = torch.where(m, masked_whiten(rewards, m, shift_mean=False), 0)
    advantages, returns = compute_gae(rewards, values, m, gamma=gamma, lam=lam)
    return torch.where(m, masked_whiten(advantages, m), 0), returns


def gae_estimator(inputs: AdvantageInputs, *, kl_coef: float = 0.05, gamma: float = 1.0, lam: float = 0.95,
                  whiten_rewards: bool = False) -> AdvantageOutputs:
    """:func:`gae_advantages` with the advantage registry's calling convention: reads ``scores``, ``mask``,
    ``values`` and ``kl`` of ``inputs``; returns the advantages with the value targets in ``returns`` and no
    metrics (PPO logs its own). Not registered by name: only PPO has the critic whose values it reads.

    Raises:
        ValueError: as :func:`gae_advantages`; no ``inputs.mask`` or ``inputs.values``.
    """
    if inputs.mask is None or inputs.values is None:
        raise ValueError("GAE needs the (N, L) completion mask and the critic's values")
    advantages, returns = gae_advantages(inputs.scores, inputs.values, inputs.mask, inputs.kl, kl_coef=kl_coef,
                                         gamma=gamma, lam=lam, whiten_rewards=whiten_rewards)
    return AdvantageOutputs(advantages, {}, returns)

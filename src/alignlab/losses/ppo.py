"""PPO-clip losses for the policy and the critic, the GRPO policy-loss variants (CISPO, SAPO, GSPO's sequence-level
ratio), and the token-to-scalar reductions of GRPO and its variants (TRL 1.16 ``loss_type``).

Notation, shared by every function: a batch of ``B`` completions right-padded to ``T`` tokens;

* ``logps``: ``(B, T)`` log-probs of the sampled tokens under the policy being trained (nats, with grad);
* ``old_logps``: ``(B, T)`` the same under the policy that sampled them (nats, constant);
* ``ratio = exp(logps - old_logps)``, the per-token importance ratio;
* ``mask``: ``(B, T)`` bool or 0/1, ones on the tokens that count. Masked-out positions may hold anything
  (``inf``, ``nan``, TRL's ``INVALID_LOGPROB``): they are replaced before any arithmetic, so they change
  neither the losses nor the gradients.

The loss functions return the per-token loss, ``(B, T)``, 0 at masked positions; reduce it with
:func:`aggregate_token_loss` (or :func:`alignlab.ops.masked.masked_mean`, which is TRL PPO's reduction). The
metrics are detached 0-d tensors averaged over the masked tokens (0 for an empty mask), computed without a
device synchronisation.
"""

from __future__ import annotations

import torch

from alignlab.registry import Registry

LOSS_AGGREGATIONS = ("grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo")
"""Accepted ``loss_type`` values of :func:`aggregate_token_loss` (TRL 1.16 ``GRPOConfig.loss_type``, less
``luspo`` and ``vespo``)."""

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
"""Accepted ``importance_sampling_level`` values of the policy losses (TRL ``importance_sampling_level``)."""

POLICY_LOSSES: Registry = Registry("loss_type", exact=True)
"""The per-token policy loss of each TRL 1.16 ``GRPOConfig.loss_type`` (grpo, bnpo, dr_grpo and dapo: the clipped
loss; cispo; sapo), each declaring its hyperparameters as ``{keyword: GRPOConfig field}`` (TRL's names; the
clipped loss's ``delta`` is declared with no field: ``GRPOConfig`` has no ``delta``, so it stays off). Reduce a
loss's output with :func:`aggregate_token_loss` under the same ``loss_type``; build its keywords from a config
with :func:`policy_loss_kwargs`."""


def _check_per_token(shape: torch.Size, **tensors: torch.Tensor) -> None:
    if len(shape) != 2:
        raise ValueError(f"expected (B, T) per-token tensors, got shape {tuple(shape)}")
    for name, tensor in tensors.items():
        if tensor.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def _token_fraction(selected: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of masked tokens where ``selected`` holds (bool tensors), 0 for an empty mask."""
    return (selected & mask).sum() / mask.sum().clamp(min=1)


def _policy_inputs(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    importance_sampling_level: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Shared checks and inputs of the policy losses.

    Returns ``(m, advantages, log_ratio, log_weights, per_sequence)``: the bool mask; the detached advantages
    as ``(B, T)`` or ``(B, 1)``, 0 where masked; the per-token ``logps - old_logps``, 0 where masked; the log
    importance weights, ``log_ratio`` at token level or each sequence's mean ``log_ratio`` broadcast to
    ``(B, T)`` at sequence level (TRL 1.16 ``log_importance_weights``); and whether the clip metrics count
    sequences (sequence level with ``(B,)`` advantages, where every token of a sequence shares one value).
    """
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"unknown importance_sampling_level {importance_sampling_level!r}; "
            f"choose from {', '.join(IMPORTANCE_SAMPLING_LEVELS)}"
        )
    _check_per_token(logps.shape, old_logps=old_logps, mask=mask)
    per_sequence_advantages = advantages.shape == logps.shape[:1]
    if per_sequence_advantages:
        advantages = advantages.unsqueeze(1)
    elif advantages.shape != logps.shape:
        raise ValueError(
            f"advantages must have shape {tuple(logps.shape)} or {tuple(logps.shape[:1])}, "
            f"got {tuple(advantages.shape)}"
        )
    m = mask.bool()
    advantages = torch.where(m, advantages.detach(), 0)
    log_ratio = torch.where(m, logps - old_logps.detach(), 0)
    log_weights = _log_importance_weights(log_ratio, m, importance_sampling_level)
    return m, advantages, log_ratio, log_weights, per_sequence_advantages and importance_sampling_level == "sequence"


def _log_importance_weights(log_ratio: torch.Tensor, m: torch.Tensor, importance_sampling_level: str) -> torch.Tensor:
    """``(B, T)`` log importance weights from the masked per-token ``log_ratio``: itself at token level; at
    sequence level (GSPO) each sequence's mean over its masked tokens, broadcast, with its gradient through
    every token (TRL 1.16 ``log_importance_weights``)."""
    if importance_sampling_level == "token":
        return log_ratio
    mean_log_ratio = log_ratio.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    return mean_log_ratio.expand_as(log_ratio)


def importance_weights(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    importance_sampling_level: str = "token",
) -> torch.Tensor:
    """``(B, T)`` importance weights ``exp(log_weights)`` of the policy losses, with their gradient in ``logps``.

    Token level: ``exp(logps - old_logps)``; sequence level (GSPO): each sequence's
    ``exp(mean_t (logps_t - old_logps_t))`` over its masked tokens, broadcast to all its positions (masked
    positions get 1 at token level; mask them out downstream either way). TRL 1.16's ``coef_1``, which ``GRPOTrainer`` also multiplies the per-token KL by when
    ``use_bias_correction_kl`` (the unbiased reverse-KL gradient of DeepSeek-AI 2025, "DeepSeek-V3.2",
    arXiv 2512.02556): on-policy the weight is 1 but its gradient, ``d w / d logps = w`` (token level),
    adds ``kl * grad logps`` to the KL term's gradient.

    Raises:
        ValueError: unknown importance_sampling_level; shape mismatch.
    """
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"unknown importance_sampling_level {importance_sampling_level!r}; "
            f"choose from {', '.join(IMPORTANCE_SAMPLING_LEVELS)}"
        )
    _check_per_token(logps.shape, old_logps=old_logps, mask=mask)
    m = mask.bool()
    log_ratio = torch.where(m, logps - old_logps.detach(), 0)
    return torch.exp(_log_importance_weights(log_ratio, m, importance_sampling_level))


def _clip_fraction(selected: torch.Tensor, mask: torch.Tensor, per_sequence: bool) -> torch.Tensor:
    """Fraction of masked tokens (or of non-empty sequences, when ``per_sequence``) where ``selected`` holds."""
    if not per_sequence:
        return _token_fraction(selected, mask)
    present = mask.any(-1)
    return (selected & mask).any(-1).sum() / present.sum().clamp(min=1)


def _approxkl(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``0.5 * mean((logps - old_logps)^2)`` over the masked tokens (nats), the k2 estimate of KL(old || new)."""
    return 0.5 * (log_ratio**2).sum() / mask.sum().clamp(min=1)


@POLICY_LOSSES.register("grpo", "bnpo", "dr_grpo", "dapo", hyperparameters={
    "cliprange": "epsilon", "cliprange_high": "epsilon_high", "importance_sampling_level": "importance_sampling_level",
    "delta": "delta"})
def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float = 0.2,
    cliprange_high: float | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, per token: ``max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))``.

    The negative of PPO's ``min(ratio * A, clip(ratio) * A)``: pessimistic, so a token whose ratio has
    already moved past the clip range in the direction its advantage favours gets a constant loss and no
    gradient, while a move in the unfavoured direction is never clipped.

    ``importance_sampling_level="sequence"`` (GSPO) replaces each token's ratio by its sequence's
    ``s_i = exp(mean_t (logps_t - old_logps_t))`` over the masked tokens (length-normalised sequence
    likelihood ratio), clipped and multiplied by the advantage the same way and broadcast to every token. As
    TRL 1.16, the gradient of ``s_i`` flows into every token of the sequence (``d s_i / d logps_t = s_i /
    |o_i|``); only ``old_logps`` is constant. Reduce it with ``loss_type="grpo"`` to get the paper's
    per-sequence objective (TRL warns that token-sum reductions weight each sequence by its length).

    ``delta`` (two-sided clipping) bounds the unclipped ratio from above as well, ``min(ratio, delta)``, so
    that a token with a negative advantage whose ratio has grown past ``delta`` stops getting a gradient.

    Source: Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv 1707.06347), eq. 7;
    asymmetric range (``cliprange_high``, "Clip-Higher"): Yu et al. 2025, DAPO (arXiv 2503.14476),
    section 3.1; sequence level: Zheng et al. 2025, "Group Sequence Policy Optimization" (arXiv 2507.18071),
    eqs. 5-7; ``delta``: INTELLECT-2 (Prime Intellect 2025, arXiv 2505.07291). TRL: ``PPOTrainer``
    ``pg_losses`` / ``pg_losses2`` (trl 0.24); ``GRPOTrainer._compute_loss`` ``coef_1`` / ``coef_2`` with
    ``epsilon`` / ``epsilon_high`` / ``delta`` / ``importance_sampling_level`` (trl 1.16, ``loss_type``
    grpo/bnpo/dr_grpo/dapo). OpenRLHF: ``PolicyLoss`` (``openrlhf/models/loss.py``, ``policy_loss_type``
    ``ppo`` / ``gspo``).

    Args:
        logps: ``(B, T)`` current log-probs (nats); the only input that gets a gradient.
        old_logps: ``(B, T)`` sampling-time log-probs (nats), treated as a constant.
        advantages: ``(B, T)`` per-token (PPO) or ``(B,)`` per-sequence (GRPO, broadcast over tokens),
            treated as a constant.
        mask: ``(B, T)`` tokens that count.
        cliprange: ``eps_low`` in (0, 1) (TRL ``cliprange`` / ``epsilon``, default 0.2).
        cliprange_high: ``eps_high`` > 0 (TRL ``epsilon_high``; DAPO uses 0.28); ``None`` means ``cliprange``.
        importance_sampling_level: ``"token"`` (default) or ``"sequence"`` (GSPO; TRL
            ``importance_sampling_level``; the GSPO paper uses ``eps`` 3e-4 / 4e-4).
        delta: upper bound > 0 on the unclipped ratio (TRL ``delta``, default ``None``: off; recommended
            above ``1 + eps_high``).

    Returns:
        ``(per_token_loss, metrics)``: ``(B, T)`` losses (advantage units), 0 where masked, and

        * ``policy/clipfrac``: fraction of masked tokens where the clipped branch is strictly larger, i.e.
          gets no gradient (TRL PPO's ``pg_clipfrac``, ``pg_losses2 > pg_losses``; the same tokens as TRL GRPO's
          ``clip_ratio/region_mean``: ratio below ``1 - eps_low`` with A < 0 or above ``1 + eps_high`` with
          A > 0). At sequence level with ``(B,)`` advantages it is the fraction of non-empty sequences, as
          TRL counts them;
        * ``policy/approxkl``: ``0.5 * mean((logps - old_logps)^2)`` over masked tokens, the ``k2`` estimate
          of the KL between the old and the current policy (nats). TRL PPO takes this mean over *all*
          ``B * T`` positions, padding included (where its log-ratio is 0), so its number is smaller by the
          fraction of padding.

    Raises:
        ValueError: cliprange not in (0, 1); cliprange_high <= 0; delta <= 0; unknown
            importance_sampling_level; shape mismatch.
    """
    eps_low = cliprange
    eps_high = cliprange if cliprange_high is None else cliprange_high
    if not 0.0 < eps_low < 1.0:
        raise ValueError(f"cliprange must be in (0, 1), got {cliprange}")
    if not eps_high > 0.0:
        raise ValueError(f"cliprange_high must be positive, got {cliprange_high}")
    if delta is not None and not delta > 0.0:
        raise ValueError(f"delta must be positive, got {delta}")
    m, advantages, log_ratio, log_weights, per_sequence = _policy_inputs(
        logps, old_logps, advantages, mask, importance_sampling_level
    )
    ratio = torch.exp(log_weights)
    unclipped = -advantages * (ratio if delta is None else torch.clamp(ratio, max=delta))
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token_loss = torch.where(m, torch.maximum(unclipped, clipped), 0)
    with torch.no_grad():
        metrics = {
            "policy/clipfrac": _clip_fraction(clipped > unclipped, m, per_sequence),
            "policy/approxkl": _approxkl(log_ratio, m),
        }
    return per_token_loss, metrics


@POLICY_LOSSES.register("cispo", hyperparameters=("epsilon_high", "importance_sampling_level"))
def cispo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_high: float,
    importance_sampling_level: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO, per token: ``-sg(min(ratio, epsilon_high)) * A * logps``.

    The importance weight is clipped from above and detached, and multiplies a REINFORCE term: every token
    keeps a gradient ``-w * A`` with respect to its log-prob, however far its ratio has moved (PPO's clip
    instead drops the gradient of tokens outside the range). The loss's value is not a surrogate of the
    objective (it contains ``logps`` itself); only its gradient matters.

    Source: MiniMax 2025, "MiniMax-M1" (arXiv 2506.13585), section 3.1, eqs. 4-5 (CISPO, with the lower bound
    disabled); ``epsilon_high`` as the ScaleRL paper's ``eps_max`` (Khatri et al. 2025, arXiv 2510.13786,
    recommended 5.0). TRL 1.16: ``GRPOTrainer._compute_loss`` ``loss_type="cispo"``
    (``clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()``). TRL falls back to ``epsilon``
    (0.2) when ``epsilon_high`` is unset, which scales every gradient by 0.2: pass the bound explicitly.

    Args:
        logps, old_logps, advantages, mask: as :func:`clipped_policy_loss`.
        epsilon_high: upper bound > 0 on the importance weight itself (not ``1 + eps``).
        importance_sampling_level: ``"token"`` or ``"sequence"`` (the weight is then the sequence's
            ``exp(mean log-ratio)``), as :func:`clipped_policy_loss`.

    Returns:
        ``(per_token_loss, metrics)``: ``(B, T)`` losses, 0 where masked; ``policy/clipfrac`` is TRL's
        ``cispo_clip_ratio`` (fraction of masked tokens with ``ratio > epsilon_high`` and ``A > 0``; per
        sequence at sequence level with ``(B,)`` advantages); ``policy/approxkl`` as :func:`clipped_policy_loss`.

    Raises:
        ValueError: epsilon_high <= 0; unknown importance_sampling_level; shape mismatch.
    """
    if not epsilon_high > 0.0:
        raise ValueError(f"epsilon_high must be positive, got {epsilon_high}")
    m, advantages, log_ratio, log_weights, per_sequence = _policy_inputs(
        logps, old_logps, advantages, mask, importance_sampling_level
    )
    ratio = torch.exp(log_weights)
    weights = torch.clamp(ratio, max=epsilon_high).detach()
    per_token_loss = torch.where(m, -weights * advantages * torch.where(m, logps, 0), 0)
    with torch.no_grad():
        metrics = {
            "policy/clipfrac": _clip_fraction((ratio > epsilon_high) & (advantages > 0), m, per_sequence),
            "policy/approxkl": _approxkl(log_ratio, m),
        }
    return per_token_loss, metrics


@POLICY_LOSSES.register("sapo", hyperparameters=(
    "sapo_temperature_pos", "sapo_temperature_neg", "importance_sampling_level"))
def sapo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    importance_sampling_level: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAPO, per token: ``-f(ratio) * A`` with the soft gate ``f(r) = sigmoid(tau * (r - 1)) * 4 / tau``.

    ``tau`` is ``sapo_temperature_pos`` where ``A > 0`` and ``sapo_temperature_neg`` elsewhere. ``f(1) = 2 /
    tau`` and ``f'(r) = 4 sigmoid(tau (r - 1)) (1 - sigmoid(tau (r - 1)))``, which is 1 at ``r = 1`` (the
    on-policy gradient of ``-r A``) and decays smoothly as the ratio moves away, instead of PPO's hard cut;
    a larger ``tau`` decays faster, so the default ``tau_neg > tau_pos`` damps negative-advantage tokens more.

    Source: Gao et al. 2025, "Soft Adaptive Policy Optimization" (arXiv 2511.20347), the soft-gated
    objective. TRL 1.16: ``GRPOTrainer._compute_loss`` ``loss_type="sapo"``
    (``torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures``; TRL reduces it as ``"grpo"``).

    Args:
        logps, old_logps, advantages, mask: as :func:`clipped_policy_loss`.
        sapo_temperature_pos: ``tau`` > 0 for tokens with positive advantage (TRL, default 1.0).
        sapo_temperature_neg: ``tau`` > 0 for the others (TRL, default 1.05).
        importance_sampling_level: ``"token"`` or ``"sequence"``, as :func:`clipped_policy_loss`.

    Returns:
        ``(per_token_loss, metrics)``: ``(B, T)`` losses (advantage units), 0 where masked; ``policy/approxkl``
        as :func:`clipped_policy_loss` (no clip fraction: nothing is clipped, and TRL logs none).

    Raises:
        ValueError: a temperature <= 0; unknown importance_sampling_level; shape mismatch.
    """
    if not (sapo_temperature_pos > 0.0 and sapo_temperature_neg > 0.0):
        raise ValueError(
            f"sapo temperatures must be positive, got pos {sapo_temperature_pos} and neg {sapo_temperature_neg}"
        )
    m, advantages, log_ratio, log_weights, _ = _policy_inputs(
        logps, old_logps, advantages, mask, importance_sampling_level
    )
    ratio = torch.exp(log_weights)
    temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg).to(ratio.dtype)
    gate = torch.sigmoid(temperatures * (ratio - 1)) * 4 / temperatures
    per_token_loss = torch.where(m, -gate * advantages, 0)
    with torch.no_grad():
        metrics = {"policy/approxkl": _approxkl(log_ratio, m)}
    return per_token_loss, metrics


def get_policy_loss(loss_type: str):
    """The per-token policy loss for a TRL ``loss_type`` (see :data:`POLICY_LOSSES`).

    Raises:
        ValueError: unknown ``loss_type``; the message lists the choices.
    """
    return POLICY_LOSSES.get(loss_type)


def clip_ratio_metrics(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
) -> dict[str, torch.Tensor]:
    """TRL 1.16 ``GRPOTrainer``'s clip statistics of the clipped losses (``loss_type`` grpo, bnpo, dr_grpo, dapo),
    with its names and definitions (``_compute_loss``, "Compute the clipped probability ratios").

    With the importance weight ``r`` (per token, or per sequence ``exp(mean_t (logps - old_logps))`` at
    ``importance_sampling_level="sequence"``: TRL's ``coef_1``), a token (sequence) is *low-clipped* when
    ``r < 1 - epsilon_low`` and ``A < 0``, *high-clipped* when ``r > 1 + epsilon_high`` and ``A > 0``, and in
    the *clip region* when either holds (the tokens the clip takes the gradient from):

    * ``clip_ratio/low_mean``, ``/high_mean``, ``/region_mean``: their fraction over the masked tokens (over
      the sequences at sequence level, every sequence counted);
    * ``clip_ratio/low_min``: the smallest per-sequence fraction of low-clipped tokens (sequences with no
      masked token left out, as TRL's ``nanmin``); ``clip_ratio/high_max``: the largest of high-clipped ones.
      Left out of the result when no sequence has a masked token.

    Args:
        logps, old_logps: ``(B, T)`` current and sampling-time log-probs (nats); used detached.
        advantages: ``(B,)`` per sequence (broadcast over its tokens) or ``(B, T)`` per token.
        mask: ``(B, T)`` tokens that count.
        epsilon_low, epsilon_high: the clip range (``epsilon_high`` ``None``: ``epsilon_low``).
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).

    Returns:
        ``{name: 0-d tensor}``, fractions in [0, 1].

    Raises:
        ValueError: unknown importance_sampling_level; shape mismatch.
    """
    high = epsilon_low if epsilon_high is None else epsilon_high
    with torch.no_grad():
        m, adv, _, log_weights, per_sequence = _policy_inputs(
            logps.detach(), old_logps, advantages, mask, importance_sampling_level)
        ratio = torch.exp(log_weights)
        if per_sequence:  # one weight and one advantage per sequence: TRL's (B, 1) coef_1
            ratio, adv = ratio[:, :1], advantages.detach().reshape(-1, 1)
            counted = torch.ones_like(ratio, dtype=torch.bool)
        else:
            counted = m
        low = (ratio < 1 - epsilon_low) & (adv < 0) & counted
        above = (ratio > 1 + high) & (adv > 0) & counted
        total = counted.sum().clamp(min=1)
        metrics = {"clip_ratio/low_mean": low.sum() / total, "clip_ratio/high_mean": above.sum() / total,
                   "clip_ratio/region_mean": (low | above).sum() / total}
        rows = counted.any(-1)
        if bool(rows.any()):
            tokens = counted.sum(-1)[rows]
            metrics["clip_ratio/low_min"] = (low.sum(-1)[rows] / tokens).min()
            metrics["clip_ratio/high_max"] = (above.sum(-1)[rows] / tokens).max()
    return metrics


def policy_loss_kwargs(loss_type: str, config) -> dict:
    """The keyword arguments of ``loss_type``'s policy loss, read from ``config`` as the loss declares them
    (:data:`POLICY_LOSSES`): for a TRL-named ``GRPOConfig``, ``cliprange=epsilon, cliprange_high=epsilon_high``
    (clipped losses), ``epsilon_high`` (cispo), ``sapo_temperature_pos`` / ``_neg`` (sapo), and
    ``importance_sampling_level`` for all. Call the loss as
    ``get_policy_loss(t)(logps, old_logps, advantages, mask, **policy_loss_kwargs(t, config))``.

    Raises:
        ValueError: unknown ``loss_type``, or ``config`` lacks a field the loss declares.
    """
    return POLICY_LOSSES.kwargs(loss_type, config)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped critic loss, per token: ``0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)``.

    The clipped prediction keeps the critic within ``c`` of its value at sampling time; taking the max makes
    the bound pessimistic, as the policy clip.

    Source: not in the PPO paper; OpenAI baselines ``ppo2`` and Ziegler et al. 2019 (``lm-human-preferences``,
    arXiv 1909.08593), discussed by Huang et al. 2022, "The 37 Implementation Details of PPO" (detail 9).
    TRL: ``PPOTrainer`` ``vf_losses1`` / ``vf_losses2`` / ``vf_loss`` (trl 0.24, with the 0.5 factor). OpenRLHF:
    ``ValueLoss`` (``openrlhf/models/loss.py``).

    Args:
        values: ``(B, T)`` current critic predictions (reward units); the only input that gets a gradient.
        old_values: ``(B, T)`` critic predictions at sampling time, constant.
        returns: ``(B, T)`` value targets (e.g. from :func:`alignlab.advantages.gae.compute_gae`), constant.
        mask: ``(B, T)`` tokens that count (TRL uses its one-token-longer ``padding_mask_p1`` here).
        cliprange_value: ``c`` > 0, in reward units (TRL ``cliprange_value``, default 0.2).

    Returns:
        ``(per_token_loss, metrics)``: ``(B, T)`` losses (squared reward units), 0 where masked, and
        ``val/clipfrac``: fraction of masked tokens where the clipped loss is strictly larger (TRL's
        ``vf_clipfrac``).

    Raises:
        ValueError: cliprange_value <= 0; shape mismatch.
    """
    if not cliprange_value > 0.0:
        raise ValueError(f"cliprange_value must be positive, got {cliprange_value}")
    _check_per_token(values.shape, old_values=old_values, returns=returns, mask=mask)
    m = mask.bool()
    values = torch.where(m, values, 0)
    old_values = torch.where(m, old_values.detach(), 0)
    returns = torch.where(m, returns.detach(), 0)
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    per_token_loss = torch.where(m, 0.5 * torch.maximum(unclipped_loss, clipped_loss), 0)
    with torch.no_grad():
        metrics = {"val/clipfrac": _token_fraction(clipped_loss > unclipped_loss, m)}
    return per_token_loss, metrics


def aggregate_token_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a ``(B, T)`` per-token loss to the scalar to backpropagate; 0-d tensor.

    With ``S = sum over masked tokens of per_token_loss`` and ``|o_i|`` the masked length of sequence ``i``:

    * ``"grpo"``: ``mean_i( sum_t loss_it / max(|o_i|, 1) )``, each sequence weighs the same whatever its
      length (Shao et al. 2024, arXiv 2402.03300, eq. 3: ``1/G sum_i 1/|o_i| sum_t``). TRL 1.16
      ``loss_type="grpo"``. A sequence with no token counts as a 0 in the mean, as TRL.
    * ``"bnpo"``: ``S / max(number of masked tokens, 1)``, each token of this (micro-)batch weighs the same;
      ``num_items_in_batch`` is ignored. TRL 1.16 ``loss_type="bnpo"`` ("batch-normalised"; TRL notes it
      equals ``"grpo"`` with one sequence per device).
    * ``"dapo"``: ``S / num_items_in_batch``, each token weighs the same (Yu et al. 2025, DAPO, arXiv
      2503.14476, eq. 8: the ``1 / sum_i |o_i|`` token-level normalisation, section 3.3). ``num_items_in_batch``
      defaults to the number of masked tokens, clamped at 1 (then it equals ``"bnpo"``); a value
      you pass is used as given. TRL 1.16's ``"dapo"`` (its default)
      divides instead by the token count of the whole generation batch, across processes, rescaled to one
      micro-batch (``num_items_in_batch / num_processes * grad_accum_steps / steps_per_generation``): pass
      that number to reproduce it under gradient accumulation; for one process and one micro-batch they agree.
    * ``"cispo"``: as ``"dapo"`` (TRL reduces :func:`cispo_policy_loss` so); ``"sapo"``: as ``"grpo"`` (TRL
      reduces :func:`sapo_policy_loss` so). They are accepted so that one ``loss_type`` picks both the
      per-token loss (:data:`POLICY_LOSSES`) and its reduction.
    * ``"dr_grpo"``: ``S / (B * max_completion_length)``, a constant normaliser, so neither the sequence
      length nor the batch's token count rescales the gradient (Liu et al. 2025, "Understanding R1-Zero-Like
      Training: A Critical Perspective" (Dr. GRPO), arXiv 2503.20783). TRL 1.16 ``loss_type="dr_grpo"``.

    verl's counterpart: ``agg_loss`` with ``loss_agg_mode`` ``"seq-mean-token-mean"`` / ``"token-mean"`` /
    ``"seq-mean-token-sum-norm"``.

    Args:
        per_token_loss: ``(B, T)`` e.g. from :func:`clipped_policy_loss` (plus ``beta * kl_k3`` for GRPO).
        mask: ``(B, T)`` tokens that count.
        loss_type: one of :data:`LOSS_AGGREGATIONS`.
        max_completion_length: the generation limit, needed by ``"dr_grpo"`` (>= ``T``), ignored otherwise.
        num_items_in_batch: ``"dapo"``'s and ``"cispo"``'s token count (see above), ignored otherwise.

    Raises:
        ValueError: unknown loss_type; shape mismatch; ``"dr_grpo"`` without a positive
            ``max_completion_length`` or with ``T > max_completion_length``.
    """
    if loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {', '.join(LOSS_AGGREGATIONS)}")
    _check_per_token(per_token_loss.shape, mask=mask)
    m = mask.bool()
    selected = torch.where(m, per_token_loss, 0)
    if loss_type in ("grpo", "sapo"):
        return (selected.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return selected.sum() / m.sum().clamp(min=1)
    if loss_type in ("dapo", "cispo"):
        if num_items_in_batch is None:
            return selected.sum() / m.sum().clamp(min=1)
        return selected.sum() / num_items_in_batch
    if max_completion_length is None or max_completion_length <= 0:
        raise ValueError(f"loss_type 'dr_grpo' needs a positive max_completion_length, got {max_completion_length}")
    if per_token_loss.shape[1] > max_completion_length:
        raise ValueError(
            f"completions have {per_token_loss.shape[1]} tokens, more than max_completion_length "
            f"{max_completion_length}"
        )
    return selected.sum() / (per_token_loss.shape[0] * max_completion_length)


IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
"""Accepted ``mode`` values of :func:`importance_sampling_ratio` (TRL's ``vllm_importance_sampling_mode``)."""


def importance_sampling_ratio(
    old_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "token_truncate",
    clip_max: float | None = 2.0,
    clip_min: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights correcting for rollouts sampled by a stand-in for the policy (a bf16 copy, vLLM).

    The losses assume the tokens were drawn from ``pi_old``; they were drawn from the sampler ``q``. Weighting
    each token's loss by ``w = pi_old(token) / q(token)`` makes the estimate an expectation under ``pi_old``
    again; bounding ``w`` trades a little bias for bounded variance:

    * ``token_truncate``: ``w_t = min(max(exp(old - sampling), clip_min), clip_max)`` per token (truncated
      importance sampling, Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
      Training", fengyao.notion.site, eq. 3);
    * ``token_mask``: ``w_t = exp(old - sampling)`` where it lies in ``[clip_min, clip_max]``, else 0;
    * ``sequence_truncate`` / ``sequence_mask``: the same with one ratio per sequence,
      ``exp(sum_t (old_t - sampling_t))``, applied to all its tokens.

    TRL 1.16 counterpart: ``GRPOTrainer`` with ``vllm_importance_sampling_correction`` (modes and bounds
    named alike; TRL's default mode is ``sequence_mask`` with ``clip_max`` 3.0, built for vLLM's larger
    mismatch; alignlab defaults to the per-token truncation at 2 of Yao et al.).

    Args:
        old_logps: ``(B, T)`` log-probs of the sampled tokens under the policy (nats, constant).
        sampling_logps: ``(B, T)`` the same under the sampler.
        mask: ``(B, T)`` ones on real completion tokens.
        mode: one of :data:`IMPORTANCE_SAMPLING_MODES`.
        clip_max, clip_min: the bounds (``None``: unbounded on that side).

    Returns:
        ``(weights, metrics)``: ``(B, T)`` float weights (detached; 0 on masked positions) to multiply the
        per-token loss by, and TRL's metrics ``sampling/sampling_logp_difference/mean|max`` (mean / max
        ``|old - sampling|`` over tokens) and ``sampling/importance_sampling_ratio/min|mean|max``.

    Raises:
        ValueError: unknown ``mode``, mismatched shapes, or ``clip_min > clip_max``.
    """
    _check_per_token(old_logps.shape, sampling_logps=sampling_logps, mask=mask)
    if mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(f"mode must be one of {IMPORTANCE_SAMPLING_MODES}, got {mode!r}")
    if clip_min is not None and clip_max is not None and clip_min > clip_max:
        raise ValueError(f"clip_min {clip_min} > clip_max {clip_max}")
    mask = mask.bool()
    diff = torch.where(mask, old_logps.detach().float() - sampling_logps.detach().float(), 0.0)
    per_sequence = mode.startswith("sequence")
    ratio = torch.exp(diff.sum(dim=1, keepdim=True)).expand_as(diff) if per_sequence else torch.exp(diff)
    if mode.endswith("truncate"):
        if clip_min is not None or clip_max is not None:
            ratio = ratio.clamp(min=clip_min, max=clip_max)
    else:
        low = -float("inf") if clip_min is None else clip_min
        high = float("inf") if clip_max is None else clip_max
        ratio = torch.where((ratio < low) | (ratio > high), 0.0, ratio)
    weights = torch.where(mask, ratio, 0.0)
    count = mask.sum().clamp(min=1)
    delta = diff.abs()
    shown = weights[:, :1] if per_sequence else weights
    shown_mask = mask.any(dim=1, keepdim=True) if per_sequence else mask
    big = torch.finfo(weights.dtype).max  # masked entries out of the min; 0 when no token counts (no sync)
    lowest = torch.where(shown_mask, shown, big).min()
    metrics = {
        "sampling/sampling_logp_difference/mean": delta.sum() / count,
        "sampling/sampling_logp_difference/max": delta.max() if delta.numel() else delta.new_zeros(()),
        "sampling/importance_sampling_ratio/min": torch.where(shown_mask.any(), lowest, 0.0),
        "sampling/importance_sampling_ratio/mean": shown.sum() / shown_mask.sum().clamp(min=1),
        "sampling/importance_sampling_ratio/max": torch.where(shown_mask, shown, 0.0).max(),
    }
    return weights, metrics


def high_entropy_mask(
    entropies: torch.Tensor,
    mask: torch.Tensor,
    top_entropy_quantile: float,
    *,
    pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, T)`` bool: the completion tokens whose entropy is among the top ``top_entropy_quantile`` share,
    the only ones kept in the policy loss ("Beyond the 80/20 Rule", Wang et al. 2025, arXiv 2506.01939, eq. 5:
    the gradient restricted to the forking tokens, rho = ``top_entropy_quantile``).

    The threshold is ``torch.quantile(pool, 1 - top_entropy_quantile)`` (linear interpolation), ``pool``
    defaulting to ``entropies[mask]``; a token is kept where its entropy is ``>=`` the threshold and ``mask`` is
    set. 1.0 keeps every token; 0.0 keeps only the highest-entropy one(s). TRL 1.16 counterpart:
    ``GRPOTrainer.get_high_entropy_mask(entropies, mask, 1 - top_entropy_quantile)``, whose pool is the masked
    entropies gathered over all processes (pass that gathered tensor as ``pool``).

    Args:
        entropies: ``(B, T)`` entropy (nats) of the policy's next-token distribution at each completion token.
        mask: ``(B, T)`` ones on real completion tokens.
        top_entropy_quantile: rho in ``[0, 1]``.
        pool: 1-D entropies the quantile is taken over (default: ``entropies[mask]``).

    Raises:
        ValueError: ``top_entropy_quantile`` outside ``[0, 1]`` or mismatched shapes.
    """
    _check_per_token(entropies.shape, mask=mask)
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
    mask = mask.bool()
    values = (entropies[mask] if pool is None else pool).detach().float()
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values, 1.0 - top_entropy_quantile)
    return (entropies.detach().float() >= threshold) & mask


def off_policy_sequence_mask(
    advantages: torch.Tensor,
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """Off-policy sequence masking (DeepSeek-V3.2, arXiv 2512.02556, eq. 9): ``(B, 1)`` (or ``(B, T)`` for
    per-token advantages) float, 0 for the sequences to drop from the policy loss, 1 for the others.

    A sequence is dropped when its advantage is negative *and* its mean per-token KL from the sampling policy,
    ``mean_t (old_logps_t - logps_t)`` over its ``mask`` tokens (the ``k1`` estimate of ``KL(pi_old || pi)``,
    detached), exceeds ``threshold`` (the paper's delta): negative samples the policy has already drifted away
    from are where off-policy updates hurt most. TRL 1.16 counterpart: ``GRPOTrainer.get_off_policy_mask``
    (``off_policy_mask_threshold``; ``old_logps`` are the sampling log-probs, NaN counted as 0).

    Args:
        advantages: ``(B,)``, ``(B, 1)`` or ``(B, T)`` advantages.
        logps: ``(B, T)`` log-probs under the policy being trained (nats; detached here).
        old_logps: ``(B, T)`` log-probs under the policy that sampled the tokens.
        mask: ``(B, T)`` ones on real completion tokens.
        threshold: delta > 0 (nats per token).

    Raises:
        ValueError: mismatched shapes.
    """
    _check_per_token(logps.shape, old_logps=old_logps, mask=mask)
    m = mask.float()
    kl = torch.nan_to_num(old_logps.detach().float() - logps.detach().float(), nan=0.0)
    mean_kl = (kl * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    return ((advantages >= 0) | (mean_kl <= threshold)).float()


def entropy_bonus(entropies: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """0-d ``coef * mean_t H_t`` over the ``mask`` tokens, to subtract from the loss (an exploration bonus: the
    objective ``L = L_policy - coef * H``), with the gradient of ``entropies``; 0 for an empty mask.

    It is the mean per-token entropy whatever the policy loss's reduction, so ``coef`` means the same for every
    ``loss_type``. TRL 1.16 counterpart: ``GRPOTrainer._compute_loss``'s ``entropy_loss`` with
    ``entropy_coef`` (over ``mask * entropy_mask`` with ``top_entropy_quantile``); the entropy regularisation of
    Williams and Peng 1991 / Mnih et al. 2016 (A3C, arXiv 1602.01783, section 4).

    Args:
        entropies: ``(B, T)`` entropy (nats) of the policy's next-token distribution, with gradient.
        mask: ``(B, T)`` ones on the tokens the bonus averages over.
        coef: the weight (TRL's ``entropy_coef``).

    Raises:
        ValueError: mismatched shapes.
    """
    _check_per_token(entropies.shape, mask=mask)
    m = mask.bool()
    return coef * torch.where(m, entropies, 0.0).sum() / m.sum().clamp(min=1)


def adaptive_entropy_coef(coef: float, entropy: float, *, target: float, delta: float, low: float,
                          high: float) -> float:
    """The next entropy coefficient of adaptive entropy control (Skywork-OR1, He et al. 2025, arXiv 2505.22312,
    section 3.2): up by ``delta`` (at most ``high``) when the measured mean token entropy is at or below
    ``target``, down by ``delta`` (at least ``low``) otherwise. The bonus is applied only while the entropy is at
    or below the target. TRL 1.16 counterpart: ``GRPOTrainer`` with ``use_adaptive_entropy`` (``entropy_coef_delta``,
    ``entropy_coef_min``, ``entropy_coef_max``, ``entropy_target``), updated once per optimizer step."""
    return min(coef + delta, high) if entropy <= target else max(coef - delta, low)

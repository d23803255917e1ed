"""PPO-clip losses for the policy and the critic, and the token-to-scalar reductions of GRPO and its variants.

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

LOSS_AGGREGATIONS = ("grpo", "dapo", "dr_grpo")
"""Accepted ``loss_type`` values of :func:`aggregate_token_loss`."""


def _check_per_token(shape: torch.Size, **tensors: torch.Tensor) -> None:
    if len(shape) != 2:
        raise ValueError(f"expected (B, T) per-token tensors, got shape {tuple(shape)}")
    for name, tensor in tensors.items():
        if tensor.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def _token_fraction(selected: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of masked tokens where ``selected`` holds (bool tensors), 0 for an empty mask."""
    return (selected & mask).sum() / mask.sum().clamp(min=1)


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float = 0.2,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, per token: ``max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))``.

    The negative of PPO's ``min(ratio * A, clip(ratio) * A)``: pessimistic, so a token whose ratio has
    already moved past the clip range in the direction its advantage favours gets a constant loss and no
    gradient, while a move in the unfavoured direction is never clipped.

    Source: Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv 1707.06347), eq. 7;
    asymmetric range (``cliprange_high``, "Clip-Higher"): Yu et al. 2025, DAPO (arXiv 2503.14476),
    section 3.1. TRL: ``PPOTrainer`` ``pg_losses`` / ``pg_losses2`` (trl 0.24); ``GRPOTrainer`` ``coef_1`` /
    ``coef_2`` with ``epsilon`` / ``epsilon_high`` (trl 1.16, ``loss_type`` grpo/bnpo/dr_grpo/dapo, without
    the optional ``delta`` two-sided clip). OpenRLHF: ``PolicyLoss`` (``openrlhf/models/loss.py``).

    Args:
        logps: ``(B, T)`` current log-probs (nats); the only input that gets a gradient.
        old_logps: ``(B, T)`` sampling-time log-probs (nats), treated as a constant.
        advantages: ``(B, T)`` per-token (PPO) or ``(B,)`` per-sequence (GRPO, broadcast over tokens),
            treated as a constant.
        mask: ``(B, T)`` tokens that count.
        cliprange: ``eps_low`` in (0, 1) (TRL ``cliprange`` / ``epsilon``, default 0.2).
        cliprange_high: ``eps_high`` > 0 (TRL ``epsilon_high``; DAPO uses 0.28); ``None`` means ``cliprange``.

    Returns:
        ``(per_token_loss, metrics)``: ``(B, T)`` losses (advantage units), 0 where masked, and

        * ``policy/clipfrac``: fraction of masked tokens where the clipped branch is strictly larger, i.e.
          gets no gradient (TRL PPO's ``pg_clipfrac``, ``pg_losses2 > pg_losses``; the same tokens as TRL GRPO's
          ``clip_ratio/region_mean``: ratio below ``1 - eps_low`` with A < 0 or above ``1 + eps_high`` with
          A > 0);
        * ``policy/approxkl``: ``0.5 * mean((logps - old_logps)^2)`` over masked tokens, the ``k2`` estimate
          of the KL between the old and the current policy (nats). TRL PPO takes this mean over *all*
          ``B * T`` positions, padding included (where its log-ratio is 0), so its number is smaller by the
          fraction of padding.

    Raises:
        ValueError: cliprange not in (0, 1); cliprange_high <= 0; shape mismatch.
    """
    eps_low = cliprange
    eps_high = cliprange if cliprange_high is None else cliprange_high
    if not 0.0 < eps_low < 1.0:
        raise ValueError(f"cliprange must be in (0, 1), got {cliprange}")
    if not eps_high > 0.0:
        raise ValueError(f"cliprange_high must be positive, got {cliprange_high}")
    _check_per_token(logps.shape, old_logps=old_logps, mask=mask)
    if advantages.shape == logps.shape[:1]:
        advantages = advantages.unsqueeze(1)
    elif advantages.shape != logps.shape:
        raise ValueError(
            f"advantages must have shape {tuple(logps.shape)} or {tuple(logps.shape[:1])}, "
            f"got {tuple(advantages.shape)}"
        )
    m = mask.bool()
    advantages = torch.where(m, advantages.detach(), 0)
    log_ratio = torch.where(m, logps - old_logps.detach(), 0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token_loss = torch.where(m, torch.maximum(unclipped, clipped), 0)
    with torch.no_grad():
        metrics = {
            "policy/clipfrac": _token_fraction(clipped > unclipped, m),
            "policy/approxkl": 0.5 * (log_ratio**2).sum() / m.sum().clamp(min=1),
        }
    return per_token_loss, metrics


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
    * ``"dapo"``: ``S / num_items_in_batch``, each token weighs the same (Yu et al. 2025, DAPO, arXiv
      2503.14476, eq. 8: the ``1 / sum_i |o_i|`` token-level normalisation, section 3.3). ``num_items_in_batch``
      defaults to the number of masked tokens, clamped at 1 (that is TRL 1.16 ``loss_type="bnpo"``); a value
      you pass is used as given. TRL 1.16's ``"dapo"`` (its default)
      divides instead by the token count of the whole generation batch, across processes, rescaled to one
      micro-batch (``num_items_in_batch / num_processes * grad_accum_steps / steps_per_generation``): pass
      that number to reproduce it under gradient accumulation; for one process and one micro-batch they agree.
    * ``"dr_grpo"``: ``S / (B * max_completion_length)``, a constant normaliser, so neither the sequence
      length nor the batch's token count rescales the gradient (Liu et al. 2025, "Understanding R1-Zero-Like
      Training: A Critical Perspective" (Dr. GRPO), arXiv 2503.20783). TRL 1.16 ``loss_type="dr_grpo"``.

    verl's counterpart: ``agg_loss`` with ``loss_agg_mode`` ``"seq-mean-token-mean"`` / ``"token-mean"`` /
    ``"seq-mean-token-sum-norm"``.

    Args:
        per_token_loss: ``(B, T)`` e.g. from :func:`clipped_policy_loss` (plus ``beta * kl_k3`` for GRPO).
        mask: ``(B, T)`` tokens that count.
        loss_type: ``"grpo"``, ``"dapo"`` or ``"dr_grpo"``.
        max_completion_length: the generation limit, needed by ``"dr_grpo"`` (>= ``T``), ignored otherwise.
        num_items_in_batch: ``"dapo"``'s token count (see above), ignored otherwise.

    Raises:
        ValueError: unknown loss_type; shape mismatch; ``"dr_grpo"`` without a positive
            ``max_completion_length`` or with ``T > max_completion_length``.
    """
    if loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {', '.join(LOSS_AGGREGATIONS)}")
    _check_per_token(per_token_loss.shape, mask=mask)
    m = mask.bool()
    selected = torch.where(m, per_token_loss, 0)
    if loss_type == "grpo":
        return (selected.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if loss_type == "dapo":
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

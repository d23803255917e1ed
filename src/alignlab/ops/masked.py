"""Reductions over the selected entries of a tensor: sum, mean, variance and whitening under a mask.

Shared conventions:

* ``values`` is any float tensor, typically ``(B, T)`` per-token quantities (log-probs in nats, rewards,
  values, advantages);
* ``mask`` has exactly ``values.shape``; it is bool or 0/1 (any nonzero entry counts as selected, so
  fractional weights are *not* supported). Entries where the mask is 0 never reach the result, even if they
  hold ``inf`` or ``nan`` (they are replaced by 0 with :func:`torch.where`, not multiplied by 0), and get a
  zero gradient.

The functions that divide by the number of selected entries (mean, variance, whitening) raise
:class:`ValueError` when that number is 0, instead of returning ``nan``. The check reads the count back to
the host (one device synchronisation); losses that must not synchronise clamp their denominators instead.

Counterparts: TRL ``masked_mean`` / ``masked_var`` / ``masked_whiten``, the helpers of TRL's ``PPOTrainer``
(trl <= 0.24; trl 1.16 no longer ships them); OpenRLHF ``masked_mean`` / ``masked_normalize``
(``openrlhf/models/utils.py``).
"""

from __future__ import annotations

import torch

WHITEN_EPS = 1e-8
"""Added to the variance inside the inverse square root of :func:`masked_whiten`, as TRL."""


def _selected(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if values.shape != mask.shape:
        raise ValueError(f"values and mask must have the same shape, got {tuple(values.shape)} and {tuple(mask.shape)}")
    return torch.where(mask.bool(), values, 0)


def _count(mask: torch.Tensor, dim: int | None) -> torch.Tensor:
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    if (count == 0).any():
        where = "" if dim is None else f" along dim {dim} (at least one slice is empty)"
        raise ValueError(f"mask selects no element{where}")
    return count


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of the entries of ``values`` where ``mask`` is set.

    Args:
        values: float tensor, any shape.
        mask: bool or 0/1 tensor of ``values.shape``.
        dim: dimension to reduce; ``None`` reduces everything to a 0-d tensor.

    Returns:
        ``values.shape`` without ``dim`` (0-d for ``dim=None``), in ``values``' dtype and units. An empty
        selection sums to 0.

    Raises:
        ValueError: ``mask.shape != values.shape``.
    """
    selected = _selected(values, mask)
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of the entries of ``values`` where ``mask`` is set: ``sum(values * mask) / sum(mask)``.

    Same as TRL's ``masked_mean(values, mask, axis)`` on finite inputs.

    Args, returns: as :func:`masked_sum`.

    Raises:
        ValueError: shape mismatch, or the mask selects nothing (in any slice along ``dim``).
    """
    total = masked_sum(values, mask, dim)
    return total / _count(mask, dim)


def masked_mean_or_zero(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0-d ``sum(values * mask) / max(sum(mask), 1)``: :func:`masked_mean` over everything, but 0 for an empty
    selection and without a device synchronisation (for metrics of micro-batches that may hold no counted
    token, e.g. with ``mask_truncated_completions``; TRL 1.16 GRPO's ``global_masked_mean`` on one process).

    Raises:
        ValueError: ``mask.shape != values.shape``.
    """
    return masked_sum(values, mask) / mask.bool().sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the selected entries (all dimensions pooled), 0-d tensor in squared units of ``values``.

    ``var = mean_m((x - mean_m(x))^2)``, times Bessel's correction ``n / (n - 1)`` when ``unbiased``, where
    ``n`` is the number of selected entries. Same as TRL's ``masked_var`` (which divides by zero for
    ``n = 1``; here that raises).

    Raises:
        ValueError: shape mismatch; the mask selects nothing; ``unbiased`` with a single selected entry.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = int(_count(mask, None))
        if n < 2:
            raise ValueError("unbiased variance needs at least 2 selected elements, the mask selects 1")
        variance = variance * (n / (n - 1))
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Standardise ``values`` with the mean and unbiased variance of the selected entries.

    ``out = (x - mean) * rsqrt(var + 1e-8)``; with ``shift_mean=False`` the mean is added back
    (``out + mean``: only the scale changes, as for PPO reward whitening).

    Source: TRL ``masked_whiten`` (same formula and epsilon, unbiased variance); PPO advantage normalisation
    (OpenAI baselines ``ppo2``; Huang et al. 2022, "The 37 Implementation Details of PPO", detail 7). OpenRLHF:
    ``masked_normalize`` (biased variance and its own epsilon handling, so slightly different numbers).

    Args:
        values: float tensor, any shape.
        mask: bool or 0/1 tensor of ``values.shape``.
        shift_mean: keep the result centred at 0 (True) or at the original mean (False).

    Returns:
        Tensor of ``values.shape``. As in TRL, *every* entry is transformed, masked-out ones included: zero
        them yourself (``torch.where(mask, out, 0)``) if they are used later.

    Raises:
        ValueError: shape mismatch; fewer than 2 selected entries.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened

"""Per-token Monte-Carlo estimators of ``KL(pi || pi_ref)`` from the log-probs of sampled tokens.

Notation: tokens are sampled from the policy ``pi``; ``logps = log pi(y_t | x, y_<t)`` and
``ref_logps = log pi_ref(y_t | x, y_<t)``, both ``(B, T)`` in nats. With ``r = pi_ref / pi``
(``log r = ref_logps - logps``), each estimator's expectation under ``pi`` is ``KL(pi || pi_ref)``:

* ``k1 = -log r``: unbiased, high variance, can be negative per token;
* ``k3 = (r - 1) - log r``: unbiased, lower variance, never negative.

Source: Schulman 2020, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html). ``k3`` is the
per-token KL of GRPO, Shao et al. 2024 (arXiv 2402.03300), eq. 4. TRL: ``PPOConfig.kl_estimator`` ``"k1"`` /
``"k3"`` (``PPOTrainer``), the ``per_token_kl`` of ``GRPOTrainer``. OpenRLHF: ``compute_approx_kl``
(``openrlhf/models/utils.py``, ``kl_estimator="k1"`` / ``"k3"``).

Both functions return ``(B, T)`` in nats, in the inputs' dtype, with no masking (padded positions hold
whatever the inputs give them) and are differentiable in both arguments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from alignlab.registry import Registry

KL_ESTIMATORS: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("KL estimator")
"""Estimator name (TRL's ``kl_estimator``) -> function ``(logps, ref_logps) -> (B, T)``."""


def _check(logps: torch.Tensor, ref_logps: torch.Tensor) -> None:
    if logps.shape != ref_logps.shape:
        raise ValueError(
            f"logps and ref_logps must have the same shape, got {tuple(logps.shape)} and {tuple(ref_logps.shape)}"
        )


@KL_ESTIMATORS.register("k1")
def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """``k1 = logps - ref_logps`` per token (nats). Shapes ``(B, T), (B, T) -> (B, T)``.

    Raises:
        ValueError: the shapes differ.
    """
    _check(logps, ref_logps)
    return logps - ref_logps


@KL_ESTIMATORS.register("k3")
def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """``k3 = exp(ref_logps - logps) - (ref_logps - logps) - 1`` per token (nats), always >= 0.

    Computed as ``expm1(d) - d`` with ``d = ref_logps - logps``: the same value as TRL's
    ``exp(d) - d - 1``, without the cancellation error of ``exp(d) - 1`` when ``d`` is near 0.
    Shapes ``(B, T), (B, T) -> (B, T)``. Gradient in ``logps``: ``1 - exp(d)`` (0 where the models agree).

    Raises:
        ValueError: the shapes differ.
    """
    _check(logps, ref_logps)
    log_ratio = ref_logps - logps
    return torch.expm1(log_ratio) - log_ratio


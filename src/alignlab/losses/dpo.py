"""Direct Preference Optimization losses, one pure function per variant.

Notation, shared by every function: for a batch of ``B`` pairs,

* ``chosen_logratios = log pi(y_w|x) - log pi_ref(y_w|x)``, shape ``(B,)``, nats (sequence log-probs,
  summed over completion tokens);
* ``rejected_logratios`` likewise for ``y_l``;
* ``h = chosen_logratios - rejected_logratios``, the implicit reward margin divided by beta.

Each function returns the per-pair loss, shape ``(B,)``; the caller takes the mean. The implicit rewards
``beta * logratios`` and their metrics come from :func:`dpo_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _check(beta: float, label_smoothing: float = 0.0, *, upper: float = 1.0) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < upper:
        raise ValueError(f"label_smoothing must be in [0, {upper}), got {label_smoothing}")


def sigmoid_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DPO loss ``-log sigmoid(beta * h)``; with ``label_smoothing = e``, conservative DPO.

    ``loss = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)``

    Source: Rafailov et al. 2023 (arXiv 2305.18290), eq. 7; conservative DPO (cDPO, Mitchell 2023, "A note
    on DPO with noisy preferences"), which assumes each label is flipped with probability ``e``. TRL:
    ``loss_type="sigmoid"`` (TRL 1.16 no longer applies label smoothing there; with ``e = 0`` they agree).

    Args:
        chosen_logratios, rejected_logratios: ``(B,)`` policy minus reference sequence log-probs (nats).
        beta: KL-regularisation strength, > 0.
        label_smoothing: assumed label-noise rate ``e`` in [0, 0.5).

    Returns:
        ``(B,)`` per-pair losses.

    Raises:
        ValueError: beta <= 0 or label_smoothing outside [0, 0.5).
    """
    _check(beta, label_smoothing, upper=0.5)
    logits = beta * (chosen_logratios - rejected_logratios)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def robust_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Robust DPO (rDPO): an unbiased estimate of the clean DPO loss under label-flip rate ``e``.

    ``loss = [-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)] / (1 - 2e)``

    Source: Chowdhury et al. 2024, "Provably Robust DPO" (arXiv 2403.00409), eq. 12. TRL:
    ``loss_type="robust"``. With ``e = 0`` it equals :func:`sigmoid_loss`.

    Args, returns: as :func:`sigmoid_loss`; ``label_smoothing`` is the flip rate ``e`` in [0, 0.5).

    Raises:
        ValueError: beta <= 0 or label_smoothing outside [0, 0.5).
    """
    _check(beta, label_smoothing, upper=0.5)
    logits = beta * (chosen_logratios - rejected_logratios)
    return (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing
    )


def hinge_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float = 0.1,
) -> torch.Tensor:
    """SLiC hinge loss ``max(0, 1 - beta * h)``.

    Source: Zhao et al. 2023, "SLiC-HF" (arXiv 2305.10425), eq. 10 with margin ``1/beta`` folded into beta.
    TRL: ``loss_type="hinge"``.

    Raises:
        ValueError: beta <= 0.
    """
    _check(beta)
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


def ipo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float = 0.1,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> torch.Tensor:
    """IPO loss ``(h_avg - 1 / (2 beta))^2`` on length-averaged log-ratios.

    ``h_avg = chosen_logratios / |y_w| - rejected_logratios / |y_l|`` (per-token averages), as TRL does and
    as the IPO authors confirmed to TRL; ``beta`` is the paper's ``tau``.

    Source: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (arXiv 2310.12036), eq. 17. TRL: ``loss_type="ipo"``.

    Args:
        chosen_lengths, rejected_lengths: ``(B,)`` completion token counts (clamped to >= 1).

    Raises:
        ValueError: beta <= 0.
    """
    _check(beta)
    h = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    return (h - 1 / (2 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_loss,
}
"""``--loss_type`` name -> loss function."""


def dpo_loss(
    loss_type: str,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Call the loss named ``loss_type`` with the keyword arguments it takes. Returns ``(B,)`` losses.

    Raises:
        ValueError: unknown ``loss_type``, or ``label_smoothing`` given to a loss that does not use it.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose from {', '.join(DPO_LOSSES)}")
    if loss_type in ("sigmoid", "robust"):
        return DPO_LOSSES[loss_type](chosen_logratios, rejected_logratios, beta=beta, label_smoothing=label_smoothing)
    if label_smoothing:
        raise ValueError(f"label_smoothing applies to loss_type sigmoid or robust, not {loss_type!r}")
    if loss_type == "ipo":
        return ipo_loss(
            chosen_logratios,
            rejected_logratios,
            beta=beta,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )
    return DPO_LOSSES[loss_type](chosen_logratios, rejected_logratios, beta=beta)


def dpo_metrics(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Per-pair implicit-reward metrics with TRL's names (all ``(B,)``, detached).

    * ``rewards/chosen`` = ``beta * chosen_logratios``; ``rewards/rejected`` likewise;
    * ``rewards/margins`` = chosen minus rejected reward;
    * ``rewards/accuracies`` = 1 where the margin is strictly positive, else 0 (ties count as wrong, as TRL).
    """
    chosen = beta * chosen_logratios.detach()
    rejected = beta * rejected_logratios.detach()
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).float(),
    }

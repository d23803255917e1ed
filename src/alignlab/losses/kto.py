"""KTO: alignment from unpaired desirable / undesirable completions, as pure functions.

Notation: for an example ``(x, y)`` with label desirable or undesirable, ``logratio = log pi(y|x) -
log pi_ref(y|x)`` (sequence log-probs summed over completion tokens, nats); ``z0`` is the reference point,
an estimate of ``KL(pi || pi_ref)`` from mismatched pairs ``(x_i, y_j)``, ``j != i``.

Source: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
(arXiv 2402.01306), the KTO loss ``L_KTO = E[lambda_y - v(x, y)]`` (TRL cites it as eq. 7, and eq. 8 for
the range of the class weights).
TRL counterpart: ``KTOTrainer`` (trl/trainer/kto_trainer.py, ``_compute_loss``, ``loss_type="kto"``). The data
side (pairs split into unpaired rows, the mismatched pairs of a batch) is :mod:`alignlab.data.unpaired`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_reference: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example KTO losses and TRL's metrics.

    ``v = beta * (logratio - z0)``; desirable: ``loss = desirable_weight * (1 - sigmoid(v))``;
    undesirable: ``loss = undesirable_weight * (1 - sigmoid(-v))``. The batch loss is the mean over all
    ``B`` examples (TRL: ``losses.nanmean()``).

    Args:
        policy_logps: ``(B,)`` policy log-probs of the completions, summed over tokens (nats).
        ref_logps: ``(B,)`` the reference model's, same meaning.
        desirable: ``(B,)`` bool, True for a desirable completion (TRL's ``label``).
        kl_reference: scalar tensor ``z0`` from :func:`kto_kl_reference` (detached, >= 0); zeros for
            TRL's KL-free variants.
        beta: > 0; TRL ``KTOConfig.beta`` (default 0.1).
        desirable_weight, undesirable_weight: ``lambda_D``, ``lambda_U`` (TRL defaults 1.0); the paper
            (eq. 8) suggests ``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3], which TRL checks with a warning.

    Returns:
        ``(losses, metrics)``: ``losses`` ``(B,)`` in input order; ``metrics`` (detached) with TRL's names:
        ``kl`` (0-d), ``rewards/chosen`` and ``logps/chosen`` (``(n_desirable,)``: ``beta * logratio`` and
        the policy log-probs of the desirable examples), ``rewards/rejected`` and ``logps/rejected``
        likewise for the undesirable ones (each key only when that group is not empty, so that a mean over
        the logged values is TRL's sum / count), and ``rewards/margins`` (0-d: mean chosen minus mean
        rejected reward; only when both groups are present, as TRL).

    Raises:
        ValueError: beta <= 0, negative weights, shapes that are not all ``(B,)``, or a non-scalar
            ``kl_reference``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(
            f"desirable_weight and undesirable_weight must be >= 0, got {desirable_weight}, {undesirable_weight}"
        )
    shapes = [tuple(t.shape) for t in (policy_logps, ref_logps, desirable)]
    if len(set(shapes)) != 1 or policy_logps.dim() != 1:
        raise ValueError(f"policy_logps, ref_logps and desirable must all be (B,), got {shapes}")
    if kl_reference.numel() != 1:
        raise ValueError(f"kl_reference must be a scalar, got shape {tuple(kl_reference.shape)}")
    desirable = desirable.to(torch.bool)
    kl = kl_reference.reshape(())
    logratios = policy_logps - ref_logps
    chosen_losses = 1 - torch.sigmoid(beta * (logratios - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - logratios))
    losses = torch.where(desirable, desirable_weight * chosen_losses, undesirable_weight * rejected_losses)

    rewards = beta * logratios.detach()
    logps = policy_logps.detach()
    metrics: dict[str, Tensor] = {"kl": kl.detach()}
    has_chosen, has_rejected = bool(desirable.any()), bool((~desirable).any())
    if has_chosen:
        metrics["rewards/chosen"] = rewards[desirable]
        metrics["logps/chosen"] = logps[desirable]
    if has_rejected:
        metrics["rewards/rejected"] = rewards[~desirable]
        metrics["logps/rejected"] = logps[~desirable]
    if has_chosen and has_rejected:
        metrics["rewards/margins"] = metrics["rewards/chosen"].mean() - metrics["rewards/rejected"].mean()
    return losses, metrics


def kto_kl_reference(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """The KTO reference point ``z0 = max(0, mean(policy_kl_logps - ref_kl_logps))``, detached, 0-d.

    The inputs are log-probs of mismatched pairs ``(x_i, y_j)`` (see
    :func:`alignlab.data.unpaired.mismatched_completions`), so
    their mean log-ratio estimates ``KL(pi || pi_ref)``; no gradient flows through it.

    Source: Ethayarajh et al. 2024 (arXiv 2402.01306), the reference point ``z0``; TRL ``KTOTrainer``:
    ``(KL_logps - ref_KL_logps).mean().detach()``, averaged over processes, then ``clamp(min=0)``. With
    several processes, average the unclamped means across them before clamping to match TRL exactly.

    Args:
        policy_kl_logps, ref_kl_logps: ``(M,)`` summed completion log-probs (nats) of the mismatched pairs.

    Raises:
        ValueError: shapes differ, or no pairs.
    """
    if policy_kl_logps.shape != ref_kl_logps.shape or policy_kl_logps.dim() != 1 or policy_kl_logps.numel() == 0:
        raise ValueError(
            f"policy_kl_logps and ref_kl_logps must both be (M,) with M >= 1, got "
            f"{tuple(policy_kl_logps.shape)} and {tuple(ref_kl_logps.shape)}"
        )
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)

"""Preference losses of the DPO family, registered by name: one pure function per ``--loss_type``.

Every loss reads one :class:`PairLogps` (sequence log-probabilities of ``B`` chosen / rejected completions,
their token counts, and the reference model's log-probabilities when the loss needs them) and returns the
per-pair loss, shape ``(B,)``; the caller takes the mean. Notation shared by the docstrings:

* ``c, r``: policy log-probs of the chosen / rejected completion, summed over its tokens (nats);
* ``|y_w|, |y_l|``: their token counts;
* ``c_lr = c - ref_c``, ``r_lr = r - ref_r``: log-ratios against the reference;
* ``h = c_lr - r_lr``: the implicit reward margin divided by ``beta``.

:func:`preference_loss` combines several losses with weights (TRL's ``loss_type=[...]`` and
``loss_weights``); :func:`preference_metrics` gives TRL's ``rewards/*`` and ``logps/*`` metrics. The
hyperparameters are keyword arguments named as TRL 1.16's config fields (``DPOConfig``, and the
experimental ``CPOConfig`` / ``ORPOConfig``); ``docs/losses.md`` lists each loss with its formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alignlab.registry import Registry

REWARD_KINDS = ("logratio", "logp", "mean_logp")
"""How ``rewards/*`` are computed: ``beta * (logp - ref_logp)``, ``beta * logp``, ``beta * logp / length``."""


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
"""Accepted ``f_divergence_type`` values (TRL 1.16 ``DPOConfig.f_divergence_type``)."""

F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
"""The loss types that take an f-divergence other than reverse_kl (TRL 1.16's list: the losses built on the
chosen-rejected log-ratio difference)."""


def f_divergence_score(logratios: Tensor, f_divergence_type: str = "reverse_kl",
                       f_alpha_divergence_coef: float = 0.5) -> Tensor:
    """f-DPO's score ``f'(u)`` of the policy-to-reference ratio ``u = exp(logratios)``, same shape as
    ``logratios``; it replaces the log-ratio in the loss (Wang et al. 2023, "Beyond Reverse KL: Generalizing
    Direct Preference Optimization with Diverse Divergence Constraints", arXiv 2309.16240, Theorem 1: the
    reward is ``beta f'(pi / pi_ref)``):

    * ``reverse_kl``: ``log u`` (DPO itself);
    * ``forward_kl``: ``1 - 1/u = 1 - exp(-logratios)``;
    * ``js_divergence``: ``log(2u / (1 + u)) = log 2 + logsigmoid(logratios)``;
    * ``alpha_divergence``: ``(u^(alpha - 1) - 1) / (alpha - 1)``, the exponent clamped at 80 as TRL; at
      ``alpha`` = 1 the limit ``log u``.

    TRL 1.16 counterpart: ``DPOTrainer._compute_loss``'s ``chosen_scores`` / ``rejected_scores``.

    Raises:
        ValueError: an unknown ``f_divergence_type``.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(f_alpha_divergence_coef - 1.0) < 1e-6:
            return logratios
        t = torch.clamp((f_alpha_divergence_coef - 1.0) * logratios.float(), max=80.0)
        return ((torch.exp(t) - 1.0) / (f_alpha_divergence_coef - 1.0)).to(logratios.dtype)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; choose from {', '.join(F_DIVERGENCES)}")


def length_desensitized_logps(per_token_logps: Tensor, mask: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO's sequence log-probs (Liu et al. 2024, "Length Desensitization in Direct Preference
    Optimization", arXiv 2409.06411): of each pair, the tokens both completions have (the first
    ``min(|y_w|, |y_l|)`` completion tokens of each) count fully and the longer one's extra "verbose" tokens by
    ``ld_alpha``: ``sum_{t <= l_p} logp_t + ld_alpha * sum_{t > l_p} logp_t``. 1.0 is plain DPO, 0.0 cuts both
    completions to the shorter one's length.

    TRL 1.16 counterpart: ``DPOTrainer._compute_loss`` with ``ld_alpha`` (the same for the reference).

    Args:
        per_token_logps: ``(2B, T)`` log-probs, rows ``[chosen; rejected]`` (pair ``i``: rows ``i`` and ``B + i``).
        mask: ``(2B, T)`` ones on each row's completion tokens (in order: the k-th one is completion token k).
        ld_alpha: the verbose tokens' weight in ``[0, 1]``.

    Returns:
        ``(2B,)`` weighted sums (nats), with the gradient of ``per_token_logps``.

    Raises:
        ValueError: an odd number of rows, mismatched shapes, or ``ld_alpha`` outside ``[0, 1]``.
    """
    if per_token_logps.shape != mask.shape or per_token_logps.dim() != 2 or per_token_logps.shape[0] % 2:
        raise ValueError(f"per_token_logps and mask must be the same (2B, T), got {tuple(per_token_logps.shape)} "
                         f"and {tuple(mask.shape)}")
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    m = mask.bool()
    position = m.long().cumsum(dim=1)
    chosen, rejected = m.sum(dim=1).chunk(2)
    shared = torch.minimum(chosen, rejected).repeat(2)[:, None]
    zero = per_token_logps.new_zeros(())
    head = torch.where(m & (position <= shared), per_token_logps, zero).sum(dim=1)
    tail = torch.where(m & (position > shared), per_token_logps, zero).sum(dim=1)
    return head + ld_alpha * tail


@dataclass(frozen=True)
class PairLogps:
    """What a preference loss may read; every tensor ``(B,)``.

    Attributes:
        chosen_logps: policy log-prob of the chosen completion, summed over its tokens (nats).
        rejected_logps: the same for the rejected completion.
        chosen_lengths: completion token counts, float, >= 1 (losses that divide clamp them at 1, as TRL).
        rejected_lengths: the same for the rejected completion.
        ref_chosen_logps: the reference model's log-prob of the chosen completion; ``None`` for
            reference-free losses.
        ref_rejected_logps: the same for the rejected completion.
        f_divergence_type: f-DPO's divergence (:data:`F_DIVERGENCES`); other than ``reverse_kl`` the log-ratio
            properties return :func:`f_divergence_score` of the log-ratios, so every loss built on them becomes
            its f-DPO form.
        f_alpha_divergence_coef: the alpha of ``alpha_divergence``.

    Raises:
        ValueError: a tensor is not 1-D, the sizes differ, only one of the two reference tensors is given, or an
            unknown ``f_divergence_type``.
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5

    def __post_init__(self) -> None:
        if (self.ref_chosen_logps is None) != (self.ref_rejected_logps is None):
            raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"unknown f_divergence_type {self.f_divergence_type!r}; choose from "
                             f"{', '.join(F_DIVERGENCES)}")
        named = {
            "chosen_logps": self.chosen_logps,
            "rejected_logps": self.rejected_logps,
            "chosen_lengths": self.chosen_lengths,
            "rejected_lengths": self.rejected_lengths,
            "ref_chosen_logps": self.ref_chosen_logps,
            "ref_rejected_logps": self.ref_rejected_logps,
        }
        shapes = {name: tuple(t.shape) for name, t in named.items() if t is not None}
        if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1:
            raise ValueError(f"PairLogps tensors must all have the same shape (B,), got {shapes}")

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen_logps is not None

    @property
    def chosen_logratios(self) -> Tensor:
        """``(B,)`` ``chosen_logps - ref_chosen_logps`` (nats; with an f-divergence, its f-DPO score). Raises
        ValueError without a reference."""
        if self.ref_chosen_logps is None:
            raise ValueError("chosen_logratios needs ref_chosen_logps (this PairLogps has no reference)")
        return f_divergence_score(self.chosen_logps - self.ref_chosen_logps, self.f_divergence_type,
                                  self.f_alpha_divergence_coef)

    @property
    def rejected_logratios(self) -> Tensor:
        """``(B,)`` ``rejected_logps - ref_rejected_logps`` (nats). Raises ValueError without a reference."""
        if self.ref_rejected_logps is None:
            raise ValueError("rejected_logratios needs ref_rejected_logps (this PairLogps has no reference)")
        return f_divergence_score(self.rejected_logps - self.ref_rejected_logps, self.f_divergence_type,
                                  self.f_alpha_divergence_coef)


@dataclass(frozen=True)
class PreferenceLoss:
    """One registered loss.

    Attributes:
        name: the ``--loss_type`` value (TRL's name where TRL has the loss).
        fn: ``fn(pair: PairLogps, **hyperparameters) -> (B,)`` per-pair losses.
        needs_reference: False for losses that never read the reference log-probs (simpo, cpo, orpo, sft).
        hyperparameters: config-field names ``fn`` takes as keywords, e.g. ``("beta", "label_smoothing")``.
        reward_kind: how ``rewards/*`` metrics are computed, one of :data:`REWARD_KINDS`.
        source: paper + equation, and the TRL counterpart.
    """

    name: str
    fn: Callable[..., Tensor]
    needs_reference: bool
    hyperparameters: tuple[str, ...]
    reward_kind: str
    source: str

    @property
    def required_hyperparameters(self) -> tuple[str, ...]:
        """The hyperparameters ``fn`` has no default for (the others default to "off", e.g. label_smoothing=0)."""
        return tuple(h.name for h in PREFERENCE_LOSSES.hyperparameters(self.name) if h.required)


PREFERENCE_LOSSES: Registry[PreferenceLoss] = Registry("preference loss_type", exact=True)
"""``--loss_type`` name -> :class:`PreferenceLoss`, filled by :func:`register_preference_loss`; each entry
declares its hyperparameters (config fields of the same names, read by :func:`preference_loss_kwargs`)."""


def register_preference_loss(
    name: str,
    *,
    needs_reference: bool = True,
    hyperparameters: tuple[str, ...] = ("beta",),
    reward_kind: str = "logratio",
    source: str = "",
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator: register ``fn(pair, *, <hyperparameters>)`` under ``name``; returns ``fn`` unchanged.

    ``hyperparameters`` are the loss's keyword arguments, each read from the config field of the same name
    (:func:`preference_loss_kwargs`): every config that can select the loss must have them
    (tests/test_losses_dpo.py checks it).

    Raises:
        ValueError: ``name`` already registered, unknown ``reward_kind``, or the function's keyword-only
            parameters are not exactly ``hyperparameters``.
    """

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if reward_kind not in REWARD_KINDS:
            raise ValueError(f"reward_kind must be one of {', '.join(REWARD_KINDS)}, got {reward_kind!r}")
        spec = PreferenceLoss(name=name, fn=fn, needs_reference=needs_reference,
                              hyperparameters=tuple(hyperparameters), reward_kind=reward_kind, source=source)
        PREFERENCE_LOSSES.add(name, spec, fn=fn, hyperparameters=hyperparameters)
        return fn

    return decorator


def get_preference_loss(name: str) -> PreferenceLoss:
    """The registered loss ``name``. Raises ValueError listing the choices when there is none."""
    return PREFERENCE_LOSSES.get(name)


def preference_loss_kwargs(loss_types: Sequence[str], config) -> dict[str, float]:
    """The hyperparameters the named losses declare, read from ``config``'s fields of the same names: what a
    config passes to :func:`preference_loss` (each loss then takes its own).

    Raises:
        ValueError: an unknown loss type, or ``config`` lacks a field a named loss declares.
    """
    if isinstance(loss_types, str):
        loss_types = [loss_types]
    return {k: v for name in loss_types for k, v in PREFERENCE_LOSSES.kwargs(name, config).items()}


def preference_loss(
    loss_types: Sequence[str],
    pair: PairLogps,
    *,
    loss_weights: Sequence[float] | None = None,
    **hyperparameters: float,
) -> Tensor:
    """``(B,)`` weighted sum of the named per-pair losses: ``sum_k loss_weights[k] * loss_k``.

    TRL's ``DPOTrainer`` with ``loss_type=[...]`` and ``loss_weights`` (default all 1.0) minimises
    ``sum_k w_k * mean(loss_k)``, the mean of this sum. Each loss's function gets only the hyperparameters
    it declares; other entries of ``hyperparameters`` are ignored, so a caller may pass every config field.

    Args:
        loss_types: registered names; a single string is taken as one name.
        pair: the batch's log-probabilities.
        loss_weights: one weight per name, or None for all 1.0.
        **hyperparameters: config fields by TRL name (``beta``, ``label_smoothing``, ``discopop_tau``, ...).

    Raises:
        ValueError: no or unknown loss type, ``loss_weights`` of another length, a loss that needs a
            reference given a ``pair`` without one, or a required hyperparameter missing.
    """
    if isinstance(loss_types, str):
        loss_types = [loss_types]
    if not loss_types:
        raise ValueError("loss_types is empty; name at least one preference loss")
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(loss_types):
        raise ValueError(f"loss_weights has {len(weights)} values for {len(loss_types)} loss types {list(loss_types)}")
    total = None
    for name, weight in zip(loss_types, weights):
        spec = get_preference_loss(name)
        if spec.needs_reference and not pair.has_reference:
            raise ValueError(f"loss_type {name!r} needs reference log-probs (ref_chosen_logps, ref_rejected_logps)")
        missing = [h for h in spec.required_hyperparameters if h not in hyperparameters]
        if missing:
            raise ValueError(f"loss_type {name!r} needs hyperparameter(s) {', '.join(missing)}")
        kwargs = {h: hyperparameters[h] for h in spec.hyperparameters if h in hyperparameters}
        term = weight * spec.fn(pair, **kwargs)
        total = term if total is None else total + term
    return total


def combined_reward_kind(loss_types: Sequence[str]) -> str:
    """The ``reward_kind`` for metrics of a combination: ``"logratio"`` if any named loss needs a reference
    (TRL's DPOTrainer logs ``beta * logratio`` rewards whatever the loss), else that of the first loss.

    Raises:
        ValueError: no or unknown loss type.
    """
    if isinstance(loss_types, str):
        loss_types = [loss_types]
    if not loss_types:
        raise ValueError("loss_types is empty; name at least one preference loss")
    specs = [get_preference_loss(name) for name in loss_types]
    return "logratio" if any(s.needs_reference for s in specs) else specs[0].reward_kind


def preference_metrics(pair: PairLogps, *, beta: float, reward_kind: str) -> dict[str, Tensor]:
    """Per-pair metrics with TRL's names, all ``(B,)`` and detached.

    * ``rewards/chosen``, ``rewards/rejected``: by ``reward_kind``: ``"logratio"``: ``beta * (logp - ref)``
      (TRL DPOTrainer); ``"logp"``: ``beta * logp`` (TRL CPOTrainer); ``"mean_logp"``:
      ``beta * logp / length`` (TRL CPOTrainer with ``loss_type="simpo"``, ORPOTrainer);
    * ``rewards/margins``: chosen minus rejected reward;
    * ``rewards/accuracies``: 1 where the margin is strictly positive, else 0 (ties count as wrong, as TRL);
    * ``logps/chosen``, ``logps/rejected``: the policy log-probs, summed over tokens; per-token means under
      ``"mean_logp"``, since TRL's SimPO and ORPO log the averaged log-probs they train on.

    Raises:
        ValueError: unknown ``reward_kind``, or ``"logratio"`` with no reference in ``pair``.
    """
    if reward_kind not in REWARD_KINDS:
        raise ValueError(f"reward_kind must be one of {', '.join(REWARD_KINDS)}, got {reward_kind!r}")
    chosen_logps, rejected_logps = pair.chosen_logps.detach(), pair.rejected_logps.detach()
    if reward_kind == "mean_logp":
        chosen_logps = chosen_logps / pair.chosen_lengths.clamp(min=1)
        rejected_logps = rejected_logps / pair.rejected_lengths.clamp(min=1)
    if reward_kind == "logratio":
        chosen = beta * pair.chosen_logratios.detach()
        rejected = beta * pair.rejected_logratios.detach()
    else:
        chosen, rejected = beta * chosen_logps, beta * rejected_logps
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "logps/chosen": chosen_logps,
        "logps/rejected": rejected_logps,
    }


def token_statistics_metrics(entropy: Tensor, mean_logits: Tensor, mask: Tensor, chosen: Tensor) -> dict[str, Tensor]:
    """TRL 1.16's token-level metrics of a micro-batch of preference rows (``DPOTrainer`` and ``KTOTrainer``
    ``_compute_loss``), 0-d and detached, over this process's rows:

    * ``entropy``: mean over every completion token of the entropy of the policy's next-token distribution
      (nats);
    * ``logits/chosen``, ``logits/rejected``: mean over the completion tokens of the chosen (desirable) rows and
      of the others of each token's mean logit over the vocabulary (TRL's ``mean_logits``, "Average logits for
      chosen and rejected completions"). Where no token counts: 0 (TRL's DPO). KTO, whose micro-batches may hold
      only one kind, reduces these two across processes with its reward metrics instead (``kto.subset_means``).

    Args:
        entropy, mean_logits: ``(R, T)`` per-token values (:func:`alignlab.ops.logprobs.completion_logps` with
            ``token_stats``).
        mask: ``(R, T)`` the completion tokens.
        chosen: ``(R,)`` bool, the chosen (desirable) rows.

    Raises:
        ValueError: shapes that do not fit together.
    """
    if entropy.shape != mask.shape or mean_logits.shape != mask.shape or chosen.shape != mask.shape[:1]:
        raise ValueError(f"entropy, mean_logits and mask must be (R, T) alike and chosen (R,), got "
                         f"{tuple(entropy.shape)}, {tuple(mean_logits.shape)}, {tuple(mask.shape)}, {tuple(chosen.shape)}")
    m = mask.bool()
    picked = chosen.bool().to(m.device)[:, None]
    values = mean_logits.detach().float()
    out = {"entropy": torch.where(m, entropy.detach().float(), 0).sum() / m.sum().clamp(min=1)}
    for name, rows in (("logits/chosen", m & picked), ("logits/rejected", m & ~picked)):
        out[name] = torch.where(rows, values, 0).sum() / rows.sum().clamp(min=1)
    return out


# ---------------------------------------------------------------------------------------------------------
# Checks and shared pieces


def _check_beta(beta: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")


def _check_smoothing(label_smoothing: float, *, upper: float = 0.5) -> None:
    if not 0.0 <= label_smoothing < upper:
        raise ValueError(f"label_smoothing must be in [0, {upper}), got {label_smoothing}")


def _smoothed_sigmoid(logits: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 - e) log sigmoid(z) - e log sigmoid(-z)``: the conservative (cDPO) form used by several losses."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _per_token(logps: Tensor, lengths: Tensor) -> Tensor:
    return logps / lengths.clamp(min=1)


def _chosen_nll(pair: PairLogps) -> Tensor:
    """``(B,)``: the batch's mean NLL per chosen-completion token, ``-sum(c) / sum(|y_w|)``, repeated per pair.

    TRL computes it over all chosen tokens of the batch at once (DPO ``sft``; CPO's ``nll_loss``;
    ORPO's), so the per-pair value is that one number; the mean over pairs equals it.
    """
    nll = -pair.chosen_logps.sum() / pair.chosen_lengths.sum().clamp(min=1)
    return nll.expand(pair.chosen_logps.shape[0])


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2`` (as TRL's ORPO ``log1mexp``)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# ---------------------------------------------------------------------------------------------------------
# Losses against a reference model (TRL DPOTrainer, trl/trainer/dpo_trainer.py, `_compute_loss`)


@register_preference_loss(
    "sigmoid",
    hyperparameters=("beta", "label_smoothing"),
    source="Rafailov et al. 2023 (arXiv 2305.18290) eq. 7; cDPO (Mitchell 2023); TRL DPO loss_type='sigmoid'",
)
def sigmoid_loss(pair: PairLogps, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO ``-log sigmoid(beta h)``; with ``label_smoothing = e > 0``, conservative DPO (cDPO).

    ``loss = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)``

    Source: Rafailov et al. 2023 (arXiv 2305.18290), eq. 7; cDPO (Mitchell 2023, "A note on DPO with noisy
    preferences"), which assumes each label is flipped with probability ``e``. TRL: ``loss_type="sigmoid"``;
    TRL 1.16 ignores ``label_smoothing`` there, so the two agree at ``e = 0`` (the default).

    Args:
        pair: needs the reference log-probs.
        beta: KL-regularisation strength, > 0.
        label_smoothing: assumed label-noise rate ``e`` in [0, 0.5).

    Returns:
        ``(B,)`` per-pair losses.

    Raises:
        ValueError: beta <= 0 or label_smoothing outside [0, 0.5).
    """
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    return _smoothed_sigmoid(beta * (pair.chosen_logratios - pair.rejected_logratios), label_smoothing)


@register_preference_loss(
    "hinge",
    source="SLiC-HF, Zhao et al. 2023 (arXiv 2305.10425) eq. 10; TRL DPO loss_type='hinge'",
)
def hinge_loss(pair: PairLogps, *, beta: float) -> Tensor:
    """SLiC hinge loss ``max(0, 1 - beta h)``, ``(B,)``.

    Source: Zhao et al. 2023, "SLiC-HF" (arXiv 2305.10425), eq. 10 with the margin ``1/beta`` folded into
    beta. TRL: ``loss_type="hinge"``.

    Raises:
        ValueError: beta <= 0.
    """
    _check_beta(beta)
    return torch.relu(1 - beta * (pair.chosen_logratios - pair.rejected_logratios))


@register_preference_loss(
    "ipo",
    source="IPO, Azar et al. 2023 (arXiv 2310.12036) eq. 17, per-token averaged; TRL DPO loss_type='ipo'",
)
def ipo_loss(pair: PairLogps, *, beta: float) -> Tensor:
    """IPO ``(h_avg - 1 / (2 beta))^2`` on per-token log-ratios, ``(B,)``.

    ``h_avg = c_lr / |y_w| - r_lr / |y_l|``, as TRL does and as the IPO authors confirmed to TRL;
    ``beta`` is the paper's ``tau``.

    Source: Azar et al. 2023 (arXiv 2310.12036), eq. 17. TRL: ``loss_type="ipo"``.

    Raises:
        ValueError: beta <= 0.
    """
    _check_beta(beta)
    h = _per_token(pair.chosen_logratios, pair.chosen_lengths) - _per_token(
        pair.rejected_logratios, pair.rejected_lengths
    )
    return (h - 1 / (2 * beta)) ** 2


@register_preference_loss(
    "robust",
    hyperparameters=("beta", "label_smoothing"),
    source="rDPO, Chowdhury et al. 2024 (arXiv 2403.00409) eq. 12; TRL DPO loss_type='robust'",
)
def robust_loss(pair: PairLogps, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Robust DPO: an unbiased estimate of the clean DPO loss under label-flip rate ``e``, ``(B,)``.

    ``loss = [-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)] / (1 - 2e)``

    Source: Chowdhury et al. 2024, "Provably Robust DPO" (arXiv 2403.00409), eq. 12. TRL:
    ``loss_type="robust"``. With ``e = 0`` it equals :func:`sigmoid_loss`.

    Raises:
        ValueError: beta <= 0 or label_smoothing outside [0, 0.5).
    """
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    logits = beta * (pair.chosen_logratios - pair.rejected_logratios)
    return (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing
    )


@register_preference_loss(
    "exo_pair",
    hyperparameters=("beta", "label_smoothing"),
    source="EXO-pref, Ji et al. 2024 (arXiv 2402.00856) eq. 16; TRL DPO loss_type='exo_pair'",
)
def exo_pair_loss(pair: PairLogps, *, beta: float, label_smoothing: float) -> Tensor:
    """EXO: ``KL(q || p)`` between the model's and the smoothed label's distribution over {chosen, rejected}.

    With ``q_w = sigmoid(beta h)``, ``q_l = sigmoid(-beta h)``, ``e = label_smoothing``:
    ``loss = q_w (log q_w - log(1 - e)) + q_l (log q_l - log e)``, ``(B,)``.

    Source: Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment"
    (arXiv 2402.00856), eq. 16 (EXO-pref, K = 2). TRL: ``loss_type="exo_pair"``; the paper recommends
    ``e = 1e-3``.

    Raises:
        ValueError: beta <= 0 or label_smoothing outside (0, 1) (TRL also rejects 0).
    """
    _check_beta(beta)
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair needs label_smoothing in (0, 1) (the EXO paper uses 1e-3), got {label_smoothing}")
    logits = beta * (pair.chosen_logratios - pair.rejected_logratios)
    log_pw = torch.log1p(torch.tensor(-label_smoothing, dtype=logits.dtype, device=logits.device))
    log_pl = torch.log(torch.tensor(label_smoothing, dtype=logits.dtype, device=logits.device))
    return torch.sigmoid(logits) * (F.logsigmoid(logits) - log_pw) + torch.sigmoid(-logits) * (
        F.logsigmoid(-logits) - log_pl
    )


@register_preference_loss(
    "nca_pair",
    source="NCA, Chen et al. 2024 (arXiv 2402.05369); TRL DPO loss_type='nca_pair'",
)
def nca_pair_loss(pair: PairLogps, *, beta: float) -> Tensor:
    """NCA for pairs: ``-log sigmoid(beta c_lr) - 0.5 log sigmoid(-beta c_lr) - 0.5 log sigmoid(-beta r_lr)``.

    Unlike DPO it scores each completion's own reward ``beta * logratio``, not only their difference, so the
    chosen likelihood is kept from falling. ``(B,)``.

    Source: Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards"
    (arXiv 2402.05369), NCA for pairwise preferences. TRL: ``loss_type="nca_pair"``.

    Raises:
        ValueError: beta <= 0.
    """
    _check_beta(beta)
    chosen, rejected = beta * pair.chosen_logratios, beta * pair.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


@register_preference_loss(
    "bco_pair",
    source="BCO, Jung et al. 2024 (arXiv 2404.04656), without the reward shift; TRL 1.16 DPO loss_type='bco_pair'",
)
def bco_pair_loss(pair: PairLogps, *, beta: float) -> Tensor:
    """Binary classifier loss on each completion's reward: ``-log sigmoid(beta c_lr) - log sigmoid(-beta r_lr)``.

    ``(B,)``. Source: Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment"
    (arXiv 2404.04656). TRL 1.16: ``loss_type="bco_pair"``, exactly this. The paper, and TRL before 1.0,
    subtract a reward shift ``delta`` (a running mean of the batch's rewards) inside both sigmoids;
    TRL 1.16 dropped it, and so does alignlab.

    Raises:
        ValueError: beta <= 0.
    """
    _check_beta(beta)
    return -F.logsigmoid(beta * pair.chosen_logratios) - F.logsigmoid(-beta * pair.rejected_logratios)


@register_preference_loss(
    "sppo_hard",
    source="SPPO, Wu et al. 2024 (arXiv 2405.00675) eq. 4.7 with hard P; TRL DPO loss_type='sppo_hard'",
)
def sppo_hard_loss(pair: PairLogps, *, beta: float) -> Tensor:
    """SPPO with hard win probabilities: ``(c_lr - 1/(2 beta))^2 + (r_lr + 1/(2 beta))^2``, ``(B,)``.

    Source: Wu et al. 2024, "Self-Play Preference Optimization" (arXiv 2405.00675), eq. 4.7 with the win
    probability set to 1 for the chosen and 0 for the rejected completion (``eta = beta^-1``). TRL:
    ``loss_type="sppo_hard"``.

    Raises:
        ValueError: beta <= 0.
    """
    _check_beta(beta)
    return (pair.chosen_logratios - 0.5 / beta) ** 2 + (pair.rejected_logratios + 0.5 / beta) ** 2


@register_preference_loss(
    "aot",
    hyperparameters=("beta", "label_smoothing"),
    source="AOT, Melnyk et al. 2024 (arXiv 2406.05882), paired; TRL DPO loss_type='aot'",
)
def aot_loss(pair: PairLogps, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Alignment via optimal transport, paired form: DPO's loss on sorted margins, ``(B,)``.

    ``d = sort(c - r) - sort(ref_c - ref_r)`` (each sorted ascending over the batch);
    ``loss_i = -(1 - e) log sigmoid(beta d_i) - e log sigmoid(-beta d_i)``. Entry ``i`` is the ``i``-th
    smallest margin's term, not pair ``i``'s: only the mean over the batch means anything.

    Source: Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"
    (arXiv 2406.05882). TRL: ``loss_type="aot"``.

    Raises:
        ValueError: beta <= 0 or label_smoothing outside [0, 0.5).
    """
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    logratios, _ = torch.sort(pair.chosen_logps - pair.rejected_logps, dim=0)
    ref_logratios, _ = torch.sort(pair.ref_chosen_logps - pair.ref_rejected_logps, dim=0)
    return _smoothed_sigmoid(beta * (logratios - ref_logratios), label_smoothing)


@register_preference_loss(
    "aot_unpaired",
    hyperparameters=("beta", "label_smoothing"),
    source="AOT, Melnyk et al. 2024 (arXiv 2406.05882), unpaired; TRL DPO loss_type='aot_unpaired'",
)
def aot_unpaired_loss(pair: PairLogps, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Alignment via optimal transport, unpaired form, ``(B,)``.

    ``d = sort(c_lr) - sort(r_lr)``; ``loss_i = -(1 - e) log sigmoid(beta d_i) - e log sigmoid(-beta d_i)``:
    the chosen rewards' distribution should dominate the rejected ones'. As :func:`aot_loss`, entry ``i``
    belongs to the ``i``-th quantile, not to pair ``i``.

    Source: Melnyk et al. 2024 (arXiv 2406.05882). TRL: ``loss_type="aot_unpaired"``.

    Raises:
        ValueError: beta <= 0 or label_smoothing outside [0, 0.5).
    """
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    chosen, _ = torch.sort(pair.chosen_logratios, dim=0)
    rejected, _ = torch.sort(pair.rejected_logratios, dim=0)
    return _smoothed_sigmoid(beta * (chosen - rejected), label_smoothing)


@register_preference_loss(
    "apo_zero",
    source="APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266) eq. 7; TRL DPO loss_type='apo_zero'",
)
def apo_zero_loss(pair: PairLogps, *, beta: float) -> Tensor:
    """Anchored preference optimisation, zero anchor: ``1 - sigmoid(beta c_lr) + sigmoid(beta r_lr)``, ``(B,)``.

    Raises the chosen likelihood and lowers the rejected one; for chosen answers better than the model's.

    Source: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions"
    (arXiv 2408.06266), eq. 7. TRL: ``loss_type="apo_zero"``.

    Raises:
        ValueError: beta <= 0.
    """
    _check_beta(beta)
    return 1 - torch.sigmoid(beta * pair.chosen_logratios) + torch.sigmoid(beta * pair.rejected_logratios)


@register_preference_loss(
    "apo_down",
    source="APO-down, D'Oosterlinck et al. 2024 (arXiv 2408.06266) eq. 8; TRL DPO loss_type='apo_down'",
)
def apo_down_loss(pair: PairLogps, *, beta: float) -> Tensor:
    """Anchored preference optimisation, down: ``sigmoid(beta c_lr) + 1 - sigmoid(beta h)``, ``(B,)``.

    Lowers both likelihoods, the rejected one more; for chosen answers worse than the model's.

    Source: D'Oosterlinck et al. 2024 (arXiv 2408.06266), eq. 8. TRL: ``loss_type="apo_down"``.

    Raises:
        ValueError: beta <= 0.
    """
    _check_beta(beta)
    h = pair.chosen_logratios - pair.rejected_logratios
    return torch.sigmoid(beta * pair.chosen_logratios) + 1 - torch.sigmoid(beta * h)


@register_preference_loss(
    "discopop",
    hyperparameters=("beta", "discopop_tau"),
    source="DiscoPOP / LRML, Lu et al. 2024 (arXiv 2406.08414) eq. 5; TRL DPO loss_type='discopop'",
)
def discopop_loss(pair: PairLogps, *, beta: float, discopop_tau: float) -> Tensor:
    """Log-ratio modulated loss: a blend of the logistic and the exponential loss, ``(B,)``.

    With ``z = beta h`` and ``m = sigmoid(z / tau)``: ``loss = (1 - m) (-log sigmoid(z)) + m exp(-z)``.

    Source: Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
    Models" (arXiv 2406.08414), eq. 5. TRL: ``loss_type="discopop"``, ``discopop_tau`` default 0.05.

    Raises:
        ValueError: beta <= 0 or discopop_tau <= 0.
    """
    _check_beta(beta)
    if discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be positive, got {discopop_tau}")
    logits = beta * (pair.chosen_logratios - pair.rejected_logratios)
    modulation = torch.sigmoid(logits / discopop_tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


@register_preference_loss(
    "sigmoid_norm",
    source="length-normalised DPO (Tulu 3, Lambert et al. 2024, arXiv 2411.15124); TRL DPO loss_type='sigmoid_norm'",
)
def sigmoid_norm_loss(pair: PairLogps, *, beta: float) -> Tensor:
    """DPO on per-token log-ratios: ``-log sigmoid(beta (c_lr / |y_w| - r_lr / |y_l|))``, ``(B,)``.

    Source: length-normalised DPO (Tulu 3, Lambert et al. 2024, arXiv 2411.15124). TRL:
    ``loss_type="sigmoid_norm"``.

    Raises:
        ValueError: beta <= 0.
    """
    _check_beta(beta)
    h = _per_token(pair.chosen_logratios, pair.chosen_lengths) - _per_token(
        pair.rejected_logratios, pair.rejected_lengths
    )
    return -F.logsigmoid(beta * h)


# ---------------------------------------------------------------------------------------------------------
# Reference-free losses


@register_preference_loss(
    "sft",
    needs_reference=False,
    hyperparameters=(),
    reward_kind="logp",
    source="NLL of the chosen completion (RPO, Pang et al. 2024, arXiv 2404.19733); TRL DPO loss_type='sft'",
)
def sft_loss(pair: PairLogps) -> Tensor:
    """Negative log-likelihood per chosen token, over the whole batch: ``-sum(c) / sum(|y_w|)``, ``(B,)``.

    Every entry is that one batch value (TRL expands its scalar the same way), so pair ``i``'s entry is not
    pair ``i``'s own NLL; the mean over the batch is TRL's term exactly. Combined with ``sigmoid`` it is RPO
    (Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv 2404.19733) or MPO's SFT part.
    TRL: ``loss_type="sft"``.
    """
    return _chosen_nll(pair)


def _alphapo(logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO's reward shape ``(1 - p^-alpha) / alpha`` of a log-prob (``p = exp(logps)``); ``logps`` itself at
    ``alpha = 0`` (its limit). Gupta et al. 2025, "AlphaPO" (arXiv 2501.03884); TRL's CPOTrainer ``alpha``."""
    return logps if alpha == 0 else (1 - torch.exp(-alpha * logps)) / alpha


@register_preference_loss(
    "simpo",
    needs_reference=False,
    hyperparameters=("beta", "simpo_gamma", "label_smoothing", "alpha"),
    reward_kind="mean_logp",
    source="SimPO, Meng et al. 2024 (arXiv 2405.14734) eq. 6; TRL experimental CPOTrainer loss_type='simpo'",
)
def simpo_loss(pair: PairLogps, *, beta: float, simpo_gamma: float, label_smoothing: float = 0.0,
               alpha: float = 0.0) -> Tensor:
    """SimPO: DPO without a reference on per-token log-probs, with a target reward margin ``gamma``.

    ``z = beta (c / |y_w| - r / |y_l|) - gamma``; ``loss = -(1 - e) log sigmoid(z) - e log sigmoid(-z)``,
    ``(B,)``; with ``e = 0`` it is the paper's eq. 6. ``alpha`` != 0 replaces each per-token log-prob by
    AlphaPO's reward ``(1 - p^-alpha) / alpha`` (TRL CPOConfig's ``alpha``; the logged ``rewards/*`` stay
    ``beta`` times the per-token log-probs).

    Source: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    (arXiv 2405.14734), eq. 6. TRL: experimental ``CPOTrainer`` with ``loss_type="simpo"`` (``beta``
    default 0.1 there, the paper uses 2-10; ``simpo_gamma`` default 0.5). TRL's CPOTrainer also adds
    ``cpo_alpha`` times the chosen NLL (default 1.0; 0 gives pure SimPO): here that is
    ``loss_type=["simpo", "sft"]`` with ``loss_weights=[1, cpo_alpha]`` (CPO-SimPO).

    Raises:
        ValueError: beta <= 0 or label_smoothing outside [0, 0.5).
    """
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    logits = (_alphapo(_per_token(pair.chosen_logps, pair.chosen_lengths), alpha)
              - _alphapo(_per_token(pair.rejected_logps, pair.rejected_lengths), alpha))
    logits = logits - simpo_gamma / beta  # TRL's order of operations
    return _smoothed_sigmoid(beta * logits, label_smoothing)


@register_preference_loss(
    "cpo",
    needs_reference=False,
    hyperparameters=("beta", "cpo_alpha", "label_smoothing", "alpha"),
    reward_kind="logp",
    source="CPO, Xu et al. 2024 (arXiv 2401.08417) eq. 3 + NLL; TRL experimental CPOTrainer loss_type='sigmoid'",
)
def cpo_loss(pair: PairLogps, *, beta: float, cpo_alpha: float, label_smoothing: float = 0.0,
             alpha: float = 0.0) -> Tensor:
    """CPO: reference-free DPO on summed log-probs plus ``cpo_alpha`` times the chosen NLL, ``(B,)``.

    ``z = beta (c - r)``; ``loss = -(1 - e) log sigmoid(z) - e log sigmoid(-z) + cpo_alpha * NLL`` with
    ``NLL = -sum(c) / sum(|y_w|)`` over the batch's chosen tokens (as :func:`sft_loss`).

    Source: Xu et al. 2024, "Contrastive Preference Optimization" (arXiv 2401.08417): the preference term
    is eq. 3 (DPO with a uniform reference, the limit TRL describes as beta -> 0), plus the NLL term.
    TRL: experimental ``CPOTrainer`` with ``loss_type="sigmoid"``; ``cpo_alpha`` default 1.0, ``beta``
    default 0.1. ``alpha`` != 0 replaces ``c`` and ``r`` by AlphaPO's rewards ``(1 - p^-alpha) / alpha`` (TRL's
    ``alpha``; the NLL term and the logged ``rewards/*`` keep the log-probs).

    Raises:
        ValueError: beta <= 0 or label_smoothing outside [0, 0.5).
    """
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    margin = _alphapo(pair.chosen_logps, alpha) - _alphapo(pair.rejected_logps, alpha)
    preference = _smoothed_sigmoid(beta * margin, label_smoothing)
    if cpo_alpha == 0:  # TRL skips the NLL term entirely
        return preference
    return preference + cpo_alpha * _chosen_nll(pair)


@register_preference_loss(
    "orpo",
    needs_reference=False,
    hyperparameters=("beta",),
    reward_kind="mean_logp",
    source="ORPO, Hong et al. 2024 (arXiv 2403.07691) eqs. 6-7; TRL experimental ORPOTrainer",
)
def orpo_loss(pair: PairLogps, *, beta: float) -> Tensor:
    """ORPO: chosen NLL plus ``beta`` times the odds-ratio loss, ``(B,)``.

    With per-token log-probs ``a = c / |y_w|``, ``b = r / |y_l|``:
    ``log_odds = (a - b) - (log(1 - e^a) - log(1 - e^b))`` and
    ``loss = NLL - beta * log sigmoid(log_odds)``, ``NLL = -sum(c) / sum(|y_w|)`` over the batch's chosen
    tokens. ``beta`` is the paper's ``lambda`` (TRL's ORPOConfig names it ``beta``, default 0.1; the
    original code ``alpha``); it is not a KL strength here.

    Source: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
    (arXiv 2403.07691), eq. 6 (total) and eq. 7 (odds-ratio term). TRL: experimental ``ORPOTrainer``
    (``odds_ratio_loss``), computed in float32 as there. Deviation: TRL's ORPO NLL covers the prompt
    tokens too; here, with only completion log-probs, it covers the chosen completion's tokens.

    Raises:
        ValueError: beta <= 0.
    """
    _check_beta(beta)
    a = _per_token(pair.chosen_logps, pair.chosen_lengths).float()
    b = _per_token(pair.rejected_logps, pair.rejected_lengths).float()
    log_odds = (a - b) - (_log1mexp(a) - _log1mexp(b))
    return _chosen_nll(pair) - beta * F.logsigmoid(log_odds)

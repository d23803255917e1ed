"""Advantage estimators by name: one calling convention, one registry, one lookup.

Every estimator is a function ``fn(inputs: AdvantageInputs, **hyperparameters) -> (advantages, metrics)``
registered under a name with :func:`register_advantage_estimator`; an algorithm looks it up with
:func:`get_advantage_estimator` from its config and calls it. A new estimator is one decorated function.

* ``advantages``: detached, either ``(N,)`` (one value per completion, broadcast over its tokens by the
  policy losses of :mod:`alignlab.losses.ppo`) or ``(N, L)`` (one value per completion token, 0 on padding);
* ``metrics``: detached 0-d tensors, logged as they are (TRL names where TRL logs the same quantity).

An estimator that also computes value-function targets returns an :class:`AdvantageOutputs` (which
unpacks as the same pair) with ``returns``. An estimator that needs the score of each prompt's greedy
completion as its baseline says so with the attribute ``needs_greedy_baseline = True``: the online rollout
(:class:`alignlab.algorithms.online.PolicyGradientAlgorithm`) then samples one greedy completion per prompt
and passes its score in :attr:`AdvantageInputs.baseline_scores`.

The registered names are the keys of :data:`ADVANTAGE_ESTIMATORS` (each module of :mod:`alignlab.advantages`
registers its own; ``docs/advantages.md`` has the table). GAE (:func:`.gae.gae_estimator`) has the same calling
convention but is not registered: it reads a critic's values, which only PPO has, and PPO hands the function
itself to the rollout.

Source: the pattern of veRL's ``register_adv_est`` / ``get_adv_estimator_fn``
(``verl/trainer/ppo/core_algos.py``), whose estimator names are reused; OpenRLHF selects its estimator by
one flag, ``--algo.advantage.estimator``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignlab.registry import HyperparameterSpec, Registry

AdvantageEstimator = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``fn(inputs: AdvantageInputs, **hyperparameters) -> (advantages, metrics)``."""

ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator", sort_choices=True)
"""Registered estimators by name (a read-only mapping; :class:`alignlab.registry.Registry`); fill it with
:func:`register_advantage_estimator`."""


@dataclass(frozen=True)
class AdvantageInputs:
    """What a rollout gives every advantage estimator; each reads the fields it needs.

    ``N = P * G`` completions laid out prompt by prompt (``scores[g*G:(g+1)*G]`` are the ``G`` completions of
    prompt ``g``, TRL's layout), padded on the right to ``L`` completion tokens.
    """

    scores: torch.Tensor
    """``(N,)`` sequence-level reward per completion (reward units, summed over reward sources), finite."""
    num_generations: int = 1
    """``G``, completions per prompt (TRL ``num_generations``; OpenRLHF ``n_samples_per_prompt``)."""
    mask: torch.Tensor | None = None
    """``(N, L)`` bool or 0/1 completion mask, right-padded (ones then zeros); needed by the per-token
    estimators and by any KL penalty."""
    kl: torch.Tensor | None = None
    """``(N, L)`` per-token KL estimate between the sampling policy and the reference (nats), e.g.
    ``alignlab.ops.kl.kl_k1(old_logps, ref_logps)``: the estimators that fold a KL penalty into the reward
    (RLOO's ``beta``, REINFORCE++'s ``kl_coef``) read it; ``None`` when there is no reference model."""
    values: torch.Tensor | None = None
    """``(N, L)`` critic values ``V(s_t)`` of the completion tokens at sampling time (reward units), 0 on
    padding; only GAE reads them; ``None`` without a value model."""
    baseline_scores: torch.Tensor | None = None
    """``(P,)`` score of each prompt's greedy completion (reward units, same reward sources and
    ``missing_eos_penalty`` as ``scores``), ``P = N / G``; given to the estimators that declare
    ``needs_greedy_baseline`` (ReMax), else ``None``."""


@dataclass(frozen=True)
class AdvantageOutputs:
    """What an estimator returns when it has value-function targets too (GAE). It unpacks as the
    ``(advantages, metrics)`` pair every estimator returns, so callers that need only those treat all
    estimators alike; :meth:`of` turns either form into this one."""

    advantages: torch.Tensor
    """``(N,)`` or ``(N, L)`` detached advantages."""
    metrics: dict[str, torch.Tensor]
    """Detached 0-d metrics."""
    returns: torch.Tensor | None = None
    """``(N, L)`` detached value-function targets (reward units, 0 on padding), or ``None``."""

    def __iter__(self):
        return iter((self.advantages, self.metrics))

    @classmethod
    def of(cls, result) -> AdvantageOutputs:
        """``result`` of an estimator, an ``(advantages, metrics)`` pair or an :class:`AdvantageOutputs`, as the
        latter."""
        if isinstance(result, cls):
            return result
        advantages, metrics = result
        return cls(advantages, metrics)


def register_advantage_estimator(
    name: str, *, hyperparameters: HyperparameterSpec | None = None
) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register ``fn`` in :data:`ADVANTAGE_ESTIMATORS` under ``name`` and return it unchanged;
    ``hyperparameters`` optionally declares the keywords it reads from a config
    (:class:`alignlab.registry.Registry`).

    Raises:
        ValueError: ``name`` is already taken by a different function (veRL's ``register_adv_est`` rule).
    """
    return ADVANTAGE_ESTIMATORS.register(name, hyperparameters=hyperparameters)


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered under ``name``.

    Raises:
        ValueError: unknown ``name``; the message lists the registered names.

    The built-in estimators are registered when :mod:`alignlab.advantages` is imported, which importing
    this module does first.
    """
    return ADVANTAGE_ESTIMATORS.get(name)

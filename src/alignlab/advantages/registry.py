"""Advantage estimators by name: one calling convention, one registry, one lookup.

Every estimator is a function ``fn(inputs: AdvantageInputs, **hyperparameters) -> (advantages, metrics)``
registered under a name with :func:`register_advantage_estimator`; an algorithm looks it up with
:func:`get_advantage_estimator` from its config and calls it. A new estimator is one decorated function.

* ``advantages``: detached, either ``(N,)`` (one value per completion, broadcast over its tokens by the
  policy losses of :mod:`alignlab.losses.ppo`) or ``(N, L)`` (one value per completion token, 0 on padding);
* ``metrics``: detached 0-d tensors, logged as they are (TRL names where TRL logs the same quantity).

Registered (see ``docs/advantages.md``): ``"grpo"`` (:mod:`.group`), ``"rloo"`` (:mod:`.rloo`),
``"reinforce_plus_plus"`` and ``"reinforce_plus_plus_baseline"`` (:mod:`.reinforce`). GAE
(:mod:`.gae`) is not registered: it needs a critic's values and returns value targets as well, which PPO
handles itself.

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

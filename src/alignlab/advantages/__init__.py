"""Advantage estimators for policy-gradient training: GAE for PPO; group (GRPO), leave-one-out (RLOO),
REINFORCE++ and ReMax estimators, registered by name in :mod:`alignlab.advantages.registry`.

Importing this package registers the built-in estimators; look one up with
``get_advantage_estimator(name)(AdvantageInputs(...), **hyperparameters)``.
"""

from alignlab.advantages.registry import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    AdvantageOutputs,
    get_advantage_estimator,
    register_advantage_estimator,
)
from alignlab.advantages import gae, group, reinforce, remax, rloo  # noqa: E402,F401  (registers the estimators)

__all__ = ["ADVANTAGE_ESTIMATORS", "AdvantageInputs", "AdvantageOutputs", "get_advantage_estimator", "register_advantage_estimator"]

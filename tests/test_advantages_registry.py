"""The advantage-estimator registry: names, lookup, registration, and that each entry is its pure function."""

import pytest
import torch

from alignlab.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    get_advantage_estimator,
    register_advantage_estimator,
)
from alignlab.advantages.group import group_advantages
from alignlab.advantages.reinforce import reinforce_plus_plus_advantages, reinforce_plus_plus_baseline_advantages
from alignlab.advantages.rloo import rloo_advantages

SCORES = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
KL = torch.full((6, 3), 0.1)
INPUTS = AdvantageInputs(scores=SCORES, num_generations=3, mask=MASK, kl=KL)


def test_built_in_names():
    assert {"grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"} <= set(ADVANTAGE_ESTIMATORS)


def test_entries_match_their_functions():
    adv, _ = get_advantage_estimator("grpo")(INPUTS, scale_rewards="none")
    assert adv.tolist() == group_advantages(SCORES, 3, scale_rewards="none")[0].tolist() == [-1.0, 0, 1, 0, 0, 0]
    # rloo with beta reads kl and mask: summed KL per row = 0.1 * [2, 3, 1, 3, 2, 3]
    adv, _ = get_advantage_estimator("rloo")(INPUTS, beta=1.0)
    seq_kl = torch.tensor([0.2, 0.3, 0.1, 0.3, 0.2, 0.3])
    torch.testing.assert_close(adv, rloo_advantages(SCORES, 3, beta=1.0, sequence_kl=seq_kl)[0])
    # rloo without beta needs neither kl nor mask
    adv, _ = get_advantage_estimator("rloo")(AdvantageInputs(scores=SCORES, num_generations=3))
    assert adv.tolist() == pytest.approx([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    adv, _ = get_advantage_estimator("reinforce_plus_plus")(INPUTS, kl_coef=0.5)
    torch.testing.assert_close(adv, reinforce_plus_plus_advantages(SCORES, MASK, KL, kl_coef=0.5)[0])
    assert adv.shape == (6, 3)
    adv, _ = get_advantage_estimator("reinforce_plus_plus_baseline")(INPUTS, kl_coef=0.5)
    torch.testing.assert_close(adv, reinforce_plus_plus_baseline_advantages(SCORES, MASK, 3, KL, kl_coef=0.5)[0])


def test_missing_inputs():
    bare = AdvantageInputs(scores=SCORES, num_generations=3)
    with pytest.raises(ValueError, match="completion mask"):
        get_advantage_estimator("reinforce_plus_plus")(bare)
    with pytest.raises(ValueError, match="completion mask"):
        get_advantage_estimator("rloo")(bare, beta=0.1)


def test_lookup_and_registration():
    with pytest.raises(ValueError, match="choose from grpo, reinforce_plus_plus"):
        get_advantage_estimator("ppo")

    def constant(inputs, *, value=1.0):
        return torch.full_like(inputs.scores, value), {}

    try:
        assert register_advantage_estimator("test_constant")(constant) is constant
        register_advantage_estimator("test_constant")(constant)  # the same function again: allowed
        assert get_advantage_estimator("test_constant")(INPUTS, value=2.0)[0].tolist() == [2.0] * 6
        with pytest.raises(ValueError, match="already registered"):
            register_advantage_estimator("test_constant")(lambda inputs: (inputs.scores, {}))
    finally:
        ADVANTAGE_ESTIMATORS.pop("test_constant", None)

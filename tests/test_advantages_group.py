"""GRPO group advantages against numbers worked out by hand."""

import math

import pytest
import torch

from alignlab.advantages.group import group_advantages

# Two prompts, three completions each: group A = [1, 2, 3], group B = [5, 5, 5].
REWARDS = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
# Group A: mean 2, deviations [-1, 0, 1], unbiased var (1 + 0 + 1) / (3 - 1) = 1, std 1
#   (the biased std would be sqrt(2/3) = 0.816). Group B: mean 5, std 0.
# Whole batch: mean 21 / 6 = 3.5; deviations [-2.5, -1.5, -0.5, 1.5, 1.5, 1.5];
#   squares 6.25 + 2.25 + 0.25 + 3 * 2.25 = 15.5; unbiased var 15.5 / 5 = 3.1, std sqrt(3.1) = 1.7606817
#   (the biased std would be sqrt(15.5 / 6) = 1.607).
BATCH_STD = math.sqrt(3.1)


def test_group_scaling():
    # group A: [-1, 0, 1] / (1 + 1e-4) = [-0.99990001, 0, 0.99990001]; group B: [0, 0, 0] / (0 + 1e-4) = 0
    adv, _ = group_advantages(REWARDS, 3)
    assert adv.tolist() == pytest.approx([-0.9999000099990001, 0.0, 0.9999000099990001, 0.0, 0.0, 0.0], rel=1e-6)


def test_batch_scaling():
    # group-mean baseline [-1, 0, 1, 0, 0, 0], divided by (1.7606817 + 1e-4) = 1.7607817:
    # 1 / 1.7607817 = 0.5679295
    adv, _ = group_advantages(REWARDS, 3, scale_rewards="batch")
    a = 1 / (BATCH_STD + 1e-4)
    assert a == pytest.approx(0.5679295, rel=1e-6)
    assert adv.tolist() == pytest.approx([-a, 0.0, a, 0.0, 0.0, 0.0], rel=1e-6)


def test_no_scaling():
    adv, _ = group_advantages(REWARDS, 3, scale_rewards="none")
    assert adv.tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_metrics():
    _, metrics = group_advantages(REWARDS, 3)
    assert metrics["reward"].item() == pytest.approx(3.5)
    # TRL 1.16 logs the std of the whole batch as reward_std
    assert metrics["reward_std"].item() == pytest.approx(1.7606817, rel=1e-6)
    # mean of the group stds: (1 + 0) / 2
    assert metrics["reward_std_within_group"].item() == pytest.approx(0.5)
    # one prompt in two has identical rewards
    assert metrics["frac_reward_zero_std"].item() == 0.5
    # the per-prompt fraction does not depend on the scaling
    _, batch_metrics = group_advantages(REWARDS, 3, scale_rewards="batch")
    assert batch_metrics["frac_reward_zero_std"].item() == 0.5


def test_pairs_and_single_generations():
    # G = 2: groups [1, 2], [3, 5], [5, 5]; unbiased std of two numbers is |a - b| / sqrt 2
    # [1, 2]: mean 1.5, std 0.7071068 -> [-0.5, 0.5] / 0.7072068 = [-0.7070068, 0.7070068]
    # [3, 5]: mean 4,   std 1.4142136 -> [-1, 1] / 1.4143136 = [-0.7070568, 0.7070568]
    # [5, 5]: 0
    adv, metrics = group_advantages(REWARDS, 2)
    assert adv.tolist() == pytest.approx([-0.7070068, 0.7070068, -0.7070568, 0.7070568, 0.0, 0.0], rel=1e-5)
    assert metrics["frac_reward_zero_std"].item() == pytest.approx(1 / 3)
    # G = 1: each completion is its own baseline, std 0 by convention: all advantages 0, every group "zero std"
    adv, metrics = group_advantages(torch.tensor([1.0, 2.0]), 1)
    assert adv.tolist() == [0.0, 0.0]
    assert metrics["frac_reward_zero_std"].item() == 1.0
    # integer rewards are accepted
    adv, _ = group_advantages(torch.tensor([0, 2]), 2, scale_rewards="none")
    assert adv.tolist() == [-1.0, 1.0]


def test_errors():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(REWARDS, 4)
    with pytest.raises(ValueError, match="unknown scale_rewards"):
        group_advantages(REWARDS, 3, scale_rewards="prompt")
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(REWARDS, 0)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(REWARDS.view(2, 3), 3)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(0), 3)
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)


def test_normalize_then_sum_hand_worked():
    from alignlab.advantages.group import normalize_then_sum

    per_source = torch.tensor([[1.0, 10.0], [3.0, 10.0], [0.0, 0.0], [0.0, 20.0]])
    out = normalize_then_sum(per_source, torch.tensor([1.0, 0.5]), 2)
    # group 0: source 0 is [1, 3]: mean 2, std sqrt(2) -> -+1 / (1.41421356 + 1e-4); source 1 constant -> 0
    # group 1: source 1 is [0, 20]: mean 10, std sqrt(200) -> -+10 / (14.1421356 + 1e-4), weighed by 0.5
    a, b = 1 / (math.sqrt(2) + 1e-4), 0.5 * 10 / (math.sqrt(200) + 1e-4)
    assert out.tolist() == pytest.approx([-a, a, -b, b], abs=1e-6)
    # a source that does not apply (NaN) is left out of its group's statistics and adds 0
    nan = float("nan")
    out = normalize_then_sum(torch.tensor([[1.0, nan], [3.0, 5.0]]), torch.tensor([1.0, 1.0]), 2)
    assert out.tolist() == pytest.approx([-a, a], abs=1e-6)
    with pytest.raises(ValueError):
        normalize_then_sum(per_source, torch.tensor([1.0]), 2)

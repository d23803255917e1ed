"""RLOO leave-one-out advantages against numbers worked out by hand and TRL 1.16's RLOOTrainer lines."""

import math

import pytest
import torch

from alignlab.advantages.rloo import rloo_advantages, sequence_kl

# Two prompts, three completions each: group A = [1, 2, 3], group B = [5, 5, 5] (as test_advantages_group.py).
SCORES = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])


def test_leave_one_out_baseline():
    # group A: 1 - (2 + 3) / 2 = -1.5; 2 - (1 + 3) / 2 = 0; 3 - (1 + 2) / 2 = 1.5
    #   (= G / (G - 1) * (r - mean) = 1.5 * [-1, 0, 1]); group B: 5 - 5 = 0
    adv, metrics = rloo_advantages(SCORES, 3)
    assert adv.tolist() == pytest.approx([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    # raw-score metrics: mean 21 / 6 = 3.5, unbiased std sqrt(15.5 / 5) = sqrt(3.1); group B has std 0
    assert metrics["reward"].item() == pytest.approx(3.5)
    assert metrics["reward_std"].item() == pytest.approx(math.sqrt(3.1), rel=1e-6)
    assert metrics["frac_reward_zero_std"].item() == 0.5


def test_normalize_advantages():
    # [-1.5, 0, 1.5, 0, 0, 0]: mean 0, unbiased var (2.25 + 2.25) / 5 = 0.9, std 0.9486833;
    # 1.5 / (0.9486833 + 1e-4) = 1.5809722
    adv, _ = rloo_advantages(SCORES, 3, normalize_advantages=True)
    assert adv.tolist() == pytest.approx([-1.5809722, 0.0, 1.5809722, 0.0, 0.0, 0.0], rel=1e-6)


def test_reward_clip_range_then_kl_penalty():
    # clip to (1.5, 4): [1.5, 2, 3, 4, 4, 4]; group A: 1.5 - 2.5 = -1, 2 - 2.25 = -0.25, 3 - 1.75 = 1.25
    adv, metrics = rloo_advantages(SCORES, 3, reward_clip_range=(1.5, 4.0))
    assert adv.tolist() == pytest.approx([-1.0, -0.25, 1.25, 0.0, 0.0, 0.0])
    assert metrics["reward"].item() == pytest.approx(3.5)  # raw scores, as TRL logs them
    # beta 0.5, summed KL [2, 0, 0, 0, 0, 2]: rewards [0, 2, 3, 5, 5, 4]
    # group A: 0 - 2.5 = -2.5, 2 - 1.5 = 0.5, 3 - 1 = 2; group B: 5 - 4.5 = 0.5, 5 - 4.5 = 0.5, 4 - 5 = -1
    # no group has equal rewards any more
    adv, metrics = rloo_advantages(SCORES, 3, beta=0.5, sequence_kl=torch.tensor([2.0, 0, 0, 0, 0, 2]))
    assert adv.tolist() == pytest.approx([-2.5, 0.5, 2.0, 0.5, 0.5, -1.0])
    assert metrics["frac_reward_zero_std"].item() == 0.0


def test_single_generation_and_sequence_kl():
    # G = 1: no other completion to compare with, advantage 0 (TRL)
    adv, metrics = rloo_advantages(torch.tensor([1.0, 4.0]), 1)
    assert adv.tolist() == [0.0, 0.0]
    assert metrics["frac_reward_zero_std"].item() == 1.0
    # summed over masked tokens only: [0.5 + 0.25, 1.0] (the 7.0 is padding)
    kl = torch.tensor([[0.5, 0.25, 7.0], [1.0, 7.0, 7.0]])
    assert sequence_kl(kl, torch.tensor([[1, 1, 0], [1, 0, 0]])).tolist() == [0.75, 1.0]


def test_errors():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        rloo_advantages(SCORES, 4)
    with pytest.raises(ValueError, match="sequence_kl"):
        rloo_advantages(SCORES, 3, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        rloo_advantages(SCORES, 3, beta=-0.1)
    with pytest.raises(ValueError, match="reward_clip_range"):
        rloo_advantages(SCORES, 3, reward_clip_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="finite"):
        rloo_advantages(torch.tensor([1.0, float("inf")]), 2)
    with pytest.raises(ValueError, match="kl and mask"):
        sequence_kl(torch.zeros(2, 3), torch.ones(2, 4))


def _trl_rloo(rewards, num_generations, *, normalize_advantages, reward_clip_range, beta, per_token_kl,
              completion_mask):
    """TRL 1.16 ``RLOOTrainer._generate_and_score_completions``, the lines from reward clipping to
    ``nan_to_num``, transcribed (one process, all completions scorable)."""
    from trl.trainer.utils import nanstd

    if reward_clip_range:
        rewards = rewards.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    if beta != 0.0:
        kl = (per_token_kl * completion_mask).sum(-1)
        rewards = rewards - beta * kl
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    if num_generations > 1:
        baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
        baselines = baselines.view(-1)
        advantages = rewards - baselines
    else:
        advantages = torch.zeros_like(rewards)
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("normalize_advantages", [False, True])
@pytest.mark.parametrize("num_generations", [2, 4])
def test_matches_trl(normalize_advantages, num_generations):
    g = torch.Generator().manual_seed(3)
    n, length = 8, 6
    scores = torch.randn(n, generator=g) * 2
    per_token_kl = torch.randn(n, length, generator=g) * 0.1
    mask = (torch.arange(length) < torch.randint(1, length + 1, (n, 1), generator=g)).long()
    options = {"normalize_advantages": normalize_advantages, "reward_clip_range": (-1.5, 1.5), "beta": 0.05}
    expected = _trl_rloo(scores, num_generations, per_token_kl=per_token_kl, completion_mask=mask, **options)
    adv, _ = rloo_advantages(scores, num_generations, sequence_kl=sequence_kl(per_token_kl, mask), **options)
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-6)
    assert expected.abs().sum() > 0

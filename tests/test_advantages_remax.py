"""ReMax's advantage estimator against hand-worked numbers and against veRL's ``compute_remax_outcome_advantage``
(its lines transcribed), and its registry entry."""

import pytest
import torch

from alignlab.advantages import AdvantageInputs, get_advantage_estimator
from alignlab.advantages.remax import remax_advantages

# 2 prompts x 2 completions; greedy scores 2 (prompt 0) and -0.5 (prompt 1)
SCORES = torch.tensor([1.0, 3.0, -1.0, 0.0])
BASELINE = torch.tensor([2.0, -0.5])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
KL = torch.where(MASK.bool(), 0.1, 5.0)  # 0.1 per completion token; padding values must not count


def test_without_kl_every_token_gets_score_minus_the_greedy_score():
    adv, metrics = remax_advantages(SCORES, BASELINE, MASK, 2)
    # row 0: 1 - 2 = -1; row 1: 3 - 2 = 1; row 2: -1 + 0.5 = -0.5; row 3: 0 + 0.5 = 0.5; padding 0
    assert adv.tolist() == [[-1.0, -1.0, 0.0], [1.0, 0.0, 0.0], [-0.5, -0.5, -0.5], [0.5, 0.5, 0.0]]
    # reward: mean(1, 3, -1, 0) = 0.75; unbiased std: squares of (0.25, 2.25, -1.75, -0.75) sum to 8.75,
    # / 3 = 2.9166667, sqrt 1.7078251; baseline_reward: mean(2, -0.5) = 0.75; return: mean score 0.75
    assert float(metrics["reward"]) == pytest.approx(0.75)
    assert float(metrics["reward_std"]) == pytest.approx(1.7078251, rel=1e-6)
    assert float(metrics["baseline_reward"]) == pytest.approx(0.75)
    assert float(metrics["return"]) == pytest.approx(0.75)


def test_with_kl_in_the_reward_by_hand():
    adv, metrics = remax_advantages(SCORES, BASELINE, MASK, 2, KL, kl_coef=0.5)
    # token rewards -0.05 per token, score on the last one:
    #   row 0 [-0.05, 0.95, 0], row 1 [2.95, 0, 0], row 2 [-0.05, -0.05, -1.05], row 3 [-0.05, -0.05, 0]
    # returns (suffix sums): row 0 [0.9, 0.95, 0], row 1 [2.95, 0, 0], row 2 [-1.15, -1.1, -1.05],
    #   row 3 [-0.1, -0.05, 0]; minus the greedy score on completion tokens (2, 2, -0.5, -0.5):
    expected = torch.tensor([[-1.1, -1.05, 0.0], [0.95, 0.0, 0.0], [-0.65, -0.6, -0.55], [0.4, 0.45, 0.0]])
    torch.testing.assert_close(adv, expected)
    # return: mean of the row sums 0.9, 2.95, -1.15, -0.1 = 2.6 / 4 = 0.65
    assert float(metrics["return"]) == pytest.approx(0.65)
    assert float(metrics["reward"]) == pytest.approx(0.75)  # the raw scores, not the KL-shaped ones


def test_matches_verl():
    # veRL compute_remax_outcome_advantage (core_algos.py), with token_level_rewards shaped by use_kl_in_reward
    # (token_level_scores - beta * kld, the score on the last response token) and reward_baselines per row
    mask = MASK.float()
    lengths = MASK.sum(-1)
    scores_tok = torch.zeros_like(mask)
    scores_tok[torch.arange(4), lengths - 1] = SCORES
    token_level_rewards = scores_tok - 0.5 * KL * mask
    reward_baselines = BASELINE.repeat_interleave(2)
    returns = (token_level_rewards * mask).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
    verl = returns - reward_baselines.unsqueeze(-1) * mask
    adv, _ = remax_advantages(SCORES, BASELINE, MASK, 2, KL, kl_coef=0.5)
    torch.testing.assert_close(adv, verl * mask)  # veRL's padding holds suffix sums of 0: 0 as well
    assert torch.equal(verl * (1 - mask), torch.zeros_like(verl))


def test_registry_entry_and_errors():
    estimator = get_advantage_estimator("remax")
    assert estimator.needs_greedy_baseline is True
    inputs = AdvantageInputs(scores=SCORES, num_generations=2, mask=MASK, kl=KL, baseline_scores=BASELINE)
    adv, _ = estimator(inputs, kl_coef=0.5)
    torch.testing.assert_close(adv, remax_advantages(SCORES, BASELINE, MASK, 2, KL, kl_coef=0.5)[0])
    with pytest.raises(ValueError, match="baseline_scores"):
        estimator(AdvantageInputs(scores=SCORES, num_generations=2, mask=MASK))
    with pytest.raises(ValueError, match=r"baseline_scores must have shape \(2,\)"):
        remax_advantages(SCORES, torch.tensor([1.0, 2.0, 3.0]), MASK, 2)
    with pytest.raises(ValueError, match="baseline_scores must be finite"):
        remax_advantages(SCORES, torch.tensor([1.0, float("nan")]), MASK, 2)
    with pytest.raises(ValueError, match="needs the per-token kl"):
        remax_advantages(SCORES, BASELINE, MASK, 2, kl_coef=0.1)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        remax_advantages(SCORES[:3], BASELINE, MASK[:3], 2)

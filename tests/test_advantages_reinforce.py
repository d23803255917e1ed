"""REINFORCE++ (and its group-baseline variant) against numbers worked out by hand and OpenRLHF's lines."""

import pytest
import torch

from alignlab.advantages.reinforce import reinforce_plus_plus_advantages, reinforce_plus_plus_baseline_advantages

# Two completions, scores [1, -1]; row 0 has 3 tokens, row 1 has 2 (its third position is padding, KL junk 9.9).
SCORES = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
KL = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.9]])
# kl_coef 0.5: token rewards -0.5 * kl, plus the score on the last token:
#   row 0: [-0.05, -0.1, -0.15 + 1 = 0.85]        row 1: [-0.2, -0.25 - 1 = -1.25, 0]
# returns (gamma 1, reward-to-go):
#   row 0: [0.7, 0.75, 0.85]                      row 1: [-1.45, -1.25, 0]
# over the 5 tokens: mean (0.7 + 0.75 + 0.85 - 1.45 - 1.25) / 5 = -0.4 / 5 = -0.08
# deviations [0.78, 0.83, 0.93, -1.37, -1.17]; biased var (0.6084 + 0.6889 + 0.8649 + 1.8769 + 1.3689) / 5
#   = 5.408 / 5 = 1.0816, std 1.04; advantages = deviations / 1.04


def test_hand_values():
    adv, metrics = reinforce_plus_plus_advantages(SCORES, MASK, KL, kl_coef=0.5)
    expected = [[0.75, 0.83 / 1.04, 0.93 / 1.04], [-1.37 / 1.04, -1.125, 0.0]]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    # return: mean over completions of the summed token rewards, (0.7 - 1.45) / 2 = -0.375
    assert metrics["return"].item() == pytest.approx(-0.375)
    assert metrics["reward"].item() == pytest.approx(0.0)
    assert metrics["reward_std"].item() == pytest.approx(2**0.5, rel=1e-6)
    # no_std_norm keeps the centred returns
    adv, _ = reinforce_plus_plus_advantages(SCORES, MASK, KL, kl_coef=0.5, no_std_norm=True)
    torch.testing.assert_close(adv, torch.tensor([[0.78, 0.83, 0.93], [-1.37, -1.17, 0.0]]), rtol=1e-5, atol=1e-6)


def test_discount_and_clip():
    # gamma 0.5, reward-to-go from the token rewards above:
    #   row 0: t2 0.85; t1 -0.1 + 0.5 * 0.85 = 0.325; t0 -0.05 + 0.5 * 0.325 = 0.1125
    #   row 1: t1 -1.25; t0 -0.2 + 0.5 * -1.25 = -0.825
    # mean (0.1125 + 0.325 + 0.85 - 0.825 - 1.25) / 5 = -0.7875 / 5 = -0.1575
    adv, _ = reinforce_plus_plus_advantages(SCORES, MASK, KL, kl_coef=0.5, gamma=0.5, no_std_norm=True)
    expected = [[0.27, 0.4825, 1.0075], [-0.6675, -1.0925, 0.0]]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    # reward_clip_range (-0.5, 0.5) clamps the scores to [0.5, -0.5] before the KL tokens are added:
    # returns row 0 [0.2, 0.25, 0.35], row 1 [-0.95, -0.75]; mean -0.9 / 5 = -0.18
    adv, _ = reinforce_plus_plus_advantages(SCORES, MASK, KL, kl_coef=0.5, no_std_norm=True,
                                            reward_clip_range=(-0.5, 0.5))
    torch.testing.assert_close(adv, torch.tensor([[0.38, 0.43, 0.53], [-0.77, -0.57, 0.0]]), rtol=1e-5, atol=1e-6)


def test_baseline_variant():
    # G = 2, scores [1, 3 | 0, 0]: group means 2 and 0, baselined [-1, 1, 0, 0]; no KL; 2 tokens each
    # returns: [-1, -1], [1, 1], [0, 0], [0, 0]; mean 0; biased var 4 / 8 = 0.5; advantages * sqrt(2)
    adv, metrics = reinforce_plus_plus_baseline_advantages(torch.tensor([1.0, 3.0, 0.0, 0.0]), torch.ones(4, 2), 2,
                                                           kl_coef=0.0)
    r2 = 2**0.5
    torch.testing.assert_close(adv, torch.tensor([[-r2, -r2], [r2, r2], [0.0, 0.0], [0.0, 0.0]]))
    assert metrics["reward"].item() == pytest.approx(1.0)  # raw scores
    assert metrics["return"].item() == pytest.approx(0.0)  # baselined ones
    with pytest.raises(ValueError, match="gamma = 1"):
        reinforce_plus_plus_baseline_advantages(SCORES, MASK, 2, KL, gamma=0.9)


def test_errors():
    with pytest.raises(ValueError, match="kl_coef > 0 needs"):
        reinforce_plus_plus_advantages(SCORES, MASK)
    with pytest.raises(ValueError, match="at least one completion token"):
        reinforce_plus_plus_advantages(SCORES, torch.tensor([[1, 1, 1], [0, 0, 0]]), KL)
    with pytest.raises(ValueError, match="right-padded"):
        reinforce_plus_plus_advantages(SCORES, torch.tensor([[1, 1, 1], [0, 1, 1]]), KL)
    with pytest.raises(ValueError, match="mask must have shape"):
        reinforce_plus_plus_advantages(SCORES, torch.ones(3, 3), KL)
    with pytest.raises(ValueError, match="kl must have shape"):
        reinforce_plus_plus_advantages(SCORES, MASK, KL[:, :2])
    with pytest.raises(ValueError, match="gamma"):
        reinforce_plus_plus_advantages(SCORES, MASK, KL, gamma=1.5)
    with pytest.raises(ValueError, match="kl_coef"):
        reinforce_plus_plus_advantages(SCORES, MASK, KL, kl_coef=-1.0)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        reinforce_plus_plus_baseline_advantages(torch.zeros(3), torch.ones(3, 2), 2, kl_coef=0.0)


def _openrlhf(rewards, kl, action_mask, *, estimator, n_samples_per_prompt, kl_coef, gamma, reward_clip_range,
              no_std_norm):
    """OpenRLHF ``compute_advantages_and_returns`` for one experience batch, transcribed from
    ``openrlhf/trainer/ppo_utils/experience_maker.py`` (baseline, ``compute_reward`` of ``models/utils.py``,
    ``get_cumulative_returns``, normalisation)."""
    rewards = rewards.reshape(-1, n_samples_per_prompt)
    if estimator == "reinforce_baseline":
        rewards = rewards - rewards.mean(-1, keepdim=True)
    r = rewards.reshape(-1)
    # compute_reward
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    kl_reward = -kl_coef * kl
    eos_indices = action_mask.size(1) - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    last_reward = torch.zeros_like(kl).scatter_(dim=1, index=eos_indices, src=r.unsqueeze(1).to(kl.dtype))
    reward = last_reward + kl_reward
    # get_cumulative_returns
    returns = torch.zeros_like(reward)
    cumulative_return = torch.zeros(reward.size(0))
    reward = action_mask * reward
    for t in reversed(range(reward.size(1))):
        cumulative_return = reward[:, t] + gamma * cumulative_return
        returns[:, t] = cumulative_return
    advantages = returns.flatten().float()
    masks = action_mask.flatten()
    num_actions = masks.sum()
    mean = (advantages * masks).sum() / num_actions
    rstd = 1
    if not no_std_norm:
        var = ((advantages - mean).pow(2) * masks).sum() / num_actions
        rstd = var.clamp(min=1e-8).rsqrt()
    return (returns - mean) * rstd


@pytest.mark.parametrize(
    "estimator, gamma, no_std_norm",
    [
        ("reinforce", 1.0, False),
        ("reinforce", 0.9, False),
        ("reinforce", 1.0, True),
        ("reinforce_baseline", 1.0, False),
    ],
)
def test_matches_openrlhf(estimator, gamma, no_std_norm):
    g = torch.Generator().manual_seed(5)
    n, length, group = 8, 7, 4
    scores = torch.randn(n, generator=g) * 3
    kl = torch.randn(n, length, generator=g) * 0.2
    mask = (torch.arange(length) < torch.randint(1, length + 1, (n, 1), generator=g)).float()
    options = {"kl_coef": 0.05, "reward_clip_range": (-2.0, 2.0), "no_std_norm": no_std_norm}
    expected = _openrlhf(scores, kl, mask, estimator=estimator, n_samples_per_prompt=group, gamma=gamma, **options)
    expected = expected * mask  # OpenRLHF leaves -mean * rstd on padding; its loss masks it
    if estimator == "reinforce":
        adv, _ = reinforce_plus_plus_advantages(scores, mask, kl, gamma=gamma, **options)
    else:
        adv, _ = reinforce_plus_plus_baseline_advantages(scores, mask, group, kl, **options)
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-6)

"""The reward shaping the per-token estimators share (``token_rewards``, ``reward_to_go``), GAE through the
registry's calling convention (``gae_estimator``, PPO's path) and ``AdvantageOutputs``, against hand-worked
numbers."""

import pytest
import torch

from alignlab.advantages.gae import compute_gae, gae_estimator, kl_penalized_rewards, token_rewards
from alignlab.advantages.registry import AdvantageInputs, AdvantageOutputs
from alignlab.advantages.reinforce import reward_to_go
from alignlab.ops.masked import masked_whiten

SCORES = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
KL = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.5, 9.0]])


def test_token_rewards_by_hand():
    # -0.5 * kl on completion tokens, the score added on the last one, padding 0:
    # row 0 [-0.05, -0.1, -0.15 + 1 = 0.85]; row 1 [-0.25, 0.25 - 2 = -1.75, 0]
    rewards = token_rewards(SCORES, MASK, KL, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-0.25, -1.75, 0.0]]))
    # no KL: the score alone
    torch.testing.assert_close(token_rewards(SCORES, MASK, kl_coef=0.0),
                               torch.tensor([[0.0, 0.0, 1.0], [0.0, -2.0, 0.0]]))
    with pytest.raises(ValueError, match="needs the per-token kl"):
        token_rewards(SCORES, MASK, kl_coef=0.1)
    with pytest.raises(ValueError, match="at least one"):
        token_rewards(SCORES, torch.tensor([[1, 0, 0], [0, 0, 0]]), kl_coef=0.0)


def test_reward_to_go_by_hand():
    rewards = torch.tensor([[-0.05, -0.1, 0.85], [-0.25, -1.75, 0.0]])
    # gamma 1: suffix sums, row 0 [0.7, 0.75, 0.85], row 1 [-2.0, -1.75, 0]
    torch.testing.assert_close(reward_to_go(rewards), torch.tensor([[0.7, 0.75, 0.85], [-2.0, -1.75, 0.0]]))
    # gamma 0.5: row 0 t2 0.85, t1 -0.1 + 0.425 = 0.325, t0 -0.05 + 0.1625 = 0.1125;
    #            row 1 t2 0, t1 -1.75, t0 -0.25 - 0.875 = -1.125
    torch.testing.assert_close(reward_to_go(rewards, 0.5), torch.tensor([[0.1125, 0.325, 0.85], [-1.125, -1.75, 0.0]]))


def test_gae_estimator_by_hand_and_as_ppo_composed_it():
    # kl_coef 0, values 0, gamma = lam = 1: raw advantages = returns = the score on every token,
    # row 0 [1, 1, 1], row 1 [-2, -2, (pad)]. Whitened over the 5 tokens: mean -0.2, unbiased variance
    # (3 * 1.2^2 + 2 * 1.8^2) / 4 = 2.7, so 1.2 / sqrt(2.7) = 0.7302967 and -1.8 / sqrt(2.7) = -1.0954451
    inputs = AdvantageInputs(scores=SCORES, mask=MASK, values=torch.zeros(2, 3))
    out = gae_estimator(inputs, kl_coef=0.0, gamma=1.0, lam=1.0)
    assert isinstance(out, AdvantageOutputs) and out.metrics == {}
    torch.testing.assert_close(out.advantages, torch.tensor([[0.7302967, 0.7302967, 0.7302967],
                                                             [-1.0954451, -1.0954451, 0.0]]))
    torch.testing.assert_close(out.returns, torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, 0.0]]))

    # with a KL, values and whitened rewards: the same numbers as the steps PPO ran one by one before
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
    ref = torch.tensor([[-1.2, -1.5, -0.4], [-0.1, -1.0, 0.0]])
    values = torch.tensor([[0.3, -0.2, 0.1], [0.5, 0.4, 0.0]])
    mask = MASK.bool()
    for estimator in ("k1", "k3"):
        from alignlab.ops.kl import KL_ESTIMATORS

        rewards = kl_penalized_rewards(SCORES, logps, ref, mask, kl_coef=0.1, estimator=estimator)
        rewards = torch.where(mask, masked_whiten(rewards, mask, shift_mean=False), 0)
        advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
        advantages = torch.where(mask, masked_whiten(advantages, mask), 0)
        out = gae_estimator(AdvantageInputs(scores=SCORES, mask=MASK, values=values,
                                            kl=KL_ESTIMATORS[estimator](logps, ref)),
                            kl_coef=0.1, gamma=0.9, lam=0.8, whiten_rewards=True)
        assert torch.equal(out.advantages, advantages) and torch.equal(out.returns, returns)
    with pytest.raises(ValueError, match="critic's values"):
        gae_estimator(AdvantageInputs(scores=SCORES, mask=MASK))


def test_advantage_outputs_unpack_as_the_pair():
    advantages, metrics = AdvantageOutputs(torch.ones(2), {"m": torch.tensor(1.0)}, torch.zeros(2, 3))
    assert advantages.tolist() == [1.0, 1.0] and list(metrics) == ["m"]
    pair = (torch.ones(2), {})
    out = AdvantageOutputs.of(pair)
    assert out.advantages is pair[0] and out.returns is None
    assert AdvantageOutputs.of(out) is out

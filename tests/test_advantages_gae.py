"""GAE and KL-penalised rewards against numbers worked out by hand."""

import pytest
import torch

from alignlab.advantages.gae import compute_gae, kl_penalized_rewards


def _flat(t):
    return t.flatten().tolist()


def test_gae_one_row_hand_values():
    # gamma = 0.9, lam = 0.5, gamma * lam = 0.45; no bootstrap after the last token.
    # t=2: delta = 1 + 0.9 * 0   - 0.7 = 0.3                       A2 = 0.3
    # t=1: delta = 0 + 0.9 * 0.7 - 0.6 = 0.63 - 0.6 = 0.03          A1 = 0.03 + 0.45 * 0.3   = 0.165
    # t=0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.54 - 0.5 = 0.04          A0 = 0.04 + 0.45 * 0.165 = 0.11425
    # returns = A + V = [0.11425 + 0.5, 0.165 + 0.6, 0.3 + 0.7] = [0.61425, 0.765, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.5)
    assert _flat(adv) == pytest.approx([0.11425, 0.165, 0.3], rel=1e-6)
    assert _flat(ret) == pytest.approx([0.61425, 0.765, 1.0], rel=1e-6)


def test_gae_padding_does_not_bootstrap():
    # Row 1 has two tokens; its padded position holds junk (reward 9, value 9) that must be ignored.
    # t=2 (padding): A = 0, return 0
    # t=1: delta = 2.0 + 0.9 * 0 (not 9) - 0.5 = 1.5                 A1 = 1.5
    # t=0: delta = 0.2 + 0.9 * 0.5 - 1.0 = 0.2 + 0.45 - 1.0 = -0.35  A0 = -0.35 + 0.45 * 1.5 = 0.325
    # returns = [0.325 + 1.0, 1.5 + 0.5, 0] = [1.325, 2.0, 0]
    # Row 0 is the row of the previous test, unchanged by batching.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.2, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert _flat(adv) == pytest.approx([0.11425, 0.165, 0.3, 0.325, 1.5, 0.0], rel=1e-6)
    assert _flat(ret) == pytest.approx([0.61425, 0.765, 1.0, 1.325, 2.0, 0.0], rel=1e-6)


def test_gae_lambda_limits():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[1.0, 1.0, 1.0]])
    mask = torch.ones(1, 3)
    # lam = 1, gamma = 1: Monte-Carlo. Rewards-to-go [1+2+3, 2+3, 3] = [6, 5, 3]; A = [6-1, 5-1, 3-1]
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert _flat(adv) == [5.0, 4.0, 2.0]
    assert _flat(ret) == [6.0, 5.0, 3.0]
    # lam = 0: one-step TD errors. delta2 = 3 - 1 = 2; delta1 = 2 + 1 - 1 = 2; delta0 = 1 + 1 - 1 = 1
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.0)
    assert _flat(adv) == [1.0, 2.0, 2.0]
    assert _flat(ret) == [2.0, 3.0, 3.0]


def test_gae_empty_row_and_detached_outputs():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    rewards = torch.tensor([[1.0, 1.0], [5.0, 5.0]], requires_grad=True)
    # row 0: one token, gamma = 1: A0 = 1 + 0 - 1 = 0, return 1; row 1: no token at all: zeros
    adv, ret = compute_gae(rewards, values, torch.tensor([[1, 0], [0, 0]]), gamma=1.0, lam=0.95)
    assert _flat(adv) == [0.0, 0.0, 0.0, 0.0]
    assert _flat(ret) == [1.0, 0.0, 0.0, 0.0]
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_errors():
    x = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    with pytest.raises(ValueError, match="gamma"):
        compute_gae(x, x, mask, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        compute_gae(x, x, mask, lam=-0.1)
    with pytest.raises(ValueError, match="same shape"):
        compute_gae(x, torch.zeros(1, 4), mask)
    with pytest.raises(ValueError, match="mask must have shape"):
        compute_gae(x, x, torch.ones(1, 4))
    with pytest.raises(ValueError, match="right-padded"):
        compute_gae(x, x, torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        compute_gae(torch.zeros(3), torch.zeros(3), torch.ones(3))


# KL-penalised rewards. Two rows; row 1 has two tokens and a nan log-prob on its padded position.
SCORES = torch.tensor([1.0, -2.0])
LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, float("nan")]])
REF = torch.tensor([[-1.0, -1.0, -1.5], [-2.0, -1.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_kl_penalized_rewards_k1():
    # k1 = logps - ref: row 0 [0, -1, 1]; row 1 [1, 0, (padding)]
    # -0.1 * k1:        row 0 [0, 0.1, -0.1]; row 1 [-0.1, 0, 0]
    # score on the last valid token: row 0 t=2: -0.1 + 1 = 0.9; row 1 t=1: 0 - 2 = -2
    rewards = kl_penalized_rewards(SCORES, LOGPS, REF, MASK, kl_coef=0.1)
    assert _flat(rewards) == pytest.approx([0.0, 0.1, 0.9, -0.1, -2.0, 0.0], rel=1e-6)


def test_kl_penalized_rewards_k3():
    # d = ref - logps: row 0 [0, 1, -1]; row 1 [-1, 0, (padding)]
    # k3 = exp(d) - d - 1: row 0 [0, e - 2, e^-1] = [0, 0.718281828, 0.367879441]; row 1 [0.367879441, 0]
    # -0.1 * k3 + score: row 0 [0, -0.0718281828, -0.0367879441 + 1 = 0.9632120559]
    #                    row 1 [-0.0367879441, 0 - 2 = -2, 0]
    rewards = kl_penalized_rewards(SCORES, LOGPS, REF, MASK, kl_coef=0.1, estimator="k3")
    expected = [0.0, -0.0718281828, 0.9632120559, -0.0367879441, -2.0, 0.0]
    assert _flat(rewards) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_kl_penalized_rewards_feed_gae():
    # kl_coef = 0: the rewards are the scores on the last token; gamma = lam = 1, values 0:
    # every token's advantage is its row's score: row 0 [1, 1, 1], row 1 [-2, -2, 0]
    logps = LOGPS.clone().requires_grad_(True)
    rewards = kl_penalized_rewards(SCORES, logps, REF, MASK, kl_coef=0.0)
    assert not rewards.requires_grad
    adv, _ = compute_gae(rewards, torch.zeros(2, 3), MASK, gamma=1.0, lam=1.0)
    assert _flat(adv) == [1.0, 1.0, 1.0, -2.0, -2.0, 0.0]


def test_kl_penalized_rewards_errors():
    with pytest.raises(ValueError, match="kl_coef"):
        kl_penalized_rewards(SCORES, LOGPS, REF, MASK, kl_coef=-0.1)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalized_rewards(SCORES, LOGPS, REF, MASK, kl_coef=0.1, estimator="k2")
    with pytest.raises(ValueError, match="scores"):
        kl_penalized_rewards(SCORES[:1], LOGPS, REF, MASK, kl_coef=0.1)
    with pytest.raises(ValueError, match="same shape"):
        kl_penalized_rewards(SCORES, LOGPS, REF[:, :2], MASK, kl_coef=0.1)
    with pytest.raises(ValueError, match="at least one"):
        kl_penalized_rewards(SCORES, LOGPS, REF, torch.tensor([[1, 1, 1], [0, 0, 0]]), kl_coef=0.1)
    with pytest.raises(ValueError, match="right-padded"):
        kl_penalized_rewards(SCORES, LOGPS, REF, torch.tensor([[1, 1, 1], [0, 1, 1]]), kl_coef=0.1)

"""Bradley-Terry reward-model loss against numbers worked out by hand."""

import pytest
import torch

from alignlab.losses.reward import bradley_terry_loss

# Three pairs; score gaps r_w - r_l = [1, 0, -2].
CHOSEN = torch.tensor([2.0, 0.0, 1.0])
REJECTED = torch.tensor([1.0, 0.0, 3.0])
# -log sigmoid(g) = log(1 + e^-g):
#   g = 1:  log(1 + 0.3678794) = 0.3132617
#   g = 0:  log 2 = 0.6931472
#   g = -2: log(1 + 7.3890561) = log 8.3890561 = 2.1269280
#   g = -1: log(1 + 2.7182818) = 1.3132617
#   g = -3: log(1 + 20.0855369) = log 21.0855369 = 3.0485874


def test_plain_loss_and_metrics():
    loss, metrics = bradley_terry_loss(CHOSEN, REJECTED)
    assert loss.tolist() == pytest.approx([0.31326168751822286, 0.6931471805599453, 2.1269280110429727], rel=1e-6)
    # accuracy counts strictly positive gaps: the tie (pair 1) is wrong
    assert metrics["accuracy"].tolist() == [1.0, 0.0, 0.0]
    assert metrics["margin"].tolist() == [1.0, 0.0, -2.0]
    assert metrics["rewards/chosen"].tolist() == [2.0, 0.0, 1.0]
    assert metrics["rewards/rejected"].tolist() == [1.0, 0.0, 3.0]


def test_margin_number_and_tensor():
    # margin 1: g - 1 = [0, -1, -3] -> [log 2, 1.3132617, 3.0485874]
    loss, metrics = bradley_terry_loss(CHOSEN, REJECTED, margin=1.0)
    assert loss.tolist() == pytest.approx([0.6931471805599453, 1.3132616875182228, 3.048587351573742], rel=1e-6)
    # the margin changes neither the accuracy nor the logged score gap
    assert metrics["accuracy"].tolist() == [1.0, 0.0, 0.0]
    assert metrics["margin"].tolist() == [1.0, 0.0, -2.0]
    # per-pair margins [0, 1, 0]: g - m = [1, -1, -2] -> [0.3132617, 1.3132617, 2.1269280]
    loss, _ = bradley_terry_loss(CHOSEN, REJECTED, margin=torch.tensor([0.0, 1.0, 0.0]))
    assert loss.tolist() == pytest.approx([0.31326168751822286, 1.3132616875182228, 2.1269280110429727], rel=1e-6)


def test_center_rewards():
    # c = 0.01, (r_w + r_l)^2 = [3^2, 0^2, 4^2] = [9, 0, 16] -> + [0.09, 0, 0.16]
    # [0.3132617 + 0.09, 0.6931472, 2.1269280 + 0.16] = [0.4032617, 0.6931472, 2.2869280]
    loss, _ = bradley_terry_loss(CHOSEN, REJECTED, center_rewards_coefficient=0.01)
    assert loss.tolist() == pytest.approx([0.40326168751822286, 0.6931471805599453, 2.2869280110429727], rel=1e-6)


def test_gradients():
    chosen = torch.tensor([1.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    loss, metrics = bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.1)
    loss.sum().backward()
    # d/dr_w of -log sigmoid(r_w - r_l) = -sigmoid(-(r_w - r_l)) = -sigmoid(-1) = -1 / (1 + e) = -0.2689414
    # d/d(r_w or r_l) of c (r_w + r_l)^2 = 2 c (r_w + r_l) = 2 * 0.1 * 1 = 0.2
    # chosen: -0.2689414 + 0.2 = -0.0689414; rejected: +0.2689414 + 0.2 = 0.4689414
    assert chosen.grad.item() == pytest.approx(-0.06894142136999512, rel=1e-6)
    assert rejected.grad.item() == pytest.approx(0.4689414213699951, rel=1e-6)
    assert not any(m.requires_grad for m in metrics.values())


def test_errors():
    with pytest.raises(ValueError, match=r"\(B,\)"):
        bradley_terry_loss(CHOSEN, REJECTED[:2])
    with pytest.raises(ValueError, match=r"\(B,\)"):
        bradley_terry_loss(CHOSEN.view(3, 1), REJECTED.view(3, 1))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(CHOSEN, REJECTED, margin=torch.ones(2))
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        bradley_terry_loss(CHOSEN, REJECTED, center_rewards_coefficient=-0.01)

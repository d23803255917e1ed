"""DPO losses against numbers worked out by hand."""

import math

import pytest
import torch

from alignlab.losses.dpo import dpo_loss, dpo_metrics, hinge_loss, ipo_loss, robust_loss, sigmoid_loss

# Shared inputs: log-ratios (policy minus reference log-probs, nats) of two pairs.
CHOSEN = torch.tensor([1.0, 0.0])
REJECTED = torch.tensor([-1.0, 0.0])
# h = chosen - rejected = [2, 0]; with beta = 0.5, beta * h = [1, 0].


def test_sigmoid_matches_hand_values():
    # pair 0: -log sigmoid(1) = log(1 + e^-1) = 0.313261687518...
    # pair 1: -log sigmoid(0) = log 2 = 0.693147180559...
    loss = sigmoid_loss(CHOSEN, REJECTED, beta=0.5)
    assert loss.tolist() == pytest.approx([0.31326168751822286, 0.6931471805599453], rel=1e-6)


def test_sigmoid_label_smoothing_is_conservative_dpo():
    # e = 0.1, pair 0: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1)
    #   = 0.9 * 0.3132616875 + 0.1 * 1.3132616875 = 0.2819355188 + 0.1313261688 = 0.4132616875
    # pair 1: both terms are log 2.
    loss = sigmoid_loss(CHOSEN, REJECTED, beta=0.5, label_smoothing=0.1)
    assert loss.tolist() == pytest.approx([0.4132616875182229, math.log(2)], rel=1e-6)


def test_robust_is_unbiased_flip_correction():
    # e = 0.1, pair 0: (0.9 * 0.3132616875 - 0.1 * 1.3132616875) / 0.8 = 0.1506093500 / 0.8 = 0.1882616875
    # pair 1: (0.9 - 0.1) * log 2 / 0.8 = log 2
    loss = robust_loss(CHOSEN, REJECTED, beta=0.5, label_smoothing=0.1)
    assert loss.tolist() == pytest.approx([0.18826168751822286, math.log(2)], rel=1e-6)
    # With no flips, robust DPO is DPO.
    assert torch.allclose(robust_loss(CHOSEN, REJECTED, beta=0.5), sigmoid_loss(CHOSEN, REJECTED, beta=0.5))


def test_hinge():
    # beta * h = [1, 0, -1] -> relu(1 - [1, 0, -1]) = [0, 1, 2]
    loss = hinge_loss(torch.tensor([1.0, 0.0, -1.0]), torch.tensor([-1.0, 0.0, 1.0]), beta=0.5)
    assert loss.tolist() == [0.0, 1.0, 2.0]


def test_ipo_uses_length_averaged_logratios():
    # chosen 4 nats over 2 tokens = 2 per token; rejected -2 nats over 4 tokens = -0.5 per token
    # h = 2.5; 1 / (2 * beta) = 1 for beta = 0.5; (2.5 - 1)^2 = 2.25
    loss = ipo_loss(
        torch.tensor([4.0]),
        torch.tensor([-2.0]),
        beta=0.5,
        chosen_lengths=torch.tensor([2.0]),
        rejected_lengths=torch.tensor([4.0]),
    )
    assert loss.tolist() == pytest.approx([2.25])


def test_dispatch_and_errors():
    assert torch.allclose(dpo_loss("sigmoid", CHOSEN, REJECTED, beta=0.5), sigmoid_loss(CHOSEN, REJECTED, beta=0.5))
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss("nope", CHOSEN, REJECTED, beta=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss("hinge", CHOSEN, REJECTED, beta=0.5, label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        sigmoid_loss(CHOSEN, REJECTED, beta=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_loss(CHOSEN, REJECTED, beta=0.1, label_smoothing=0.5)


def test_metrics_count_only_strictly_positive_margins():
    # rewards: chosen 0.5 * [1, 0, 2] = [0.5, 0, 1]; rejected 0.5 * [-1, 0, 3] = [-0.5, 0, 1.5]
    # margins [1, 0, -0.5]; accuracies [1, 0 (tie), 0]
    m = dpo_metrics(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([-1.0, 0.0, 3.0]), beta=0.5)
    assert m["rewards/chosen"].tolist() == [0.5, 0.0, 1.0]
    assert m["rewards/rejected"].tolist() == [-0.5, 0.0, 1.5]
    assert m["rewards/margins"].tolist() == [1.0, 0.0, -0.5]
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0, 0.0]


def test_gradient_pushes_chosen_up():
    chosen = torch.zeros(1, requires_grad=True)
    rejected = torch.zeros(1, requires_grad=True)
    sigmoid_loss(chosen, rejected, beta=0.1).sum().backward()
    # d/dc of -log sigmoid(beta (c - r)) at 0 = -beta * sigmoid(0) = -0.05
    assert chosen.grad.item() == pytest.approx(-0.05)
    assert rejected.grad.item() == pytest.approx(0.05)

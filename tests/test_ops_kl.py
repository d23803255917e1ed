"""Per-token KL estimators against numbers worked out by hand."""

import math

import pytest
import torch

from alignlab.ops.kl import KL_ESTIMATORS, kl_k1, kl_k3

# Shared inputs, one row of three tokens (nats).
LOGPS = torch.tensor([[-1.0, -2.0, -0.5]])
REF = torch.tensor([[-1.0, -1.0, -1.5]])
# d = ref - logps = [0, 1, -1]


def test_k1():
    # logps - ref = [-1 - -1, -2 - -1, -0.5 - -1.5] = [0, -1, 1]: negative where the reference is likelier
    assert kl_k1(LOGPS, REF).tolist() == [[0.0, -1.0, 1.0]]


def test_k3():
    # exp(d) - d - 1 with d = [0, 1, -1]:
    #   d = 0:  1 - 0 - 1 = 0
    #   d = 1:  e - 1 - 1 = 2.718281828 - 2 = 0.718281828
    #   d = -1: e^-1 + 1 - 1 = 0.367879441
    assert kl_k3(LOGPS, REF).tolist()[0] == pytest.approx([0.0, 0.718281828459045, 0.36787944117144233], rel=1e-6)


def test_k3_is_accurate_near_zero():
    # d = 1e-6: k3 = d^2 / 2 + d^3 / 6 + ... = 5.000001667e-13. The naive exp(d) - d - 1 in float64 loses
    # ~2.2e-16 / 5e-13 ~ 4e-4 of relative accuracy to cancellation; expm1(d) - d keeps ~1e-10.
    logps = torch.zeros(1, 1, dtype=torch.float64)
    ref = torch.full((1, 1), 1e-6, dtype=torch.float64)
    assert kl_k3(logps, ref).item() == pytest.approx(5.000001666666667e-13, rel=1e-8, abs=0)


def test_gradients():
    logps = LOGPS.clone().requires_grad_(True)
    ref = REF.clone().requires_grad_(True)
    kl_k3(logps, ref).sum().backward()
    # d k3 / d logps = 1 - exp(d) = [0, 1 - e, 1 - e^-1] = [0, -1.718281828, 0.632120559]
    assert logps.grad.tolist()[0] == pytest.approx([0.0, -1.718281828459045, 0.6321205588285577], rel=1e-6)
    # d k3 / d ref = exp(d) - 1 = the negative
    assert ref.grad.tolist()[0] == pytest.approx([0.0, 1.718281828459045, -0.6321205588285577], rel=1e-6)
    logps.grad = None
    kl_k1(logps, ref).sum().backward()
    assert logps.grad.tolist() == [[1.0, 1.0, 1.0]]


def test_registry_and_errors():
    assert KL_ESTIMATORS == {"k1": kl_k1, "k3": kl_k3}
    with pytest.raises(ValueError, match="same shape"):
        kl_k1(LOGPS, REF[:, :2])
    with pytest.raises(ValueError, match="same shape"):
        kl_k3(LOGPS, REF.T)


def test_k3_is_never_negative():
    # exp(d) >= 1 + d for every d, so k3 >= 0, while k1 = -d is negative for d > 0
    d = torch.tensor([[-5.0, -0.1, 0.0, 0.1, 5.0]])
    assert (kl_k3(torch.zeros_like(d), d) >= 0).all()
    assert (kl_k1(torch.zeros_like(d), d) < 0).sum().item() == 2
    # d = 5: e^5 - 5 - 1 = 148.413159 - 6 = 142.413159
    assert kl_k3(torch.zeros(1, 1), torch.full((1, 1), 5.0)).item() == pytest.approx(math.exp(5) - 6, rel=1e-6)

"""Masked reductions against numbers worked out by hand."""

import math

import pytest
import torch

from alignlab.ops.masked import masked_mean, masked_sum, masked_var, masked_whiten

# Shared inputs: the mask selects 1, 3 (row 0) and 8 (row 1); 7, 2 and 5 are masked out.
VALUES = torch.tensor([[1.0, 3.0, 7.0], [8.0, 2.0, 5.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
# Selected: 1, 3, 8. Sum 12, count 3, mean 4.
# Deviations -3, -1, 4; squares 9 + 1 + 16 = 26; biased var 26 / 3 = 8.666..., unbiased 26 / 2 = 13.


def test_masked_sum():
    assert masked_sum(VALUES, MASK).item() == 12.0
    # dim=1: row 0: 1 + 3 = 4; row 1: 8
    assert masked_sum(VALUES, MASK, dim=1).tolist() == [4.0, 8.0]
    # dim=0: columns 1 + 8 = 9, 3, nothing = 0 (an empty sum is 0, no error)
    assert masked_sum(VALUES, MASK, dim=0).tolist() == [9.0, 3.0, 0.0]


def test_masked_mean():
    assert masked_mean(VALUES, MASK).item() == pytest.approx(4.0)
    # dim=1: row 0: (1 + 3) / 2 = 2; row 1: 8 / 1 = 8
    assert masked_mean(VALUES, MASK, dim=1).tolist() == pytest.approx([2.0, 8.0])
    # a bool mask and a float 0/1 mask select the same entries
    assert masked_mean(VALUES, MASK.bool()).item() == pytest.approx(4.0)
    assert masked_mean(VALUES, MASK.float()).item() == pytest.approx(4.0)


def test_masked_var_biased_and_unbiased():
    assert masked_var(VALUES, MASK).item() == pytest.approx(13.0)
    assert masked_var(VALUES, MASK, unbiased=False).item() == pytest.approx(26 / 3)
    # one selected element: the biased variance is 0, the unbiased one is undefined (raises)
    one = torch.tensor([[1, 0, 0], [0, 0, 0]])
    assert masked_var(VALUES, one, unbiased=False).item() == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(VALUES, one)


def test_masked_whiten_hand_values():
    # (x - 4) / sqrt(13 + 1e-8), sqrt(13) = 3.605551275...
    # selected: -3 / 3.6055513 = -0.8320503, -1 / 3.6055513 = -0.2773501, 4 / 3.6055513 = 1.1094004
    # masked-out entries are transformed too (as TRL): 7 -> 0.8320503, 2 -> -0.5547002, 5 -> 0.2773501
    s = math.sqrt(13)
    out = masked_whiten(VALUES, MASK)
    expected = [[-3 / s, -1 / s, 3 / s], [4 / s, -2 / s, 1 / s]]
    assert out.tolist()[0] == pytest.approx(expected[0], rel=1e-6)
    assert out.tolist()[1] == pytest.approx(expected[1], rel=1e-6)
    assert [-3 / s, -1 / s, 4 / s] == pytest.approx([-0.8320503, -0.2773501, 1.1094004], rel=1e-6)
    # the selected entries come out with mean 0 and unbiased variance 1
    assert masked_mean(out, MASK).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(out, MASK).item() == pytest.approx(1.0, rel=1e-6)


def test_masked_whiten_keep_mean():
    # shift_mean=False adds the mean 4 back: -0.8320503 + 4 = 3.1679497, -0.2773501 + 4 = 3.7226499, 5.1094004
    out = masked_whiten(VALUES, MASK, shift_mean=False)
    assert [out[0, 0].item(), out[0, 1].item(), out[1, 0].item()] == pytest.approx(
        [3.1679497, 3.7226499, 5.1094004], rel=1e-6
    )


def test_masked_out_inf_and_nan_do_not_leak():
    values = torch.tensor([[1.0, 3.0, float("inf")], [8.0, float("nan"), float("-inf")]], requires_grad=True)
    mean = masked_mean(values, MASK)
    assert mean.item() == pytest.approx(4.0)
    mean.backward()
    # d mean / d x = 1 / 3 on the 3 selected entries, exactly 0 (not nan) on the others
    assert values.grad.flatten().tolist() == pytest.approx([1 / 3, 1 / 3, 0.0, 1 / 3, 0.0, 0.0])
    assert masked_var(values.detach(), MASK).item() == pytest.approx(13.0)


def test_errors():
    with pytest.raises(ValueError, match="same shape"):
        masked_sum(VALUES, MASK[:, :2])
    with pytest.raises(ValueError, match="same shape"):
        masked_mean(VALUES, MASK.unsqueeze(0))
    empty = torch.zeros_like(MASK)
    with pytest.raises(ValueError, match="selects no element"):
        masked_mean(VALUES, empty)
    with pytest.raises(ValueError, match="selects no element"):
        masked_var(VALUES, empty, unbiased=False)
    with pytest.raises(ValueError, match="selects no element"):
        masked_whiten(VALUES, empty)
    # along dim 0 the third column selects nothing
    with pytest.raises(ValueError, match="dim 0"):
        masked_mean(VALUES, MASK, dim=0)

"""PPO-clip policy and value losses, and GRPO token aggregation, against numbers worked out by hand."""

import math

import pytest
import torch

from alignlab.losses.ppo import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    aggregate_token_loss,
    cispo_policy_loss,
    clipped_policy_loss,
    clipped_value_loss,
    get_policy_loss,
    importance_weights,
    policy_loss_kwargs,
    sapo_policy_loss,
)


def _flat(t):
    return t.flatten().tolist()


# Policy loss inputs: two rows, ratios [1, 1.5, 0.5] in each; advantages +1 on row 0, -1 on row 1.
OLD = torch.zeros(2, 3)
LOGPS = torch.tensor([[0.0, math.log(1.5), math.log(0.5)]] * 2)
ADV = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
MASK = torch.ones(2, 3)
# eps = 0.2, clip range [0.8, 1.2]. loss = max(-A * ratio, -A * clip(ratio)):
# row 0 (A = +1): ratio 1   -> max(-1,   -1)   = -1
#                 ratio 1.5 -> max(-1.5, -1.2) = -1.2  clipped branch (moved past 1.2 in the favoured direction)
#                 ratio 0.5 -> max(-0.5, -0.8) = -0.5  unclipped (moved the unfavoured way: never clipped)
# row 1 (A = -1): ratio 1   -> max(1,   1)     = 1
#                 ratio 1.5 -> max(1.5, 1.2)   = 1.5   unclipped
#                 ratio 0.5 -> max(0.5, 0.8)   = 0.8   clipped branch
# clipfrac = 2 clipped / 6 tokens = 1/3
# approxkl = 0.5 * mean(log_ratio^2): per row 0 + ln(1.5)^2 + ln(0.5)^2 = 0.1644020 + 0.4804530 = 0.6448550
#            two rows 1.2897099 / 6 = 0.2149517; * 0.5 = 0.1074758
EXPECTED_LOSS = [-1.0, -1.2, -0.5, 1.0, 1.5, 0.8]


def test_policy_loss_hand_values():
    loss, metrics = clipped_policy_loss(LOGPS, OLD, ADV, MASK, cliprange=0.2)
    assert _flat(loss) == pytest.approx(EXPECTED_LOSS, rel=1e-6)
    assert metrics["policy/clipfrac"].item() == pytest.approx(1 / 3)
    assert metrics["policy/approxkl"].item() == pytest.approx(0.1074758, rel=1e-5)


def test_policy_loss_gradient_is_zero_on_clipped_tokens():
    logps = LOGPS.clone().requires_grad_(True)
    loss, metrics = clipped_policy_loss(logps, OLD, ADV, MASK)
    loss.sum().backward()
    # d/dlogps of -A * ratio = -A * ratio (d ratio / d logps = ratio); 0 where the clipped branch wins:
    # row 0: [-1 * 1, 0 (clipped), -1 * 0.5] = [-1, 0, -0.5]
    # row 1: [ 1 * 1, 1 * 1.5, 0 (clipped)]  = [ 1, 1.5, 0]
    assert _flat(logps.grad) == pytest.approx([-1.0, 0.0, -0.5, 1.0, 1.5, 0.0], rel=1e-6)
    assert not metrics["policy/clipfrac"].requires_grad and not metrics["policy/approxkl"].requires_grad


def test_policy_loss_per_sequence_advantages_broadcast():
    # GRPO: one advantage per completion, (B,), is the same as repeating it over the tokens
    loss, _ = clipped_policy_loss(LOGPS, OLD, torch.tensor([1.0, -1.0]), MASK)
    assert _flat(loss) == pytest.approx(EXPECTED_LOSS, rel=1e-6)


def test_policy_loss_clip_higher():
    # eps_low 0.2, eps_high 0.6: range [0.8, 1.6]. Row 0's ratio 1.5 is now inside: max(-1.5, -1.5) = -1.5.
    # Row 1's ratio 0.5 is still below 0.8: 0.8. Clipped tokens: 1 of 6.
    loss, metrics = clipped_policy_loss(LOGPS, OLD, ADV, MASK, cliprange=0.2, cliprange_high=0.6)
    assert _flat(loss) == pytest.approx([-1.0, -1.5, -0.5, 1.0, 1.5, 0.8], rel=1e-6)
    assert metrics["policy/clipfrac"].item() == pytest.approx(1 / 6)


def test_policy_loss_ignores_masked_tokens():
    # Row 1's last token is padding with nan log-probs and advantage: loss 0, gradient 0 (not nan),
    # and the metrics average over the 5 remaining tokens:
    # clipfrac: only row 0's ratio-1.5 token -> 1/5
    # approxkl: 0.5 * (0.6448550 + ln(1.5)^2 = 0.1644020) / 5 = 0.5 * 0.8092570 / 5 = 0.0809257
    logps = LOGPS.clone()
    logps[1, 2] = float("nan")
    logps.requires_grad_(True)
    adv = ADV.clone()
    adv[1, 2] = float("nan")
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, metrics = clipped_policy_loss(logps, OLD, adv, mask)
    assert _flat(loss) == pytest.approx([-1.0, -1.2, -0.5, 1.0, 1.5, 0.0], rel=1e-6)
    loss.sum().backward()
    assert _flat(logps.grad) == pytest.approx([-1.0, 0.0, -0.5, 1.0, 1.5, 0.0], rel=1e-6)
    assert metrics["policy/clipfrac"].item() == pytest.approx(1 / 5)
    assert metrics["policy/approxkl"].item() == pytest.approx(0.0809257, rel=1e-5)


def test_policy_loss_errors():
    with pytest.raises(ValueError, match="cliprange"):
        clipped_policy_loss(LOGPS, OLD, ADV, MASK, cliprange=0.0)
    with pytest.raises(ValueError, match="cliprange"):
        clipped_policy_loss(LOGPS, OLD, ADV, MASK, cliprange=1.0)
    with pytest.raises(ValueError, match="cliprange_high"):
        clipped_policy_loss(LOGPS, OLD, ADV, MASK, cliprange_high=-0.1)
    with pytest.raises(ValueError, match="advantages"):
        clipped_policy_loss(LOGPS, OLD, torch.ones(2, 4), MASK)
    with pytest.raises(ValueError, match="old_logps"):
        clipped_policy_loss(LOGPS, OLD[:1], ADV, MASK)
    with pytest.raises(ValueError, match="mask"):
        clipped_policy_loss(LOGPS, OLD, ADV, MASK.T)


# Value loss inputs, one row; c = 0.2.
VALUES = torch.tensor([[1.0, 2.0, 2.0]])
OLD_VALUES = torch.tensor([[0.9, 1.5, 1.5]])
RETURNS = torch.tensor([[0.5, 3.0, 1.0]])
# t0: clip(1.0, 0.7, 1.1) = 1.0; (1.0 - 0.5)^2 = 0.25 both ways -> 0.5 * 0.25 = 0.125, not clipped
# t1: clip(2.0, 1.3, 1.7) = 1.7; unclipped (2 - 3)^2 = 1, clipped (1.7 - 3)^2 = 1.69 -> 0.5 * 1.69 = 0.845, clipped
# t2: clip(2.0, 1.3, 1.7) = 1.7; unclipped (2 - 1)^2 = 1, clipped (1.7 - 1)^2 = 0.49 -> 0.5 * 1 = 0.5, unclipped
# clipfrac = 1/3


def test_value_loss_hand_values_and_gradient():
    values = VALUES.clone().requires_grad_(True)
    loss, metrics = clipped_value_loss(values, OLD_VALUES, RETURNS, torch.ones(1, 3), cliprange_value=0.2)
    assert _flat(loss) == pytest.approx([0.125, 0.845, 0.5], rel=1e-6)
    assert metrics["val/clipfrac"].item() == pytest.approx(1 / 3)
    loss.sum().backward()
    # d/dv 0.5 (v - R)^2 = v - R where the unclipped branch wins: t0 1.0 - 0.5 = 0.5, t2 2 - 1 = 1;
    # t1 takes the clipped prediction, which is constant in v outside the range: 0
    assert _flat(values.grad) == pytest.approx([0.5, 0.0, 1.0], rel=1e-6)


def test_value_loss_mask_and_errors():
    values = torch.tensor([[1.0, 2.0, float("nan")]], requires_grad=True)
    loss, metrics = clipped_value_loss(values, OLD_VALUES, RETURNS, torch.tensor([[1, 1, 0]]))
    # t2 is padding: 0; clipfrac over 2 tokens: 1/2
    assert _flat(loss) == pytest.approx([0.125, 0.845, 0.0], rel=1e-6)
    assert metrics["val/clipfrac"].item() == pytest.approx(0.5)
    loss.sum().backward()
    assert _flat(values.grad) == pytest.approx([0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="cliprange_value"):
        clipped_value_loss(VALUES, OLD_VALUES, RETURNS, torch.ones(1, 3), cliprange_value=0.0)
    with pytest.raises(ValueError, match="returns"):
        clipped_value_loss(VALUES, OLD_VALUES, RETURNS[:, :2], torch.ones(1, 3))


# Aggregation inputs: row 0 has 3 tokens, row 1 has 1; masked positions hold junk (100).
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 100.0], [5.0, 100.0, 100.0, 100.0]])
AGG_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
# masked sum S = 1 + 2 + 3 + 5 = 11 over 4 tokens, B = 2


def test_aggregate_grpo_dapo_dr_grpo():
    # grpo: per-sequence means (1 + 2 + 3) / 3 = 2 and 5 / 1 = 5, then (2 + 5) / 2 = 3.5
    assert aggregate_token_loss(PER_TOKEN, AGG_MASK, loss_type="grpo").item() == pytest.approx(3.5)
    # dapo: 11 / 4 tokens = 2.75
    assert aggregate_token_loss(PER_TOKEN, AGG_MASK, loss_type="dapo").item() == pytest.approx(2.75)
    # dapo with TRL's global token count passed in: 11 / 22 = 0.5
    got = aggregate_token_loss(PER_TOKEN, AGG_MASK, loss_type="dapo", num_items_in_batch=22)
    assert got.item() == pytest.approx(0.5)
    # dr_grpo: 11 / (B * max_completion_length) = 11 / (2 * 5) = 1.1
    got = aggregate_token_loss(PER_TOKEN, AGG_MASK, loss_type="dr_grpo", max_completion_length=5)
    assert got.item() == pytest.approx(1.1)


def test_aggregate_grpo_counts_empty_sequences_as_zero():
    # a third, empty row: per-sequence means 2, 5, 0 -> 7 / 3 (TRL clamps the length at 1)
    per_token = torch.cat([PER_TOKEN, torch.full((1, 4), 100.0)])
    mask = torch.cat([AGG_MASK, torch.zeros(1, 4, dtype=AGG_MASK.dtype)])
    assert aggregate_token_loss(per_token, mask, loss_type="grpo").item() == pytest.approx(7 / 3)


def test_aggregate_gradients_weight_tokens():
    # grpo weighs token t of sequence i by 1 / (B |o_i|): row 0 1 / (2 * 3) = 1/6, row 1 1 / (2 * 1) = 1/2
    # dapo weighs every token 1 / 4; dr_grpo 1 / (2 * 5) = 1/10; padding gets 0 in all three
    cases = {
        "grpo": [1 / 6, 1 / 6, 1 / 6, 0.0, 1 / 2, 0.0, 0.0, 0.0],
        "dapo": [1 / 4, 1 / 4, 1 / 4, 0.0, 1 / 4, 0.0, 0.0, 0.0],
        "dr_grpo": [1 / 10, 1 / 10, 1 / 10, 0.0, 1 / 10, 0.0, 0.0, 0.0],
    }
    for loss_type, expected in cases.items():
        per_token = PER_TOKEN.clone().requires_grad_(True)
        aggregate_token_loss(per_token, AGG_MASK, loss_type=loss_type, max_completion_length=5).backward()
        assert _flat(per_token.grad) == pytest.approx(expected), loss_type


def test_aggregate_errors():
    with pytest.raises(ValueError, match="unknown loss_type"):
        aggregate_token_loss(PER_TOKEN, AGG_MASK, loss_type="token_mean")
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_token_loss(PER_TOKEN, AGG_MASK, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="more than max_completion_length"):
        aggregate_token_loss(PER_TOKEN, AGG_MASK, loss_type="dr_grpo", max_completion_length=3)
    with pytest.raises(ValueError, match="mask"):
        aggregate_token_loss(PER_TOKEN, AGG_MASK[:, :3], loss_type="grpo")


# ---- importance sampling of rollouts drawn by a stand-in sampler (bf16 copy), numbers by hand ----------------
def _is_inputs():
    import math as _m

    # row 0: token ratios pi/q = 0.5/0.25 = 2 and 0.2/0.4 = 0.5 (sequence ratio 1), third token padding
    # row 1: token ratios 0.9/0.3 = 3 and 3 (sequence ratio 9), third token padding
    old = torch.tensor([[_m.log(0.5), _m.log(0.2), 0.0], [_m.log(0.9), _m.log(0.9), float("nan")]])
    sampling = torch.tensor([[_m.log(0.25), _m.log(0.4), 5.0], [_m.log(0.3), _m.log(0.3), 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    return old, sampling, mask


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token_truncate", [[1.5, 0.5, 0.0], [1.5, 1.5, 0.0]]),
        ("token_mask", [[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]]),
        ("sequence_truncate", [[1.0, 1.0, 0.0], [1.5, 1.5, 0.0]]),
        ("sequence_mask", [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
    ],
)
def test_importance_sampling_ratio_by_hand(mode, expected):
    from alignlab.losses.ppo import importance_sampling_ratio

    old, sampling, mask = _is_inputs()
    weights, metrics = importance_sampling_ratio(old, sampling, mask, mode=mode, clip_max=1.5)
    torch.testing.assert_close(weights, torch.tensor(expected), atol=1e-6, rtol=0)
    # |log 2|, |log 0.5|, |log 3|, |log 3| over the four real tokens
    assert float(metrics["sampling/sampling_logp_difference/mean"]) == pytest.approx(
        (2 * math.log(2) + 2 * math.log(3)) / 4, abs=1e-6)
    assert float(metrics["sampling/sampling_logp_difference/max"]) == pytest.approx(math.log(3), abs=1e-6)


def test_importance_sampling_ratio_bounds_and_metrics():
    from alignlab.losses.ppo import importance_sampling_ratio

    old, sampling, mask = _is_inputs()
    weights, metrics = importance_sampling_ratio(old, sampling, mask, clip_max=None, clip_min=0.6)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.6, 0.0], [3.0, 3.0, 0.0]]), atol=1e-6, rtol=0)
    assert float(metrics["sampling/importance_sampling_ratio/min"]) == pytest.approx(0.6)
    assert float(metrics["sampling/importance_sampling_ratio/mean"]) == pytest.approx((2 + 0.6 + 3 + 3) / 4)
    assert float(metrics["sampling/importance_sampling_ratio/max"]) == pytest.approx(3.0)
    unbounded, _ = importance_sampling_ratio(old, sampling, mask, clip_max=None)
    torch.testing.assert_close(unbounded, torch.tensor([[2.0, 0.5, 0.0], [3.0, 3.0, 0.0]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="mode"):
        importance_sampling_ratio(old, sampling, mask, mode="token")
    with pytest.raises(ValueError, match="clip_min"):
        importance_sampling_ratio(old, sampling, mask, clip_min=2.0, clip_max=1.0)


# ---- GRPO loss variants (TRL 1.16 loss_type / importance_sampling_level), numbers by hand ---------------------
# Inputs are the policy-loss inputs above: ratios [1, 1.5, 0.5] per row, logps [0, ln 1.5, ln 0.5]
# = [0, 0.4054651, -0.6931472], advantages +1 on row 0 and -1 on row 1.


def test_aggregate_bnpo_cispo_sapo():
    # bnpo: local token mean 11 / 4 = 2.75, whatever num_items_in_batch says
    got = aggregate_token_loss(PER_TOKEN, AGG_MASK, loss_type="bnpo", num_items_in_batch=22)
    assert got.item() == pytest.approx(2.75)
    # cispo reduces as dapo: 11 / 22 = 0.5 with TRL's count passed, 11 / 4 without
    got = aggregate_token_loss(PER_TOKEN, AGG_MASK, loss_type="cispo", num_items_in_batch=22)
    assert got.item() == pytest.approx(0.5)
    assert aggregate_token_loss(PER_TOKEN, AGG_MASK, loss_type="cispo").item() == pytest.approx(2.75)
    # sapo reduces as grpo: (2 + 5) / 2 = 3.5
    assert aggregate_token_loss(PER_TOKEN, AGG_MASK, loss_type="sapo").item() == pytest.approx(3.5)


def test_policy_loss_delta_two_sided_clip():
    # delta 1.4 caps the unclipped ratio: row 1 (A = -1), ratio 1.5: max(1 * min(1.5, 1.4), 1 * 1.2) = 1.4, and
    # its gradient is now 0; row 0's ratio-1.5 token: max(-min(1.5, 1.4), -1.2) = -1.2 (clipped, as before)
    logps = LOGPS.clone().requires_grad_(True)
    loss, _ = clipped_policy_loss(logps, OLD, ADV, MASK, delta=1.4)
    assert _flat(loss) == pytest.approx([-1.0, -1.2, -0.5, 1.0, 1.4, 0.8], rel=1e-6)
    loss.sum().backward()
    assert _flat(logps.grad) == pytest.approx([-1.0, 0.0, -0.5, 1.0, 0.0, 0.0], rel=1e-6)
    with pytest.raises(ValueError, match="delta"):
        clipped_policy_loss(LOGPS, OLD, ADV, MASK, delta=0.0)


def test_policy_loss_sequence_level_gspo():
    # Row 0: mean log-ratio (0 + ln 1.5 + ln 0.5) / 3 = ln(0.75) / 3, s = 0.75^(1/3) = 0.9085603, in [0.8, 1.2].
    # Row 1, last token masked: mean (0 + ln 1.5) / 2, s = sqrt(1.5) = 1.2247449.
    # advantages (B,) = [-1, +1]:
    #   row 0: max(1 * 0.9085603, 1 * 0.9085603) = 0.9085603 on each of its 3 tokens
    #   row 1: max(-1.2247449, -1.2) = -1.2: clipped (moved past 1 + eps in the favoured direction), no gradient
    # gradient of the summed loss: row 0's 3 token losses -A s each, d s / d logps_t = s / 3, so each token gets
    # 3 * (1 * s / 3) = s = 0.9085603; row 1 gets 0. clipfrac counts sequences: 1 of 2.
    logps = LOGPS.clone()
    logps[1, 2] = float("nan")
    logps.requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    s0 = 0.75 ** (1 / 3)
    advantages = torch.tensor([-1.0, 1.0])
    loss, metrics = clipped_policy_loss(logps, OLD, advantages, mask, importance_sampling_level="sequence")
    assert _flat(loss) == pytest.approx([s0, s0, s0, -1.2, -1.2, 0.0], rel=1e-6)
    loss.sum().backward()
    assert _flat(logps.grad) == pytest.approx([s0, s0, s0, 0.0, 0.0, 0.0], rel=1e-6)
    assert metrics["policy/clipfrac"].item() == pytest.approx(0.5)
    # approxkl stays per token: 0.5 * (ln 1.5^2 + ln 0.5^2 + ln 1.5^2) / 5 = 0.0809257 (as the masked test above)
    assert metrics["policy/approxkl"].item() == pytest.approx(0.0809257, rel=1e-5)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        clipped_policy_loss(LOGPS, OLD, ADV, MASK, importance_sampling_level="sentence")


def test_cispo_hand_values_and_gradient():
    # epsilon_high 1.2: weights sg(min(ratio, 1.2)) = [1, 1.2, 0.5] in each row
    # loss = -w * A * logps:
    #   row 0 (A = +1): [-1 * 0, -1.2 * 0.4054651, -0.5 * -0.6931472] = [0, -0.4865581, 0.3465736]
    #   row 1 (A = -1): the negatives, [0, 0.4865581, -0.3465736]
    # gradient -w * A, every token keeps one (the weight is detached): row 0 [-1, -1.2, -0.5], row 1 [1, 1.2, 0.5]
    # clipfrac (TRL cispo_clip_ratio): ratio > 1.2 with A > 0: row 0's ratio-1.5 token, 1 of 6
    logps = LOGPS.clone().requires_grad_(True)
    loss, metrics = cispo_policy_loss(logps, OLD, ADV, MASK, epsilon_high=1.2)
    assert _flat(loss) == pytest.approx([0.0, -0.4865581, 0.3465736, 0.0, 0.4865581, -0.3465736], rel=1e-6)
    loss.sum().backward()
    assert _flat(logps.grad) == pytest.approx([-1.0, -1.2, -0.5, 1.0, 1.2, 0.5], rel=1e-6)
    assert metrics["policy/clipfrac"].item() == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="epsilon_high"):
        cispo_policy_loss(LOGPS, OLD, ADV, MASK, epsilon_high=0.0)


def test_sapo_hand_values_and_gradient():
    # tau_pos 1 (row 0, A = +1): f(r) = 4 sigmoid(r - 1); tau_neg 2 (row 1, A = -1): f(r) = 2 sigmoid(2 (r - 1))
    # row 0 loss -f: r = 1: -4 * 0.5 = -2; r = 1.5: -4 * 0.6224593 = -2.4898373; r = 0.5: -4 * 0.3775407 = -1.5101627
    # row 1 loss +f: r = 1: 2 * 0.5 = 1;   r = 1.5: 2 * 0.7310586 = 1.4621172;   r = 0.5: 2 * 0.2689414 = 0.5378828
    # gradient -A f'(r) r with f'(r) = 4 s (1 - s), s = sigmoid(tau (r - 1)):
    #   row 0: -[1 * 1, 0.9400148 * 1.5, 0.9400148 * 0.5] = [-1, -1.4100223, -0.4700074]
    #   row 1: +[1 * 1, 0.7864477 * 1.5, 0.7864477 * 0.5] = [1, 1.1796716, 0.3932239]
    logps = LOGPS.clone().requires_grad_(True)
    loss, metrics = sapo_policy_loss(logps, OLD, ADV, MASK, sapo_temperature_pos=1.0, sapo_temperature_neg=2.0)
    assert _flat(loss) == pytest.approx([-2.0, -2.4898373, -1.5101627, 1.0, 1.4621172, 0.5378828], rel=1e-6)
    loss.sum().backward()
    assert _flat(logps.grad) == pytest.approx([-1.0, -1.4100223, -0.4700074, 1.0, 1.1796716, 0.3932239], rel=1e-6)
    assert set(metrics) == {"policy/approxkl"}
    with pytest.raises(ValueError, match="temperatures"):
        sapo_policy_loss(LOGPS, OLD, ADV, MASK, sapo_temperature_neg=0.0)


def test_variants_ignore_masked_tokens():
    # nan in a masked position changes neither the losses nor the gradients of cispo and sapo
    logps = LOGPS.clone()
    logps[1, 2] = float("nan")
    logps.requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    for fn, kwargs in ((cispo_policy_loss, {"epsilon_high": 5.0}), (sapo_policy_loss, {})):
        loss, _ = fn(logps, OLD, ADV, mask, **kwargs)
        assert loss[1, 2].item() == 0.0 and torch.isfinite(loss).all()
        loss.sum().backward()
        assert logps.grad[1, 2].item() == 0.0 and torch.isfinite(logps.grad).all()
        logps.grad = None


def test_policy_loss_registry():
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        assert get_policy_loss(loss_type) is clipped_policy_loss
    assert get_policy_loss("cispo") is cispo_policy_loss and get_policy_loss("sapo") is sapo_policy_loss
    # every loss type that picks a per-token loss can also reduce it
    assert set(POLICY_LOSSES) == set(LOSS_AGGREGATIONS)
    with pytest.raises(ValueError, match="choose from"):
        get_policy_loss("ppo2")


def test_policy_loss_kwargs_come_from_the_declarations():
    # what GRPO passes for each loss_type (TRL's GRPOConfig names): the clipped loss's cliprange pair is TRL's
    # epsilon pair and delta (TRL's two-sided clipping, off unless set), cispo's bound is epsilon_high itself,
    # sapo's gate its two temperatures
    import dataclasses

    from alignlab.algorithms.grpo import GRPOConfig

    config = GRPOConfig(dataset_name="p.jsonl", output_dir="out", reward_funcs=["m:f"], epsilon=0.25,
                        epsilon_high=0.3, importance_sampling_level="sequence", sapo_temperature_pos=0.9,
                        sapo_temperature_neg=1.2)
    clipped = {"cliprange": 0.25, "cliprange_high": 0.3, "importance_sampling_level": "sequence", "delta": None}
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        assert policy_loss_kwargs(loss_type, config) == clipped
    assert policy_loss_kwargs("cispo", config) == {"epsilon_high": 0.3, "importance_sampling_level": "sequence"}
    assert policy_loss_kwargs("sapo", config) == {"sapo_temperature_pos": 0.9, "sapo_temperature_neg": 1.2,
                                                  "importance_sampling_level": "sequence"}
    # every field a policy loss declares is one GRPOConfig offers (the config that selects them)
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    for loss_type in POLICY_LOSSES:
        assert set(POLICY_LOSSES.fields(loss_type)) <= fields, loss_type
    with pytest.raises(ValueError, match="has no field 'epsilon'"):
        policy_loss_kwargs("grpo", object())


# ---- TRL 1.16 parity: GRPOTrainer._compute_loss itself, called on tensors -----------------------------------
def _trl_grpo_loss(logps, old_logps, advantages, mask, *, loss_type, level, epsilon, epsilon_high, delta,
                   temperature_pos, temperature_neg, num_items_in_batch, max_completion_length, beta=0.0,
                   ref_logps=None, use_bias_correction_kl=False):
    """TRL's loss and metrics for these tensors: ``GRPOTrainer._compute_loss`` on a stand-in trainer with one
    process, no accumulation, no entropy mask, no vLLM, whose model returns ``logps``; the KL term only with
    ``beta`` > 0 (against ``ref_logps``)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer

    rows, length = logps.shape
    accelerator = SimpleNamespace(num_processes=1, reduce=lambda x, reduction="sum": x, gather=lambda x: x)
    args = SimpleNamespace(delta=delta, sapo_temperature_pos=temperature_pos, sapo_temperature_neg=temperature_neg,
                           steps_per_generation=1, use_bias_correction_kl=use_bias_correction_kl)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon_high, args=args, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=accelerator, max_completion_length=max_completion_length,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(rows, 1, dtype=torch.long), "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.zeros(rows, length, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": advantages, "old_per_token_logps": old_logps,
        "num_items_in_batch": torch.tensor(float(num_items_in_batch)),
    }
    if beta:
        inputs["ref_per_token_logps"] = ref_logps
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {name: values[0] for name, values in trainer._metrics["train"].items()}


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
def test_grpo_loss_types_match_trl(loss_type, level):
    g = torch.Generator().manual_seed(7)
    rows, length = 6, 5
    # ratios spread over about [0.4, 2.5] so that every clip branch is taken; rows of 5, 3, 1, 4, 5, 2 tokens
    old = torch.randn(rows, length, generator=g) * 0.5 - 1.0
    current = (old + torch.randn(rows, length, generator=g) * 0.6).requires_grad_(True)
    mask = (torch.arange(length) < torch.tensor([5, 3, 1, 4, 5, 2]).unsqueeze(1)).long()
    advantages = torch.randn(rows, generator=g)
    hyper = {
        "epsilon": 0.2,
        "epsilon_high": 1.05 if loss_type == "cispo" else 0.28,  # cispo's is a bound on the weight itself
        "delta": 1.6 if loss_type in ("dr_grpo", "dapo") else None,  # two-sided clip on two of the clipped types
        "temperature_pos": 1.0,
        "temperature_neg": 1.05,
        "num_items_in_batch": 37,  # dapo / cispo: TRL's generation-batch token count, passed through
        "max_completion_length": 8,
    }
    trl_logps = current.detach().clone().requires_grad_(True)
    expected, trl_metrics = _trl_grpo_loss(trl_logps, old, advantages, mask, loss_type=loss_type, level=level, **hyper)
    expected.backward()

    if loss_type == "cispo":
        kwargs = {"epsilon_high": hyper["epsilon_high"]}
    elif loss_type == "sapo":
        kwargs = {"sapo_temperature_pos": hyper["temperature_pos"], "sapo_temperature_neg": hyper["temperature_neg"]}
    else:
        kwargs = {"cliprange": hyper["epsilon"], "cliprange_high": hyper["epsilon_high"], "delta": hyper["delta"]}
    per_token, metrics = get_policy_loss(loss_type)(current, old, advantages, mask, importance_sampling_level=level,
                                                    **kwargs)
    loss = aggregate_token_loss(per_token, mask, loss_type=loss_type, max_completion_length=8,
                                num_items_in_batch=hyper["num_items_in_batch"])
    loss.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(current.grad, trl_logps.grad, rtol=1e-5, atol=1e-7)
    assert current.grad.abs().sum() > 0
    if loss_type == "cispo":
        assert metrics["policy/clipfrac"].item() == pytest.approx(trl_metrics["cispo_clip_ratio"])
        assert 0 < trl_metrics["cispo_clip_ratio"] < 1
    elif loss_type in ("grpo", "bnpo"):  # TRL measures its clip metrics after the delta cap, so only without it
        assert metrics["policy/clipfrac"].item() == pytest.approx(trl_metrics["clip_ratio/region_mean"])
        assert 0 < trl_metrics["clip_ratio/region_mean"] < 1


def test_importance_weights_token_and_sequence_values_and_gradients():
    # one row: log-ratios ln 2 and 0 on the two real tokens, a masked third position holding garbage
    logps = torch.tensor([[math.log(2.0), 0.0, 5.0]])
    old, mask = torch.zeros(1, 3), torch.tensor([[1, 1, 0]])
    assert _flat(importance_weights(logps, old, mask)) == pytest.approx([2.0, 1.0, 1.0])
    # sequence level: exp(mean log-ratio over the 2 real tokens) = sqrt(2), on every position of the row
    assert _flat(importance_weights(logps, old, mask, importance_sampling_level="sequence")) == pytest.approx(
        [math.sqrt(2.0)] * 3)
    # on-policy the weight is 1 but has a gradient: d/dlogps sum(k * w * mask) = k (token level) or, per
    # sequence, the mean of k over its tokens on each real token; none on the masked position
    k = torch.tensor([[0.2, 0.4, 9.0]])
    for level, expected in (("token", [0.2, 0.4, 0.0]), ("sequence", [0.3, 0.3, 0.0])):
        current = logps.clone().requires_grad_(True)
        w = importance_weights(current, current.detach(), mask, importance_sampling_level=level)
        assert _flat(w.detach()) == pytest.approx([1.0, 1.0, 1.0])
        (k * w * mask).sum().backward()
        assert _flat(current.grad) == pytest.approx(expected)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        importance_weights(logps, old, mask, importance_sampling_level="tokens")


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_kl_term_matches_trl(level, bias_correction):
    # GRPOTrainer.compute_loss's KL term: + beta * k3, times the importance weight with use_bias_correction_kl
    # (TRL 1.16's default), against TRL's _compute_loss with the same beta, reference and old log-probs
    from alignlab.ops.kl import kl_k3
    from alignlab.ops.masked import masked_mean

    g = torch.Generator().manual_seed(3)
    rows, length, beta = 4, 5, 0.04
    old = torch.randn(rows, length, generator=g) * 0.5 - 1.0
    current = (old + torch.randn(rows, length, generator=g) * 0.3).requires_grad_(True)
    ref = old + torch.randn(rows, length, generator=g) * 0.4
    mask = (torch.arange(length) < torch.tensor([5, 2, 4, 3]).unsqueeze(1)).long()
    advantages = torch.randn(rows, generator=g)
    trl_logps = current.detach().clone().requires_grad_(True)
    expected, trl_metrics = _trl_grpo_loss(
        trl_logps, old, advantages, mask, loss_type="grpo", level=level, epsilon=0.2, epsilon_high=0.28, delta=None,
        temperature_pos=1.0, temperature_neg=1.05, num_items_in_batch=mask.sum(), max_completion_length=length,
        beta=beta, ref_logps=ref, use_bias_correction_kl=bias_correction)
    expected.backward()

    per_token, _ = clipped_policy_loss(current, old, advantages, mask, cliprange=0.2, cliprange_high=0.28,
                                       importance_sampling_level=level)
    kl = kl_k3(current, ref)
    if bias_correction:
        kl = kl * importance_weights(current, old, mask, importance_sampling_level=level)
    loss = aggregate_token_loss(per_token + beta * kl, mask, loss_type="grpo")
    loss.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(current.grad, trl_logps.grad, rtol=1e-5, atol=1e-7)
    assert masked_mean(kl.detach(), mask).item() == pytest.approx(trl_metrics["kl"], rel=1e-6)


def test_high_entropy_mask_keeps_the_top_quantile_hand_worked():
    from alignlab.losses.ppo import high_entropy_mask

    entropies = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.7, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # pool [0.1, 0.3, 0.5, 0.7, 0.9] (the padded 5.0 left out); quantile 0.6 at position 2.4: 0.5 + 0.4 * 0.2 = 0.58
    assert high_entropy_mask(entropies, mask, 0.4).tolist() == [[False, False, True], [False, True, False]]
    assert high_entropy_mask(entropies, mask, 0.0).tolist() == [[False, False, True], [False, False, False]]
    assert high_entropy_mask(entropies, mask, 1.0).tolist() == mask.bool().tolist()
    # a gathered pool (other processes' tokens) moves the threshold: pool max 2.0 keeps nothing here at rho 0
    assert not high_entropy_mask(entropies, mask, 0.0, pool=torch.tensor([0.1, 2.0])).any()
    with pytest.raises(ValueError):
        high_entropy_mask(entropies, mask, 1.5)


def test_off_policy_sequence_mask_drops_drifted_negative_sequences_hand_worked():
    from alignlab.losses.ppo import off_policy_sequence_mask

    logps = torch.tensor([[-3.0, -3.0], [-1.2, -1.4], [-2.0, -9.0]])
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.0, float("nan")]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]])
    adv = torch.tensor([1.0, -1.0, -1.0])
    # mean KL(old || new) per sequence: 2.0 (positive advantage: kept), 0.3 (<= 0.5: kept), 1.0 (dropped)
    assert off_policy_sequence_mask(adv, logps, old, mask, 0.5).tolist() == [[1.0], [1.0], [0.0]]
    assert off_policy_sequence_mask(adv, logps, old, mask, 1.0).tolist() == [[1.0], [1.0], [1.0]]


def test_entropy_bonus_hand_worked():
    from alignlab.losses.ppo import entropy_bonus

    entropies = torch.tensor([[1.0, 2.0, 9.0], [3.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    bonus = entropy_bonus(entropies, mask, 0.5)  # 0.5 * (1 + 2 + 3) / 3
    assert float(bonus.detach()) == pytest.approx(1.0)
    bonus.backward()
    assert entropies.grad.flatten().tolist() == pytest.approx([0.5 / 3, 0.5 / 3, 0.0, 0.5 / 3, 0.0, 0.0])
    assert float(entropy_bonus(entropies, torch.zeros_like(mask), 0.5)) == 0.0


def test_adaptive_entropy_coef_steps_toward_the_target():
    from alignlab.losses.ppo import adaptive_entropy_coef

    kw = dict(target=0.2, delta=0.05, low=0.0, high=0.12)
    assert adaptive_entropy_coef(0.1, 0.1, **kw) == 0.12  # below the target: up, capped at high
    assert adaptive_entropy_coef(0.1, 0.2, **kw) == 0.12  # at the target: up
    assert adaptive_entropy_coef(0.1, 0.3, **kw) == pytest.approx(0.05)  # above: down
    assert adaptive_entropy_coef(0.03, 0.3, **kw) == 0.0  # floored at low

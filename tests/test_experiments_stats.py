"""Paired comparisons, the verdict rule and the Pareto front, against hand-worked numbers and simulations."""

import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from alignlab.experiments.stats import paired_comparison, pareto_front, seed_spread, verdict, verdict_agreement


# --- paired_comparison ------------------------------------------------------------------------------------


def test_constant_difference_gives_a_point_interval_and_exact_p_values():
    # d = +1 on each of 6 prompts: every resample's mean is 1, so the interval is [1, 1].
    # Sign test: 6 of 6 favour a, p = 2 * 0.5^6 = 0.03125.
    # Signed-rank: all |d| tie (rank 3.5 each), so scipy enumerates the 2^6 sign flips; only "all +" and
    # "all -" are as extreme as observed, p = 2 / 64 = 0.03125.
    b = np.arange(6.0)
    r = paired_comparison(b + 1.0, b)
    assert (r.mean_diff, r.ci_low, r.ci_high) == (1.0, 1.0, 1.0)
    assert r.sign_test_p == pytest.approx(2 * 0.5**6)
    assert r.wilcoxon_p == pytest.approx(2 / 64)
    assert (r.n_prompts, r.n_better, r.n_worse, r.n_ties) == (6, 6, 0, 0)
    assert r.above_zero and not r.includes_zero


def test_seeds_are_averaged_within_a_prompt_and_ties_dropped():
    # a has K=2 seeds: per-prompt means [(1+3)/2, 0, (2+0)/2, (4+2)/2] = [2, 0, 1, 3]; b (the base) has K=1.
    # d = [2, -1, 0, 3]: mean 1; 2 better, 1 worse, 1 tie.
    # Sign test (tie dropped): 2 of 3, p = 2 * P(X >= 2 | n=3) = 2 * 4/8 = 1.0.
    # Pratt signed-rank: |d| = [2, 1, 0, 3] ranked with the zero: [3, 2, 1, 4]; R+ = 3 + 4 = 7. Flipping the
    # signs of ranks {2, 3, 4} gives R+ in {0, 2, 3, 4, 5, 6, 7, 9}, each 1/8: P(R+ >= 7) = 2/8,
    # p = 2 * 2/8 = 0.5.
    a = [[1.0, 0.0, 2.0, 4.0], [3.0, 0.0, 0.0, 2.0]]
    b = [0.0, 1.0, 1.0, 0.0]
    r = paired_comparison(a, b)
    assert r.mean_diff == 1.0
    assert (r.n_better, r.n_worse, r.n_ties) == (2, 1, 1)
    assert r.sign_test_p == pytest.approx(1.0)
    assert r.wilcoxon_p == pytest.approx(0.5)
    assert -1.0 <= r.ci_low < 1.0 < r.ci_high <= 3.0
    # The same as comparing the seed means directly.
    assert paired_comparison(np.mean(a, axis=0), b) == r


def test_two_prompt_bootstrap_interval():
    # d = [0, 1]: a resample's mean is 0 (prob 1/4), 0.5 (1/2) or 1 (1/4); the 2.5% and 97.5% quantiles of
    # 10000 resamples are 0 and 1.
    r = paired_comparison([0.0, 1.0], [0.0, 0.0])
    assert (r.mean_diff, r.ci_low, r.ci_high) == (0.5, 0.0, 1.0)


def test_interval_width_matches_the_plug_in_standard_error():
    # For many prompts the percentile interval is about mean +- 1.96 * sqrt(mean((d - mean d)^2) / P)
    # (the bootstrap's standard error of a mean is the plug-in one).
    rng = np.random.default_rng(3)
    d = rng.normal(0.2, 1.0, size=400)
    r = paired_comparison(d, np.zeros(400))
    se = math.sqrt(np.mean((d - d.mean()) ** 2) / 400)
    assert (r.ci_high - r.ci_low) / (2 * 1.959964 * se) == pytest.approx(1.0, abs=0.05)
    assert (r.ci_low + r.ci_high) / 2 == pytest.approx(d.mean(), abs=0.1 * se)


def test_pairing_removes_the_shared_prompt_effect():
    # Prompt difficulty (sd 1) is shared; a is better by 0.1 with per-model noise sd 0.05. The marginal 95%
    # intervals (+-1.96 * 1 / sqrt(50) = +-0.28) overlap; the paired interval is about +-0.02 and excludes 0.
    rng = np.random.default_rng(0)
    u = rng.normal(0.0, 1.0, size=50)
    a = u + 0.1 + rng.normal(0.0, 0.05, size=50)
    b = u + rng.normal(0.0, 0.05, size=50)
    r = paired_comparison(a, b)
    assert r.above_zero
    assert r.ci_high - r.ci_low < 0.05
    assert r.sign_test_p < 1e-6 and r.wilcoxon_p < 1e-6


def test_equal_models_give_nan_p_values_and_json_none():
    # 0.1 + 0.2 + 0.3 over 3 seeds is 0.20000000000000004 in floats: still a tie with the base's 0.2.
    a = [[0.1, 1.0], [0.2, 1.0], [0.3, 1.0]]
    r = paired_comparison(a, [0.2, 1.0])
    assert (r.mean_diff, r.ci_low, r.ci_high, r.n_ties) == (0.0, 0.0, 0.0, 2)
    assert math.isnan(r.sign_test_p) and math.isnan(r.wilcoxon_p)
    assert r.includes_zero
    d = r.to_dict()
    assert d["sign_test_p"] is None and d["wilcoxon_p"] is None and d["ci"] == [0.0, 0.0]
    json.dumps(d, allow_nan=False)


def test_seeded_and_reproducible():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 20)), rng.normal(size=20)
    assert paired_comparison(a, b, seed=5) == paired_comparison(a, b, seed=5)
    assert paired_comparison(a, b, seed=5).ci_low != paired_comparison(a, b, seed=6).ci_low


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (np.zeros(4), np.zeros(5), "same prompts"),
        (np.zeros((2, 4)), np.zeros((1, 3)), "same prompts"),
        (np.zeros(0), np.zeros(0), "empty"),
        (np.zeros((0, 4)), np.zeros(4), "empty"),
        (np.zeros((2, 2, 2, 2)), np.zeros(2), "shape"),
        (np.zeros((2, 2, 2)), np.zeros(3), "same prompts"),
        ([1.0, math.nan], [0.0, 0.0], "NaN"),
    ],
)
def test_bad_inputs_raise(a, b, message):
    with pytest.raises(ValueError, match=message):
        paired_comparison(a, b)


def test_seeds_are_resampled_with_the_prompts():
    # a: 2 seeds (R=2, one sample each) that beat the base b by 0.5 and by 0.1 on every one of 4 prompts; d is the
    # same on every prompt, so only the seeds move a resample: the mean of 2 seeds drawn with replacement is
    # 0.1 (1/4), 0.3 (1/2) or 0.5 (1/4), and the 2.5% and 97.5% quantiles are 0.1 and 0.5.
    b = np.array([0.0, 1.0, 2.0, 3.0])
    a = np.stack([[b + 0.5], [b + 0.1]])  # (2, 1, 4)
    r = paired_comparison(a, b)
    assert r.mean_diff == pytest.approx(0.3) and (r.ci_low, r.ci_high) == pytest.approx((0.1, 0.5))
    # Conditional on the seeds run, (K, P) with the seeds as draws: d = 0.3 on every prompt, the interval a point.
    conditional = paired_comparison(a[:, 0], b)
    assert (conditional.ci_low, conditional.ci_high) == pytest.approx((0.3, 0.3))
    # Identical seeds add nothing: the same prompts are resampled, so the interval is the conditional one.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=12), rng.normal(size=12)
    same = paired_comparison(np.stack([[x], [x], [x]]), y)
    plain = paired_comparison(x, y)
    assert (same.ci_low, same.ci_high) == pytest.approx((plain.ci_low, plain.ci_high))
    # One run of S draws is the (S, P) input.
    assert paired_comparison(np.stack([x, y])[None], y) == paired_comparison(np.stack([x, y]), y)


def test_a_verdict_that_rests_on_one_seed_is_not_a_win():
    # dpo's seeds: far above grpo on every prompt with one seed, far below with the other; conditional on those two
    # seeds dpo's mean is +0.05 above grpo on every prompt, a "win"; resampling the seeds says it could be -0.45.
    base = np.linspace(0.0, 1.0, 16)
    grpo = np.stack([[base + 0.2], [base + 0.2]])
    dpo = np.stack([[base + 0.75], [base - 0.25]])
    resampled = verdict({"base": base, "dpo": dpo, "grpo": grpo})
    assert resampled.best == "dpo" and resampled.winner is None and resampled.tied_with_best == ["grpo"]
    conditional = verdict({"base": base, "dpo": dpo[:, 0], "grpo": grpo[:, 0]})
    assert conditional.winner == "dpo"


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="confidence"):
        paired_comparison([1.0], [0.0], confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        paired_comparison([1.0], [0.0], n_resamples=0)


# --- seed_spread --------------------------------------------------------------------------------------------


def test_seed_spread():
    # mean 2; sample std sqrt(((1-2)^2 + 0 + (3-2)^2) / (3 - 1)) = 1.
    assert seed_spread([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n_seeds": 3}
    assert seed_spread([0.5]) == {"mean": 0.5, "std": None, "n_seeds": 1}
    with pytest.raises(ValueError):
        seed_spread([])
    with pytest.raises(ValueError):
        seed_spread([[1.0, 2.0]])


# --- verdict ------------------------------------------------------------------------------------------------

U = np.arange(8) * 0.25  # prompt effects shared by every model (dyadic, so the sums below are exact)


def test_verdict_names_a_winner():
    # Constant per-prompt offsets: every interval is a point. grpo - dpo = 0.5 and grpo - ppo = 0.75 are above
    # 0, so grpo wins; its smallest margin is over dpo.
    v = verdict({"base": U, "dpo": U + 0.5, "grpo": U + 1.0, "ppo": U + 0.25})
    assert (v.best, v.winner, v.tied_with_best) == ("grpo", "grpo", [])
    assert v.sentence() == ("grpo wins: its paired 95% interval against every other method is above 0 "
                            "(smallest margin +0.500 [0.500, 0.500] over dpo).")
    assert v.base_sentence() == (
        "Against base (paired 95% intervals of the difference): dpo +0.500 [0.500, 0.500], "
        "grpo +1.000 [1.000, 1.000] and ppo +0.250 [0.250, 0.250] are above it.")
    assert v.means["grpo"] == pytest.approx(U.mean() + 1.0)


def test_verdict_reports_ties():
    # dpo and grpo are equal (dpo is best by input order); online-dpo = base + [+1, -1, ...], so
    # dpo - online-dpo = [-0.5, 1.5, ...]: a resample's mean is -0.5 + 2 X / 8 with X ~ Bin(8, 1/2) and
    # P(X <= 1) = 9/256 > 2.5%, so the lower end is at most -0.25: tied. ppo = base - 1 is below everyone.
    alt = np.tile([1.0, -1.0], 4)
    scores = {"base": U, "dpo": U + 0.5, "grpo": U + 0.5, "online-dpo": U + alt, "ppo": U - 1.0}
    v = verdict(scores)
    assert (v.best, v.winner, v.tied_with_best) == ("dpo", None, ["grpo", "online-dpo"])
    assert v.best_over["online-dpo"].ci_low <= -0.25
    assert v.sentence() == ("No single winner: dpo has the highest mean, statistically tied with grpo and "
                            "online-dpo (paired 95% intervals include 0); it is above ppo (+1.500 [1.500, 1.500]).")
    base = v.base_sentence()
    assert base.startswith("Against base (paired 95% intervals of the difference): dpo +0.500 [0.500, 0.500] and "
                           "grpo +0.500 [0.500, 0.500] are above it; online-dpo +0.000 [")
    assert base.endswith("is indistinguishable from it; ppo -1.000 [-1.000, -1.000] is below it.")
    d = v.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["winner"] is None and d["tied_with_best"] == ["grpo", "online-dpo"]
    assert d["best_over"]["ppo"]["ci"] == [1.5, 1.5] and d["vs_base"]["ppo"]["mean_diff"] == -1.0
    assert d["sentence"] == v.sentence()


def test_verdict_one_method_and_seeds():
    # One trained method with K=3 seeds against the base's single run: it is the winner by default.
    v = verdict({"base": U, "dpo": np.stack([U + 0.25, U + 0.5, U + 0.75])}, confidence=0.9)
    assert (v.best, v.winner, v.best_over) == ("dpo", "dpo", {})
    assert v.vs_base["dpo"].mean_diff == pytest.approx(0.5)
    assert v.sentence().startswith("dpo is the only trained method")
    assert v.base_sentence() == ("Against base (paired 90% intervals of the difference): dpo +0.500 [0.500, 0.500] "
                                 "is above it.")


def test_verdict_errors():
    with pytest.raises(ValueError, match="no base model"):
        verdict({"dpo": U})
    with pytest.raises(ValueError, match="only the base"):
        verdict({"base": U})
    with pytest.raises(ValueError, match="covers 7 prompts"):
        verdict({"base": U, "dpo": U[:7]})
    with pytest.raises(ValueError, match="covers 8 prompts"):
        verdict({"ref": U[:7], "dpo": U}, base="ref")


# --- the decision rule on simulated comparisons ---------------------------------------------------------------
#
# Model of an evaluation: P = 32 held-out prompts; the per-prompt reward of model m, seed k, prompt j is
#     r[m, k, j] = u[j] + mu[m] + e[m, k, j],   u[j] ~ N(0.5, TAU^2) shared by all models (prompt difficulty),
#                                               e[m, k, j] ~ N(0, SIGMA^2) independent (the model's own noise),
# trained methods with K = 3 seeds, the base with one run. The standard error used below is that of the paired
# mean difference of two trained methods: SE = sd(mean_k e_a - mean_k e_b) / sqrt(P) = sqrt(2 SIGMA^2 / (K P)).
# The bootstrap uses 2000 resamples (not 10000) for speed; the thresholds are unchanged.

P, K, TAU, SIGMA = 32, 3, 0.2, 0.1
SE = math.sqrt(2 * SIGMA**2 / (K * P))
N_SIM, N_RESAMPLES = 200, 2000


def _simulate(rng, mus):
    u = rng.normal(0.5, TAU, size=P)
    scores = {"base": u - 3 * SE + rng.normal(0.0, SIGMA, size=P)}
    for m, mu in mus.items():
        scores[m] = u + mu + rng.normal(0.0, SIGMA, size=(K, P))
    return scores


def _winner_rate(delta_se, seed):
    rng = np.random.default_rng(seed)
    wins = 0
    for i in range(N_SIM):
        v = verdict(_simulate(rng, {"dpo": 0.0, "grpo": delta_se * SE, "ppo": 0.0}), n_resamples=N_RESAMPLES, seed=i)
        wins += v.winner == "grpo"
    return wins / N_SIM


def test_identical_methods_are_tied():
    # Two methods with the same true mean: the best (the larger sample mean) is declared the winner only when
    # its interval against the other excludes 0, about 5% of the time (both tails fold onto the chosen one).
    rng = np.random.default_rng(1)
    tied = 0
    for i in range(N_SIM):
        v = verdict(_simulate(rng, {"dpo": 0.0, "ppo": 0.0}), n_resamples=N_RESAMPLES, seed=i)
        tied += v.winner is None and len(v.tied_with_best) == 1
    assert tied / N_SIM >= 0.90


def test_a_method_4_se_better_is_named_winner():
    # Normal theory: each comparison excludes 0 with probability Phi(4 - 1.96) = 0.979; both comparisons
    # (correlated 0.5 through grpo's own noise) with probability 0.962.
    assert _winner_rate(4.0, seed=0) >= 0.90


def test_a_method_3_se_better_wins_as_often_as_normal_theory_says():
    # At 3 SE a 95% rule cannot reach 90%: one comparison excludes 0 with probability Phi(3 - 1.96) = 0.851,
    # and both (two other methods, correlation 0.5) with probability 0.759 (bivariate normal). The rule must
    # match that: higher means the intervals are too narrow (too many false winners), lower that they are too
    # wide. 200 simulations have a binomial sd of 0.03; the band is 2 sd.
    z = scipy_stats.norm.ppf(0.975)
    theory = scipy_stats.multivariate_normal(mean=[0.0, 0.0], cov=[[1.0, 0.5], [0.5, 1.0]]).cdf([3 - z, 3 - z])
    assert theory == pytest.approx(0.759, abs=1e-3)
    assert abs(_winner_rate(3.0, seed=0) - theory) <= 0.06


# --- pareto_front -------------------------------------------------------------------------------------------


def test_pareto_front():
    # grpo (KL 1.0, 0.25) is dominated by dpo (0.5, 0.3); the rest trade KL for reward.
    points = {"grpo": (1.0, 0.25), "dpo": (0.5, 0.3), "base": (0.0, 0.1), "ppo": (0.4, 0.2)}
    assert pareto_front(points) == ["base", "ppo", "dpo"]
    # Same KL, lower reward: dominated. Identical points: both stay.
    assert pareto_front({"a": (0.5, 0.3), "b": (0.5, 0.2)}) == ["a"]
    assert pareto_front({"a": (0.5, 0.3), "b": (0.5, 0.3)}) == ["a", "b"]
    # Equal reward, higher KL: dominated.
    assert pareto_front({"a": (0.7, 0.3), "b": (0.5, 0.3)}) == ["b"]
    assert pareto_front({}) == []
    with pytest.raises(ValueError, match="finite"):
        pareto_front({"a": (math.nan, 0.3)})


# --- verdict_agreement ------------------------------------------------------------------------------------


BASE = np.arange(6.0)


def test_two_runs_with_the_same_order_agree():
    # y - x = +1 on every prompt in both runs: y wins both, every interval is a point, nothing contradicts
    run = {"base": BASE, "x": BASE + 1.0, "y": BASE + 2.0}
    agreement = verdict_agreement(run, {k: v + 0.0 for k, v in run.items()}, n_resamples=200)
    assert agreement.best_agrees and agreement.contradictions == [] and agreement.holds
    assert agreement.first.winner == agreement.second.winner == "y"
    assert agreement.sentence().startswith("The verdicts agree")


def test_a_reversed_significant_difference_is_a_contradiction():
    # first run: y - x = +1 everywhere (y wins); second run: y - x = -1 everywhere (x wins). Both beat the base
    # in both runs, so (x, y) is the only contradiction and the best methods disagree
    first = {"base": BASE, "x": BASE + 1.0, "y": BASE + 2.0}
    second = {"base": BASE, "x": BASE + 2.0, "y": BASE + 1.0}
    agreement = verdict_agreement(first, second, n_resamples=200)
    assert not agreement.best_agrees and not agreement.holds
    [(a, b, r1, r2)] = agreement.contradictions
    assert (a, b, r1.mean_diff, r2.mean_diff) == ("x", "y", -1.0, 1.0)
    assert "opposite significant differences for x - y (-1.000 [-1.000, -1.000] against +1.000" \
        in agreement.sentence()


def test_a_best_tied_with_the_other_runs_best_agrees():
    # first run: y - x = [+1, -1, +1, -1, +1, -0.5] (mean +0.083, interval around 0): y best, tied with x;
    # second run: the same noise the other way round: x best, tied with y. Each best is in the other's tie
    noise = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -0.5])
    first = {"base": BASE, "x": BASE + 3.0, "y": BASE + 3.0 + noise}
    second = {"base": BASE, "x": BASE + 3.0 + noise, "y": BASE + 3.0}
    agreement = verdict_agreement(first, second, n_resamples=2000)
    assert agreement.first.best == "y" and agreement.first.tied_with_best == ["x"]
    assert agreement.second.best == "x" and agreement.second.tied_with_best == ["y"]
    assert agreement.best_agrees and agreement.contradictions == [] and agreement.holds


def test_a_best_outside_the_other_runs_top_disagrees_without_a_contradiction():
    # first run: y best, tied with x (as above); second run: x - y = +1 everywhere, x wins outright. y, the first
    # run's best, is neither the second run's winner nor tied with it; no pair is significant both ways
    noise = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -0.5])
    first = {"base": BASE, "x": BASE + 3.0, "y": BASE + 3.0 + noise}
    second = {"base": BASE, "x": BASE + 4.0, "y": BASE + 3.0}
    agreement = verdict_agreement(first, second, n_resamples=2000)
    assert agreement.second.winner == "x"
    assert not agreement.best_agrees and agreement.contradictions == [] and not agreement.holds
    assert agreement.sentence().startswith("The verdicts disagree: the best methods disagree (y in the first run")


def test_agreement_needs_the_same_models():
    with pytest.raises(ValueError, match="different models"):
        verdict_agreement({"base": BASE, "x": BASE}, {"base": BASE, "y": BASE})

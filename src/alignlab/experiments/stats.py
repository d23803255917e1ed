"""The statistics behind ``alignlab compare``'s verdict: paired comparisons of models evaluated on the same
held-out prompts, the decision rule that names a winner (or says which methods are tied), and the Pareto
front of reward against KL.

Every model is evaluated on the same ``P`` prompts, so the comparisons are paired: the prompt-to-prompt
variation (some prompts are easy for every model) cancels in the per-prompt difference, and the interval of
the mean difference is much narrower than the overlap of two marginal intervals suggests. The prompt is the
unit of resampling (a cluster bootstrap: a prompt's rewards from all seeds and samples stay together), because
prompts are the independent draws; seeds and samples within a prompt are averaged first.

Inputs are per-prompt rewards ``(K, P)`` (``K`` sample draws of one model; each entry already the mean over
that run's completions of the prompt), ``(P,)`` (one run), or ``(R, S, P)``: ``R`` independent training runs
(seeds) of a method, ``S`` sample draws each. Two models may have different ``K`` or ``R`` (a method trained with
3 seeds against the base model's single evaluation): each is averaged over its own runs and draws within a
prompt, so the base's one run is compared with the methods' seed average. With ``(K, P)`` the interval is
conditional on what was run. With ``(R, S, P)`` and ``R > 1`` the bootstrap resamples each such method's runs
too, independently of the prompts (the pigeonhole bootstrap of a crossed design, Owen 2007): a seed that is
better on every prompt then widens the interval, as it should when the question is which *method* is better,
not which trained model. With 2 or 3 seeds this bootstrap still understates the seeds' spread (a resample of
``R`` values has ``(R - 1) / R`` of their variance), so ``seed_spread`` is reported beside it.

Sources: Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13 (percentile interval); Davison &
Hinkley 1997, "Bootstrap Methods and their Application", sec. 3.8 (resampling clusters, the top-level unit);
Miller 2024, "Adding Error Bars to Evals" (arXiv 2411.00640), sec. 2.2 and 4 (clustered questions, paired
differences); Owen 2007, "The pigeonhole bootstrap", Ann. Appl. Stat. 1(2) (resampling both factors of a crossed
design: here prompts and seeds); Dixon & Mood 1946 (sign test); Wilcoxon 1945 and Pratt 1959 (signed-rank
test, zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

_MAX_DRAWS_PER_CHUNK = 1 << 22
"""Bootstrap indices drawn at once (32 MiB of int64): bounds memory for large prompt sets."""

_TIE_RTOL = 1e-12
"""Per-prompt differences smaller than this, relative to the largest per-prompt mean (at least 1), are ties:
averages of equal rewards can differ in the last bit."""


def _runs(x: Any, name: str) -> np.ndarray:
    """``(R, S, P)``, ``(K, P)`` or ``(P,)`` rewards -> ``(R, P)`` per-run per-prompt means (float64): one row per
    independent training run for ``(R, S, P)`` (its ``S`` draws averaged), a single row otherwise (``(K, P)``:
    draws of one model, averaged, not resampled).

    Raises:
        ValueError: another shape, an empty input, or NaN / infinite rewards.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (R, S, P), (K, P) or (P,), got {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or infinite rewards")
    return arr.mean(axis=1) if arr.ndim == 3 else arr.mean(axis=0, keepdims=True)


def _per_prompt(x: Any, name: str) -> np.ndarray:
    """Rewards as for :func:`_runs` -> ``(P,)`` per-prompt means over every run and draw (float64)."""
    return _runs(x, name).mean(axis=0)


def _check_settings(n_resamples: int, confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")


def _bootstrap_means(d: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` resamples (with replacement, ``P`` prompts each) of ``d`` ``(P,)`` ->
    ``(n_resamples,)``. Drawn in chunks of rows so that memory stays bounded."""
    rng = np.random.default_rng(seed)
    p = d.shape[0]
    rows = max(1, _MAX_DRAWS_PER_CHUNK // p)
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, rows):
        stop = min(n_resamples, start + rows)
        idx = rng.integers(0, p, size=(stop - start, p))  # (rows, P)
        out[start:stop] = d[idx].mean(axis=1)
    return out


def _bootstrap_means_over_runs(a: np.ndarray, b: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """The pigeonhole bootstrap (Owen 2007) of ``mean_j (mean_r a[r, j] - mean_r b[r, j])`` for per-run
    per-prompt means ``a`` ``(R_a, P)`` and ``b`` ``(R_b, P)`` -> ``(n_resamples,)``: each resample draws ``P``
    prompts and, independently for each model, its ``R`` runs with replacement. The prompts are drawn from the
    same stream as :func:`_bootstrap_means` (so every comparison of a verdict resamples the same prompts), the
    runs from a second one."""
    prompt_rng, run_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    p = a.shape[1]
    rows = max(1, _MAX_DRAWS_PER_CHUNK // (p * max(a.shape[0], b.shape[0])))
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, rows):
        n = min(n_resamples, start + rows) - start
        idx = prompt_rng.integers(0, p, size=(n, p))  # (rows, P)
        means = []
        for runs in (a, b):
            picked = run_rng.integers(0, runs.shape[0], size=(n, runs.shape[0]))  # (rows, R)
            means.append(runs[picked].mean(axis=1))  # (rows, R, P) -> (rows, P)
        out[start:start + n] = np.take_along_axis(means[0] - means[1], idx, axis=1).mean(axis=1)
    return out


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


@dataclass(frozen=True)
class PairedResult:
    """Model ``a`` against model ``b`` on the same prompts; differences are ``a - b`` (reward units)."""

    mean_diff: float
    """Mean over prompts of the per-prompt difference (each side averaged over its own runs first)."""
    ci_low: float
    """Lower end of the percentile bootstrap interval of ``mean_diff`` (prompts resampled, and the runs of an
    ``(R, S, P)`` input)."""
    ci_high: float
    """Upper end of that interval."""
    sign_test_p: float
    """Two-sided exact binomial test that a prompt is as likely to favour ``a`` as ``b`` (ties dropped); NaN
    when every difference is a tie."""
    wilcoxon_p: float
    """Two-sided Wilcoxon signed-rank test of the differences (Pratt's treatment of zeros); NaN when every
    difference is 0."""
    n_prompts: int
    """Prompts compared (``P``)."""
    n_better: int
    """Prompts on which ``a`` scores higher than ``b``."""
    n_worse: int
    """Prompts on which ``a`` scores lower than ``b``."""
    n_ties: int
    """Prompts on which they score the same."""
    confidence: float
    """Coverage the interval was built for (0.95: the 2.5% and 97.5% bootstrap quantiles)."""

    @property
    def above_zero(self) -> bool:
        """The interval lies strictly above 0: ``a`` is better."""
        return self.ci_low > 0.0

    @property
    def below_zero(self) -> bool:
        """The interval lies strictly below 0: ``a`` is worse."""
        return self.ci_high < 0.0

    @property
    def includes_zero(self) -> bool:
        """The interval contains 0: no difference shown."""
        return not (self.above_zero or self.below_zero)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN p-values become None)."""
        return {
            "mean_diff": self.mean_diff,
            "ci": [self.ci_low, self.ci_high],
            "sign_test_p": _nan_to_none(self.sign_test_p),
            "wilcoxon_p": _nan_to_none(self.wilcoxon_p),
            "n_prompts": self.n_prompts,
            "n_better": self.n_better,
            "n_worse": self.n_worse,
            "n_ties": self.n_ties,
            "confidence": self.confidence,
        }


def paired_comparison(
    a: Any, b: Any, *, n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0
) -> PairedResult:
    """Compare two models evaluated on the same prompts: ``a - b``.

    Args:
        a: rewards of model ``a``, ``(K_a, P)`` (``K_a`` sample draws), ``(R_a, S_a, P)`` (``R_a`` training runs,
            e.g. seeds, of ``S_a`` draws each) or ``(P,)``; prompt ``j`` is the same prompt in ``a`` and ``b``.
        b: rewards of model ``b``, in any of those shapes; its counts may differ from ``a``'s.
        n_resamples: bootstrap resamples.
        confidence: coverage of the interval.
        seed: seed of the resampling (the result is a function of the inputs and the seed).

    Per prompt ``j``: ``d_j = mean_k a[k, j] - mean_k b[k, j]``; ``|d_j| <= 1e-12 * max(1, max |means|)``
    counts as a tie (0). ``mean_diff = mean_j d_j``. Interval: the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles of the mean of ``d`` over ``n_resamples`` resamples of ``P`` prompts drawn
    with replacement (percentile bootstrap, Efron & Tibshirani 1993, eq. 13.5; the prompt is the resampled
    cluster, Davison & Hinkley 1997, sec. 3.8). When ``a`` or ``b`` is ``(R, S, P)`` with ``R > 1``, each
    resample also draws each model's ``R`` runs with replacement, independently of the prompts (the pigeonhole
    bootstrap of a crossed design, Owen 2007, sec. 2), so the interval covers another draw of seeds as well as of
    prompts. The two tests stay conditional on the runs (per-prompt means). Sign test:
    ``scipy.stats.binomtest(n_better, n_better + n_worse, 0.5)``, ties dropped (Dixon & Mood 1946). Signed-rank test: ``scipy.stats.wilcoxon(d,
    zero_method="pratt")`` (Pratt 1959: zeros are ranked, then their ranks dropped; scipy >= 1.15 uses the exact
    null without ties or zeros and ``P <= 50``, all ``2^P`` sign flips with them and ``P <= 13``, else the normal
    approximation).

    Returns:
        A :class:`PairedResult`.

    Raises:
        ValueError: an input is empty, not 1-, 2- or 3-dimensional, or not finite; ``a`` and ``b`` have different
            numbers of prompts; ``confidence`` not in (0, 1); ``n_resamples < 1``.
    """
    _check_settings(n_resamples, confidence)
    runs_a, runs_b = _runs(a, "a"), _runs(b, "b")  # (R_a, P), (R_b, P)
    mean_a, mean_b = runs_a.mean(axis=0), runs_b.mean(axis=0)
    if mean_a.shape != mean_b.shape:
        raise ValueError(f"a and b must cover the same prompts, got {mean_a.shape[0]} and {mean_b.shape[0]} prompts")
    d = mean_a - mean_b  # (P,)
    scale = max(1.0, float(np.abs(mean_a).max()), float(np.abs(mean_b).max()))
    d[np.abs(d) <= _TIE_RTOL * scale] = 0.0

    alpha = 1.0 - confidence
    if runs_a.shape[0] > 1 or runs_b.shape[0] > 1:
        boot = _bootstrap_means_over_runs(runs_a, runs_b, n_resamples, seed)
    else:
        boot = _bootstrap_means(d, n_resamples, seed)
    ci_low, ci_high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])

    n_better = int(np.count_nonzero(d > 0))
    n_worse = int(np.count_nonzero(d < 0))
    n_ties = int(d.shape[0] - n_better - n_worse)
    if n_better + n_worse == 0:
        sign_p = wilcoxon_p = math.nan
    else:
        sign_p = float(scipy_stats.binomtest(n_better, n_better + n_worse, 0.5).pvalue)
        wilcoxon_p = float(scipy_stats.wilcoxon(d, zero_method="pratt").pvalue)
    return PairedResult(
        mean_diff=float(d.mean()),
        # The quantiles of means of copies of one value can differ from it in the last bit; keep the interval
        # around the estimate.
        ci_low=min(float(ci_low), float(d.mean())),
        ci_high=max(float(ci_high), float(d.mean())),
        sign_test_p=sign_p,
        wilcoxon_p=wilcoxon_p,
        n_prompts=int(d.shape[0]),
        n_better=n_better,
        n_worse=n_worse,
        n_ties=n_ties,
        confidence=confidence,
    )


def seed_spread(values: Any) -> dict[str, Any]:
    """Mean and spread over seeds of one method's score (for the table).

    Args:
        values: ``(K,)`` one score per seed (e.g. each seed's held-out mean reward).

    Returns:
        ``{"mean": float, "std": float | None, "n_seeds": K}``; ``std`` is the sample standard deviation
        (Bessel's correction, ``ddof=1``), None for a single seed.

    Raises:
        ValueError: ``values`` is empty, not 1-dimensional, or not finite.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"values must be a non-empty (K,) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("values holds NaN or infinite scores")
    std = float(arr.std(ddof=1)) if arr.size > 1 else None
    return {"mean": float(arr.mean()), "std": std, "n_seeds": int(arr.size)}


def _join(names: list[str]) -> str:
    """``["a"] -> "a"``, ``["a", "b", "c"] -> "a, b and c"``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _fmt(r: PairedResult) -> str:
    return f"{r.mean_diff:+.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"


@dataclass(frozen=True)
class Verdict:
    """Which trained method is best on the held-out prompts, and how each compares with the base."""

    base: str
    """Name of the base model (not a candidate)."""
    best: str
    """Trained method with the highest mean reward (first in input order on an exact tie)."""
    winner: str | None
    """``best`` when its paired interval against every other trained method lies strictly above 0; else None."""
    tied_with_best: list[str]
    """When there is no winner: the other trained methods whose paired interval against ``best`` is not above
    0 (it contains 0), in input order. Empty when there is a winner."""
    means: dict[str, float]
    """Mean reward per model, base included (per-prompt means over runs, then over prompts)."""
    vs_base: dict[str, PairedResult]
    """Each trained method against the base: ``method - base``."""
    best_over: dict[str, PairedResult]
    """``best`` against each other trained method: ``best - method``."""
    confidence: float
    """Coverage of every interval."""
    n_resamples: int
    """Bootstrap resamples per comparison."""
    seed: int
    """Seed of the resampling (the same for every comparison)."""
    n_prompts: int
    """Prompts every model was evaluated on (``P``)."""

    @property
    def _pct(self) -> str:
        return f"{self.confidence * 100:g}%"

    def sentence(self) -> str:
        """One plain sentence naming the winner, or the methods tied with the best."""
        if not self.best_over:
            return f"{self.best} is the only trained method (mean {self.means[self.best]:.3f}); nothing to rank."
        if self.winner is not None:
            closest = min(self.best_over, key=lambda m: self.best_over[m].mean_diff)
            return (f"{self.winner} wins: its paired {self._pct} interval against every other method is above 0 "
                    f"(smallest margin {_fmt(self.best_over[closest])} over {closest}).")
        tied = self.tied_with_best
        text = (f"No single winner: {self.best} has the highest mean, statistically tied with {_join(tied)} "
                f"(paired {self._pct} interval{'s include' if len(tied) > 1 else ' includes'} 0)")
        below = [m for m in self.best_over if m not in tied]
        if below:
            text += "; it is above " + _join([f"{m} ({_fmt(self.best_over[m])})" for m in below])
        return text + "."

    def base_sentence(self) -> str:
        """One plain sentence on how each trained method compares with the base."""
        groups = {"above": [], "indistinguishable from": [], "below": []}
        for m, r in self.vs_base.items():
            key = "above" if r.above_zero else "below" if r.below_zero else "indistinguishable from"
            groups[key].append(f"{m} {_fmt(r)}")
        clauses = [f"{_join(items)} {'is' if len(items) == 1 else 'are'} {key} it"
                   for key, items in groups.items() if items]
        return f"Against {self.base} (paired {self._pct} intervals of the difference): " + "; ".join(clauses) + "."

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for results.json."""
        return {
            "base": self.base,
            "best": self.best,
            "winner": self.winner,
            "tied_with_best": list(self.tied_with_best),
            "means": dict(self.means),
            "vs_base": {m: r.to_dict() for m, r in self.vs_base.items()},
            "best_over": {m: r.to_dict() for m, r in self.best_over.items()},
            "confidence": self.confidence,
            "n_resamples": self.n_resamples,
            "seed": self.seed,
            "n_prompts": self.n_prompts,
            "sentence": self.sentence(),
            "base_sentence": self.base_sentence(),
        }


def verdict(
    scores: dict[str, Any],
    *,
    base: str = "base",
    confidence: float = 0.95,
    n_resamples: int = 10000,
    seed: int = 0,
) -> Verdict:
    """Name the best trained method and say whether the data support it as the winner.

    Args:
        scores: per model, rewards ``(R, S, P)``, ``(K, P)`` or ``(P,)`` on the same ``P`` prompts (as for
            :func:`paired_comparison`: an ``(R, S, P)`` method's ``R`` seeds are resampled); must hold ``base`` and
            at least one trained method.
        base: the base model's key; it is compared against but never a candidate.
        confidence, n_resamples, seed: as for :func:`paired_comparison`. Every comparison uses the same seed,
            so all of them resample the same prompts.

    Rule: ``best`` is the trained method with the highest mean. ``winner = best`` when, for every other trained
    method ``m``, the paired interval of ``best - m`` lies strictly above 0 (an intersection-union rule: the
    claim "best beats each other method" needs each comparison to hold, so no multiplicity correction widens
    it). Otherwise ``tied_with_best`` lists the methods whose interval against ``best`` contains 0. With one
    trained method it is the winner (there is nothing to beat). Each trained method is also compared with the
    base (``method - base``).

    Returns:
        A :class:`Verdict`.

    Raises:
        ValueError: ``base`` is missing, there is no trained method, the models cover different numbers of
            prompts, or any input is invalid (see :func:`paired_comparison`).
    """
    _check_settings(n_resamples, confidence)
    if base not in scores:
        raise ValueError(f"scores has no base model {base!r} (models: {', '.join(scores)})")
    methods = [m for m in scores if m != base]
    if not methods:
        raise ValueError(f"scores holds only the base model {base!r}; nothing to compare")
    per_prompt = {m: _per_prompt(v, m) for m, v in scores.items()}
    n_prompts = per_prompt[base].shape[0]
    for m, pp in per_prompt.items():
        if pp.shape[0] != n_prompts:
            raise ValueError(f"{m} covers {pp.shape[0]} prompts, {base} covers {n_prompts}")
    means = {m: float(pp.mean()) for m, pp in per_prompt.items()}
    best = max(methods, key=lambda m: means[m])  # max keeps the first of equal means

    def compare(x: str, y: str) -> PairedResult:
        return paired_comparison(scores[x], scores[y], n_resamples=n_resamples, confidence=confidence, seed=seed)

    vs_base = {m: compare(m, base) for m in methods}
    best_over = {m: compare(best, m) for m in methods if m != best}
    winner = best if all(r.above_zero for r in best_over.values()) else None
    tied = [] if winner is not None else [m for m, r in best_over.items() if not r.above_zero]
    return Verdict(base=base, best=best, winner=winner, tied_with_best=tied, means=means, vs_base=vs_base,
                   best_over=best_over, confidence=confidence, n_resamples=n_resamples, seed=seed,
                   n_prompts=n_prompts)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Methods not dominated in (lower KL, higher reward).

    Args:
        points: per method, ``(kl, reward)``: KL to the base (nats per completion) and mean reward.

    ``m`` is dominated when another method has ``kl <= kl_m`` and ``reward >= reward_m`` with at least one
    strict; methods with identical points do not dominate each other (both stay).

    Returns:
        The non-dominated methods sorted by KL (then by reward, highest first, then input order); ``[]`` for
        no points.

    Raises:
        ValueError: a point is not two finite numbers.
    """
    names = list(points)
    if not names:
        return []
    arr = np.asarray([points[m] for m in names], dtype=np.float64)
    if arr.shape != (len(names), 2) or not np.all(np.isfinite(arr)):
        raise ValueError("points must map each method to two finite numbers (kl, reward)")
    kl, reward = arr[:, 0], arr[:, 1]  # (M,), (M,)
    # [j, i]: method j dominates method i.
    no_worse = (kl[:, None] <= kl[None, :]) & (reward[:, None] >= reward[None, :])
    better = (kl[:, None] < kl[None, :]) | (reward[:, None] > reward[None, :])
    dominated = (no_worse & better).any(axis=0)  # (M,)
    front = [i for i in range(len(names)) if not dominated[i]]
    front.sort(key=lambda i: (kl[i], -reward[i], i))
    return [names[i] for i in front]


@dataclass(frozen=True)
class Agreement:
    """Whether two runs of the same comparison (other seeds, another machine or precision) reach the same
    verdict, by :func:`verdict_agreement`'s two rules."""

    first: Verdict
    """The first run's verdict."""
    second: Verdict
    """The second run's verdict."""
    best_agrees: bool
    """Each run's best method is the other run's winner, or its best, or statistically tied with its best."""
    contradictions: list[tuple[str, str, PairedResult, PairedResult]]
    """Pairs of models ``(a, b)``, base included, that one run calls significantly different in one direction
    and the other run in the opposite one, with both runs' ``a - b`` results."""

    @property
    def holds(self) -> bool:
        """Both rules hold: the best agrees and there is no contradiction."""
        return self.best_agrees and not self.contradictions

    def sentence(self) -> str:
        """One plain sentence with the outcome of both rules."""
        a, b = self.first, self.second
        best = (f"the best methods agree ({a.best} and {b.best})" if self.best_agrees
                else f"the best methods disagree ({a.best} in the first run, {b.best} in the second)")
        if self.contradictions:
            pairs = _join([f"{x} - {y} ({_fmt(r1)} against {_fmt(r2)})" for x, y, r1, r2 in self.contradictions])
            reversals = f"opposite significant differences for {pairs}"
        else:
            reversals = "no pair of models is significantly different in opposite directions"
        return f"The verdicts {'agree' if self.holds else 'disagree'}: {best}; {reversals}."


def verdict_agreement(first: dict[str, Any], second: dict[str, Any], *, base: str = "base",
                      confidence: float = 0.95, n_resamples: int = 10000, seed: int = 0) -> Agreement:
    """Whether two runs of one comparison agree: the check that a verdict survives another seed, machine or
    precision.

    Args:
        first, second: per model, rewards ``(R, S, P)``, ``(K, P)`` or ``(P,)`` as for :func:`verdict`, one dict
            per run, on the same prompts and with the same models (``base`` included).
        base, confidence, n_resamples, seed: as for :func:`verdict`.

    Rules (both must hold): (1) each run's best method is, in the other run, the winner, the best, or one of
    the methods tied with the best; (2) no pair of models (base included) has a paired interval strictly above
    0 in one run and strictly below 0 in the other.

    Returns:
        An :class:`Agreement`.

    Raises:
        ValueError: the runs hold different models, or any input :func:`verdict` refuses.
    """
    if set(first) != set(second):
        raise ValueError(f"the runs hold different models: {sorted(first)} against {sorted(second)}")
    settings = dict(base=base, confidence=confidence, n_resamples=n_resamples, seed=seed)
    v1, v2 = verdict(first, **settings), verdict(second, **settings)

    def top(v: Verdict) -> set[str]:
        return {v.winner} if v.winner is not None else {v.best, *v.tied_with_best}

    best_agrees = v1.best in top(v2) and v2.best in top(v1)
    names = list(first)
    contradictions = []
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            r1 = paired_comparison(first[x], first[y], n_resamples=n_resamples, confidence=confidence, seed=seed)
            r2 = paired_comparison(second[x], second[y], n_resamples=n_resamples, confidence=confidence, seed=seed)
            if (r1.above_zero and r2.below_zero) or (r1.below_zero and r2.above_zero):
                contradictions.append((x, y, r1, r2))
    return Agreement(first=v1, second=v2, best_agrees=best_agrees, contradictions=contradictions)

"""Whether two runs of ``alignlab compare`` reach the same verdict: the check that a comparison's answer survives
another seed, another machine or the other precision (benchmarks/README.md, "The main job").

Reads each run's ``results.json`` (the per-prompt held-out rewards of every model, ``prompt_scores``) and applies
:func:`alignlab.experiments.stats.verdict_agreement`'s two rules: each run's best method is the other run's winner
or statistically tied with its best, and no pair of models is significantly different in opposite directions.
Prints a Markdown table (each model's mean and its paired difference against the base in both runs) and the
sentence. Exit status 0 when the verdicts agree, 1 when they do not. Usage::

    python benchmarks/verdict_agreement.py RUN_A/results.json RUN_B/results.json
"""

from __future__ import annotations

import argparse
import json
import sys

from alignlab.experiments.stats import verdict_agreement


def prompt_scores(path: str) -> dict[str, list]:
    """``{model: (K, P) rewards}`` of the models a run evaluated (``status`` ok)."""
    with open(path, encoding="utf-8") as handle:
        results = json.load(handle)
    return {name: entry["prompt_scores"] for name, entry in results["methods"].items()
            if entry.get("status") == "ok" and entry.get("prompt_scores")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    args = parser.parse_args()
    first, second = prompt_scores(args.first), prompt_scores(args.second)
    shared = [m for m in first if m in second]
    agreement = verdict_agreement({m: first[m] for m in shared}, {m: second[m] for m in shared})
    v1, v2 = agreement.first, agreement.second

    def against_base(v, m):
        if m == v.base:
            return "-"
        r = v.vs_base[m]
        return f"{r.mean_diff:+.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"

    print("| model | first: mean | first: against base [95% CI] | second: mean | second: against base [95% CI] |")
    print("|---|---|---|---|---|")
    for m in shared:
        print(f"| {m} | {v1.means[m]:.3f} | {against_base(v1, m)} | {v2.means[m]:.3f} | {against_base(v2, m)} |")
    print()
    print("first:", v1.sentence())
    print("second:", v2.sentence())
    print(agreement.sentence())
    return 0 if agreement.holds else 1


if __name__ == "__main__":
    sys.exit(main())

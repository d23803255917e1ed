"""The ``alignlab compare`` report: plots (matplotlib, PNG) and one self-contained HTML page with the plots
embedded as base64 images."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from alignlab.data.io import write_text_atomic
from alignlab.experiments.layout import read_metrics
from alignlab.methods import curve_metrics

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def _ok(entry: dict[str, Any]) -> bool:
    return entry.get("status") == "ok" and "mean_reward" in entry


def curve_points(rows: list[dict], metric: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every ``metrics.jsonl`` row that logged ``metric`` as a finite number."""
    return [(r["step"], r[metric]) for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]


def plot_training_curves(results: dict[str, Any], out: Path) -> Path | None:
    """One panel per trained method: its training metric (its registry entry's curve metric) against step."""
    plt = _pyplot()
    curves = []
    metrics = curve_metrics()
    for method, entry in results["methods"].items():
        if method == "base" or method not in metrics or not entry.get("model_dir"):
            continue
        key, label = metrics[method]
        pts = curve_points(read_metrics(entry["model_dir"]), key)
        if pts:
            curves.append((method, label, pts))
    if not curves:
        return None
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.set_visible(False)
    for ax, (method, label, pts) in zip(axes.flat, curves):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, "-o", markersize=3, linewidth=1.5)
        ax.set_title(method, fontsize=11)
        ax.set_xlabel("step")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("training curves", fontsize=12)
    return _save(fig, out / "training_curves.png")


def plot_reward_vs_kl(results: dict[str, Any], out: Path) -> Path | None:
    """Held-out mean reward against KL to the base model, one point per model (base at KL 0)."""
    plt = _pyplot()
    points = [(m, e["kl_to_base"], e["mean_reward"], e["reward_ci95"]) for m, e in results["methods"].items() if _ok(e)]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=100)
    for i, (method, kl, reward, (low, high)) in enumerate(points):
        ax.errorbar([kl], [reward], yerr=[[reward - low], [high - reward]], fmt="o", color=f"C{i}", capsize=3,
                    label=method)
        ax.annotate(method, (kl, reward), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xlabel("KL to base (nats per completion, sampled estimate)")
    ax.set_ylabel("held-out mean reward (95% CI)")
    ax.set_title("reward against KL")
    ax.grid(alpha=0.3)
    return _save(fig, out / "reward_vs_kl.png")


def plot_reward_bars(results: dict[str, Any], out: Path) -> Path | None:
    """Held-out mean reward per model with its 95% confidence interval."""
    plt = _pyplot()
    entries = [(m, e) for m, e in results["methods"].items() if _ok(e)]
    if not entries:
        return None
    fig, ax = plt.subplots(figsize=(1.1 * len(entries) + 2.5, 4), dpi=100)
    names = [m for m, _ in entries]
    means = [e["mean_reward"] for _, e in entries]
    errs = [[e["mean_reward"] - e["reward_ci95"][0] for _, e in entries],
            [e["reward_ci95"][1] - e["mean_reward"] for _, e in entries]]
    ax.bar(names, means, yerr=errs, capsize=4, color=[f"C{i}" for i in range(len(names))])
    ax.axhline(means[0], color="gray", linestyle="--", linewidth=1)
    ax.set_ylabel("held-out mean reward (95% CI)")
    ax.set_title("held-out reward")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "reward_bars.png")


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def results_rows(results: dict[str, Any]) -> list[list[str]]:
    """The results table as strings: method, status, mean reward [95% CI], its mean and spread over seeds, win
    rate, KL, length, wall time, peak RSS, tokens. Used by the HTML report and the README table."""
    rows = []
    for method, e in results["methods"].items():
        if not _ok(e):
            rows.append([method, f"failed: {e.get('error', '')}"] + [""] * (len(RESULT_HEADERS) - 2))
            continue
        low, high = e["reward_ci95"]
        wall = e.get("wall_seconds")
        rss = e.get("peak_rss_bytes")
        rows.append([
            method, "ok", f"{e['mean_reward']:.3f} [{low:.3f}, {high:.3f}]", seed_spread_cell(e.get("seed_spread")),
            f"{e['win_rate_vs_base']:.2f}",
            f"{e['kl_to_base']:.2f}", f"{e['mean_length']:.1f}",
            "–" if method == "base" else f"{wall:.0f} s" if wall is not None else "–",
            "–" if rss is None else f"{rss / 2**30:.2f} GiB",
            _fmt(e.get("num_tokens")) if method != "base" else "–",
        ])
    return rows


def seed_spread_cell(spread: dict[str, Any] | None) -> str:
    """``compare --seeds``'s cell: the mean reward over seeds +- their sample std, and how many seeds (``-`` for
    one seed or none)."""
    if not spread or spread.get("std") is None:
        return "–"
    return f"{spread['mean']:.3f} ± {spread['std']:.3f} ({spread['n_seeds']} seeds)"


RESULT_HEADERS = ["method", "status", "held-out mean reward [95% CI]", "over seeds (mean ± sd)", "win rate vs base",
                  "KL to base", "mean length (tokens)", "training wall time", "peak RSS", "tokens trained on"]


def _img(path: Path | None) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


NO_SPREAD = 1.0 - 1e-9
"""A step whose ``frac_reward_zero_std`` is at least this had every group's rewards tied: no gradient."""


def learning_signal(entry: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """What one method's training logged, over its seeds (``entry["seeds"]``, else its one ``model_dir``): the
    training-curve ``metric`` at the first step and its mean over the last half of the steps (each averaged over
    the seeds), the steps, and the steps with ``frac_reward_zero_std`` 1 (every completion of every prompt scored
    the same, so group-relative advantages and online pairs were all 0 or tied: no gradient). ``None`` when no
    seed logged ``metric``."""
    dirs = [e["model_dir"] for e in (entry.get("seeds") or {}).values() if e.get("model_dir")]
    if not dirs and entry.get("model_dir"):
        dirs = [entry["model_dir"]]
    runs = []
    for model_dir in dirs:
        rows = read_metrics(model_dir)
        values = [value for _, value in curve_points(rows, metric)]
        if values:
            tied = sum(1 for r in rows if r.get("frac_reward_zero_std", 0.0) >= NO_SPREAD)
            late = values[len(values) // 2:]
            runs.append((values[0], sum(late) / len(late), len(values), tied))
    if not runs:
        return None
    n = len(runs)
    return {"metric": metric, "first": sum(r[0] for r in runs) / n, "last_half": sum(r[1] for r in runs) / n,
            "steps": runs[0][2], "steps_without_spread": sum(r[3] for r in runs) / n, "seeds": n}


def learning_sentences(results: dict[str, Any]) -> list[str]:
    """For each trained method the verdict does not place above the base: one sentence with what its training
    measured (:func:`learning_signal`), so the report says why rather than only that it did not move."""
    found = results.get("verdict") or {}
    metrics = curve_metrics()
    out = []
    for method, comparison in (found.get("vs_base") or {}).items():
        low, high = comparison["ci"]
        entry = results["methods"].get(method, {})
        if low > 0 or method not in metrics or not _ok(entry):
            continue
        key, label = metrics[method]
        signal = learning_signal(entry, key)
        if signal is None:
            continue
        seeds = f", mean of {signal['seeds']} seeds" if signal["seeds"] > 1 else ""
        text = (f"{method} is not above the base ({comparison['mean_diff']:+.3f} [{low:.3f}, {high:.3f}]): its "
                f"training {label} ({key}) was {signal['first']:.3f} at step 1 and {signal['last_half']:.3f} over "
                f"the last half of its {signal['steps']} steps{seeds}")
        if signal["steps_without_spread"] > 0:
            text += (f"; at {signal['steps_without_spread']:g} of those steps every completion of every prompt "
                     "scored the same (frac_reward_zero_std 1), so they had no gradient")
        if entry.get("kl_to_base") is not None:
            text += f"; KL to the base {entry['kl_to_base']:.2f}"
        out.append(text + ".")
    return out


def _pairs_sentence(pairs: dict) -> str:
    """The report's line on the offline pairs: one draw, or each seed's own draw."""
    made = f"from {pairs['prompts']} prompts x {pairs['samples_per_prompt']} base-model samples"
    if "seeds" not in pairs:
        return f"Offline pairs: {pairs['pairs']} best-vs-worst pairs {made}."
    each = ", ".join(f"{info['pairs']} (seed {seed})" for seed, info in pairs["seeds"].items())
    return f"Offline pairs, drawn for each seed with that seed: {each} best-vs-worst pairs {made}."


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Write the plots and ``report.html`` (images embedded) into ``out``; returns the HTML path."""
    out = Path(out)
    curves, scatter, bars = plot_training_curves(results, out), plot_reward_vs_kl(results, out), \
        plot_reward_bars(results, out)
    esc = html.escape
    table = "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in results_rows(results))
    budget = "".join(f"<tr><th>{esc(k)}</th><td>{esc(json.dumps(v) if isinstance(v, dict) else str(v))}</td></tr>"
                     for k, v in results["budget"].items())
    ok = [(m, e) for m, e in results["methods"].items() if _ok(e)]
    samples_html = ""
    if ok:
        n = min(len(e.get("samples", [])) for _, e in ok)
        head = "<tr><th>prompt</th>" + "".join(f"<th>{esc(m)}</th>" for m, _ in ok) + "</tr>"
        body = ""
        for i in range(n):
            prompt = ok[0][1]["samples"][i]["prompt"]
            cells = "".join(
                f"<td><div class=c>{esc(e['samples'][i]['completion'])}</div>"
                f"<div class=r>reward {e['samples'][i]['reward']:.3f}</div></td>" for _, e in ok)
            body += f"<tr><td class=p>{esc(prompt)}</td>{cells}</tr>"
        samples_html = f"<table class=samples>{head}{body}</table>"
    found = results.get("verdict")
    verdict = ""
    if found:
        front = ", ".join(found.get("pareto_front", []))
        verdict = (f"<p class=verdict>{esc(found['sentence'])}</p><p>{esc(found['base_sentence'])}</p>"
                   f"<p>Reward-against-KL Pareto front (no other model has both more reward and less KL): "
                   f"{esc(front)}. Paired 95% bootstrap intervals over the held-out prompts "
                   "(docs/statistics.md).</p>")
    notes = learning_sentences(results)
    if notes:
        verdict += ("<h3>Methods not above the base: what their training measured</h3><ul>"
                    + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    fair = results.get("fairness")
    fairness_html = ""
    if fair:
        fairness_html = (f"<h2>What was held equal, and what was tuned</h2><p>{esc(fair['sentence'])}</p>"
                         "<p>Equal for every method: " + "; ".join(esc(x) for x in fair["equalised"]) + ".</p>"
                         "<p>Not equal: " + "; ".join(esc(x) for x in fair["differs"]) + ".</p>")
    tuning = (results.get("tuning") or {}).get("methods") or {}
    if tuning:
        rows = ""
        for method, t in tuning.items():
            for trial in t["trials"]:
                chosen = all(trial.get(k) == v for k, v in t["chosen"].items())
                cells = [method, _fmt(trial.get("learning_rate"), ".3g"), _fmt(trial.get("beta"), ".3g"),
                         _fmt(trial.get("validation_reward")), _fmt(trial.get("validation_kl"), ".2f"),
                         "chosen" if chosen else (trial.get("error") or "")]
                rows += "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"
        fairness_html += ("<table><tr><th>method</th><th>learning rate</th><th>KL coefficient</th>"
                          "<th>validation reward</th><th>validation KL</th><th></th></tr>" + rows + "</table>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>alignlab compare: {esc(results['task'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; font-size: 14px; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; margin: 0.5em 0; }}
.samples td {{ max-width: 260px; }} .c {{ white-space: pre-wrap; }} .r {{ color: #666; font-size: 12px; }}
.p {{ font-style: italic; }} .verdict {{ font-size: 16px; }}
</style></head><body>
<h1>alignlab compare: {esc(results['task'])} ({esc(results['preset'])} preset)</h1>
<p>{esc(results['description'])}</p>
{verdict}
<h2>Held-out results</h2>
<table><tr>{''.join(f'<th>{esc(h)}</th>' for h in RESULT_HEADERS)}</tr>{table}</table>
<p>Mean reward over sampled completions of the held-out prompts with a 95% normal-approximation interval; win rate
against the base model by reward, ties counted half; KL to the base model as the sampled estimate
mean(sum_t log pi - log pi_base) in nats per completion; wall time and peak resident memory of each method's
training process (ppo: its reward model's training added). With several seeds: every figure is the mean over
the seeds (wall time and tokens per run), the interval is over every seed's completions, and "over seeds" gives
the seeds' mean rewards' mean and sample standard deviation.</p>
{_img(bars)}{_img(scatter)}
<h2>Training curves</h2>
{_img(curves)}
{fairness_html}
<h2>Budget (the same for every method)</h2>
<table>{budget}</table>
<p>{_pairs_sentence(results['pairs'])}</p>
<h2>Completions for the same held-out prompts</h2>
{samples_html}
<p>Whole run: {results['wall_seconds']:.0f} s.</p>
</body></html>
"""
    path = out / "report.html"
    write_text_atomic(path, page)
    return path

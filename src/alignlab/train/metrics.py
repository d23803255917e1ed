"""``metrics.jsonl`` and the plots drawn from it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per logged step, each with ``step``.

    Training rows carry TRL's metric names (``loss``, ``rewards/margins``, ...); evaluation rows carry the
    same names with an ``eval_`` prefix. Each row is flushed as it is written, so a crash loses nothing
    already logged.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, allow_nan=True) + "\n")
            handle.flush()

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (used when resuming from a checkpoint at ``step``)."""
        kept = [r for r in self.rows() if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)


def plot_metrics(rows: list[dict], out_dir: str | os.PathLike, panels: dict[str, list[str]]) -> list[Path]:
    """Draw one PNG per panel: each listed metric against ``step``, train as lines, ``eval_`` as markers.

    Args:
        rows: rows of ``metrics.jsonl``.
        out_dir: folder for the PNGs (created).
        panels: file stem -> metric names, e.g. ``{"rewards": ["rewards/chosen", "rewards/rejected"]}``.

    Returns:
        Paths of the PNGs written (panels with no data are skipped).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, names in panels.items():
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        drew = False
        for i, name in enumerate(names):
            color = f"C{i}"
            for key, style in ((name, "-"), (f"eval_{name}", "o--")):
                pts = [
                    (r["step"], r[key])
                    for r in rows
                    if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])
                ]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, color=color, label=key, markersize=4, linewidth=1.5)
                drew = True
        if not drew:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_title(stem.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{stem}.png"
        tmp = out / f".{stem}.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written

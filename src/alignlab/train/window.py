"""The logging window of the training loop: what was measured since the last ``metrics.jsonl`` row, reduced to
the next row (means over the window, token counts and rates summed over processes)."""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class MetricsWindow:
    """Per-example metrics, tokens and training time since the last logged row.

    Args:
        gather: ``tensor (n,) -> tensor (n * processes,)`` on the CPU (accelerate's gather, or the identity).
        num_tokens: tokens through the training passes before this run (a resumed run's last ``num_tokens``).
    """

    def __init__(self, gather, num_tokens: int = 0):
        self._gather = gather
        self.values: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.tokens = 0  # this process's, since the last row
        self.train_seconds = 0.0  # this process's time in the updates (online), since the last row
        self.num_tokens = num_tokens  # TRL's name: every process's tokens since the start
        self.finite_only: set[str] = set()  # metrics whose NaN / infinite values the means leave out
        self.start = time.perf_counter()

    def add(self, name: str, value) -> None:
        """Record ``value`` (a scalar or ``(B,)`` per-example values) of metric ``name`` from every process."""
        value = torch.as_tensor(value).detach().float().reshape(-1)
        self.values[name].append(self._gather(value))

    def add_all(self, metrics: dict) -> None:
        for name, value in metrics.items():
            self.add(name, value)

    def restart_clock(self) -> None:
        """Exclude the time since the last row from the rates (evaluation, checkpointing)."""
        self.start = time.perf_counter()

    def means(self) -> dict[str, float]:
        """Each metric's mean over the window (every process's values); a metric in :attr:`finite_only`
        averages its finite values only (transformers' ``logging_nan_inf_filter``) and is left out of the row
        when it has none."""
        out = {}
        for name, values in self.values.items():
            merged = torch.cat(values) if values else torch.empty(0)
            if name in self.finite_only:
                merged = merged[torch.isfinite(merged)]
            if merged.numel():
                out[name] = merged.mean().item()
        return out

    def row(self, *, online: bool) -> dict[str, float]:
        """The window's means plus ``tokens_per_second`` (all processes' tokens per second of the window),
        ``tokens_per_second/train`` when ``online`` (per second spent in the updates, summed over processes) and
        ``num_tokens``; then the window starts afresh. Every process must call it (it gathers)."""
        elapsed = time.perf_counter() - self.start
        per_process = torch.tensor([[float(self.tokens), self.tokens / self.train_seconds if self.train_seconds else 0.0]])
        tokens, train_rate = self._gather(per_process.reshape(-1)).reshape(-1, 2).sum(0).tolist()
        row = self.means()
        row["tokens_per_second"] = tokens / elapsed if elapsed > 0 else 0.0
        if online:
            row["tokens_per_second/train"] = train_rate
        self.num_tokens += int(tokens)
        row["num_tokens"] = self.num_tokens
        self.values.clear()
        self.tokens = 0
        self.train_seconds = 0.0
        self.restart_clock()
        return row

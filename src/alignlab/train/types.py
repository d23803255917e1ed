"""What crosses the boundary between an algorithm and the training loop: an online algorithm's
:class:`Rollout` (what its ``rollout_fn`` returns for one step) and a finished run's :class:`TrainResult`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Rollout:
    """What an online algorithm's ``rollout_fn(model, prompts, step)`` returns for one ``global_step``.

    Attributes:
        updates: optimizer updates in order; each is a list of micro-batches (dicts for ``loss_fn``) whose
            gradients are summed into one optimizer step. Each micro-batch's loss is weighted by
            ``1 / len(update)``, so an update's gradient is the mean over its micro-batches.
        metrics: ``{name: (N,) or scalar}`` detached values measured while sampling and scoring
            (``objective/scores``, ``time/generation``, ...); logged as means over the logging window.
        samples: rows to append to ``samples.jsonl`` (main process; may be empty).
        scalars: values every micro-batch of the rollout is given as well (``batch[name]``), such as GRPO's
            token count per micro-batch, so they need not be copied onto every row.
    """

    updates: list[list[dict[str, Any]]]
    metrics: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    scalars: dict[str, float] = field(default_factory=dict)


RolloutFn = Callable[[torch.nn.Module, list, int], Rollout]
"""``rollout_fn(model, prompts, step) -> Rollout``: called without gradients, ``step`` the 1-based
``global_step`` being built; ``model`` is the prepared (possibly DDP-wrapped) model."""


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    metrics_path: Path
    plots: list[Path]
    global_step: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0

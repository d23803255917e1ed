"""Where ``alignlab compare`` puts everything in its ``output_dir``; the one definition the stages, the
report and the tests read::

    train.jsonl, eval.jsonl     the task's training and held-out prompts
    pairs.jsonl, pairs.json     offline preference pairs sampled from the base model, and how they were made
    pairs/seed-<seed>.jsonl     with ``--seeds K`` > 1: each seed's own pairs (and ``.json``), drawn with that seed
    <method>/args.yaml          the flags the method was run with (``alignlab <command> --config`` this file)
    <method>/model/             its output_dir (model, metrics.jsonl, plots/)
    <method>/log.txt            its stdout and stderr
    <method>/error.txt          its one-line error, when it failed
    <method>/result.json        status, error, wall time, peak RSS, tokens processed
    <method>/eval.json          its held-out figures (base/eval.json for the base model)
    results.json                {"task", "preset", "budget", "methods": {"base": {...}, "dpo": {...}, ...}}
    <method>/seed-<seed>/...    with ``--seeds K`` > 1: each seed's run (args.yaml, model/, log.txt, result.json,
                                eval.json) one level down (:func:`run_name`)
    <method>/calibration/...    with ``--budget``: the short run that measured the method's cost per step
    report.html, *.png          the report (self-contained: images embedded) and its plots

Every training command writes ``metrics.jsonl`` at the top of its output_dir (multi-round pipelines too, their
rounds' rows numbered on), so a method's curve and token count are read the same way for every method.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """Paths of one ``compare`` run rooted at ``root``."""

    root: Path

    @property
    def train_prompts(self) -> Path:
        return self.root / "train.jsonl"

    @property
    def eval_prompts(self) -> Path:
        return self.root / "eval.jsonl"

    def pairs(self, seed: int, seeds: list[int]) -> Path:
        """The offline pairs the runs with ``seed`` train on: ``pairs.jsonl`` when ``compare`` trains one seed, else
        ``pairs/seed-<seed>.jsonl`` (each seed draws its own, so the seeds average the pairs' noise too)."""
        return self.root / "pairs.jsonl" if len(seeds) == 1 else self.root / "pairs" / f"seed-{seed}.jsonl"

    def pairs_info(self, seed: int, seeds: list[int]) -> Path:
        """How :meth:`pairs` were made (``pairs.json`` or ``pairs/seed-<seed>.json``)."""
        return self.pairs(seed, seeds).with_suffix(".json")

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    def method_dir(self, name: str) -> Path:
        """The folder of a method (or stage, or ``base``)."""
        return self.root / name

    def model_dir(self, name: str) -> Path:
        """The method's output_dir: its model, ``metrics.jsonl`` and plots."""
        return self.root / name / "model"

    def args(self, name: str) -> Path:
        return self.root / name / "args.yaml"

    def log(self, name: str) -> Path:
        return self.root / name / "log.txt"

    def error(self, name: str) -> Path:
        return self.root / name / "error.txt"

    def result(self, name: str) -> Path:
        return self.root / name / "result.json"

    def evaluation(self, name: str) -> Path:
        return self.root / name / "eval.json"


def run_name(method: str, seed: int, seeds: list[int]) -> str:
    """The name (folder under the root) of ``method``'s training run with ``seed``: ``method`` itself when
    ``compare`` trains one seed (the single-seed layout), else ``<method>/seed-<seed>``."""
    return method if len(seeds) == 1 else f"{method}/seed-{seed}"


def calibration_name(method: str) -> str:
    """The name of ``method``'s calibration run (``compare --budget``)."""
    return f"{method}/calibration"


def read_metrics(model_dir: str | Path) -> list[dict]:
    """The ``metrics.jsonl`` rows of a training command's output_dir (empty when it has none)."""
    path = Path(model_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

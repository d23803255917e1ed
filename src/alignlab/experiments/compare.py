"""``alignlab compare``: several alignment methods trained side by side from the same base model, on the same
prompts, the same reward and the same budget, evaluated the same way, with a report.

Stages: the task's prompts; offline preference pairs sampled from the base model (best against worst
completion by reward: the data of the offline methods and of reward models); each method's training; the
held-out evaluation of every model; the report. What goes where in ``output_dir`` is
:mod:`alignlab.experiments.layout`. The methods and how each is run from the shared budget come from the method
registry (:mod:`alignlab.methods`).

Each method runs as its own process (``python -m alignlab.cli <command> --config <method>/args.yaml``), so its
wall time and peak resident memory are its own (``os.wait4``'s ``ru_maxrss``) and a failure stays its own: it is
marked failed with its one-line error (what it wrote to ``error.txt``, else the last line of its log that is
not a progress bar), and the other methods' results stand. ``--resume`` reuses every
stage that finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from alignlab.data.io import write_text_atomic
from alignlab.errors import ERROR_FILE_ENV, UserError
from alignlab.experiments.layout import RunLayout, calibration_name, read_metrics, run_name
from alignlab.methods import CompareBudget
from alignlab.rollout import engines
from alignlab.train.config import check_ranges, resolve_bf16
from alignlab.train.output_dir import check_writable

logger = logging.getLogger(__name__)

PRESET_ONLY = ("methods", "max_new_tokens_cap", "method_values", "method_values_source")
"""Preset entries that are not :class:`CompareConfig` fields: the preset's methods, its completion cap, and each
method's learning rate and KL coefficient (``method_values``, with where they come from)."""

PRESETS: dict[str, dict[str, Any]] = {
    # about three minutes on 2 CPU cores with a tiny model (the CI test); numbers are not meaningful
    "smoke": dict(num_train_prompts=16, num_eval_prompts=8, samples_per_prompt=2, eval_samples_per_prompt=1,
                  max_steps=2, prompts_per_step=4, num_generations=2, max_new_tokens=16, num_ppo_epochs=1,
                  learning_rate=None, max_new_tokens_cap=None, seeds=1,
                  methods=("dpo", "ppo", "ppo-rule", "grpo", "online-dpo")),
    # the embedded 135M model within 15 minutes on 2 CPU cores with native bf16 (benchmarks/README.md, "The main
    # job"): small steps, short completions, one PPO epoch; two seeds, because one seed's ranking did not hold on
    # the next seed (the verdict resamples them with the prompts); each method's learning rate and KL coefficient
    # from an offline `--tune lr,beta` sweep on a validation split of training prompts (benchmarks/README.md,
    # "Tuning the default preset"; `beta` is PPO's kl_coef)
    "default": dict(num_train_prompts=32, num_eval_prompts=64, samples_per_prompt=4, eval_samples_per_prompt=2,
                    base_eval_samples_per_prompt=8, max_steps=8, prompts_per_step=4, num_generations=4,
                    max_new_tokens=None, num_ppo_epochs=1, max_new_tokens_cap=40, learning_rate=None, seeds=2,
                    methods=("dpo", "ppo", "ppo-rule", "grpo", "online-dpo"),
                    method_values={"dpo": {"learning_rate": 2e-5, "beta": 0.1},
                                   "ppo": {"learning_rate": 1e-5, "beta": 0.025},
                                   "ppo-rule": {"learning_rate": 2e-5, "beta": 0.025},
                                   "grpo": {"learning_rate": 8e-5, "beta": 0.0},
                                   "online-dpo": {"learning_rate": 1e-5, "beta": 0.1}},
                    method_values_source="chosen per method by an offline `alignlab compare --tune lr,beta` sweep on "
                    "a validation split of training prompts, never the held-out ones (benchmarks/README.md, "
                    "\"Tuning the default preset\")"),
    # a GPU: the whole task
    "full": dict(num_train_prompts=None, num_eval_prompts=None, samples_per_prompt=8, eval_samples_per_prompt=4,
                 base_eval_samples_per_prompt=16, max_steps=200, prompts_per_step=16, num_generations=8,
                 max_new_tokens=None, num_ppo_epochs=4,
                 learning_rate=None, max_new_tokens_cap=None, seeds=3,
                 methods=("dpo", "simpo", "kto", "ppo", "ppo-rule", "grpo", "rloo", "reinforce-pp", "online-dpo",
                          "iterative-dpo")),
}

@dataclass
class CompareConfig:
    """Settings of ``alignlab compare``. Unset sizes come from ``--preset``."""

    output_dir: str | None = None
    """Where the pairs, the trained models, results.json and report.html go."""
    task: str = "kid-stories"
    """A built-in task (kid-stories, arithmetic) or a prompts file (rows with a ``prompt``; give --reward_funcs)."""
    preset: Literal["smoke", "default", "full"] = "default"
    """Sizes: smoke (a tiny model, about three minutes on 2 CPU cores), default (the embedded model, two seeds,
    within 15 minutes on 2 CPU cores with native bf16), full (for a GPU)."""
    methods: list[str] | None = None
    """Methods to train (``alignlab.methods``: dpo, ppo, ppo-rule, grpo, online-dpo, iterative-dpo, ...) or the
    groups all, all-online, all-offline (default: the preset's)."""
    model_name_or_path: str | None = None
    """The base model every method starts from (default: the embedded SmolLM2-135M-Instruct)."""
    reward_funcs: list[str] | None = None
    """Reward functions (``path/to/file.py:name`` or ``module:name``): required with a prompts file, and
    replace a built-in task's reward when given."""
    reward_weights: list[float] | None = None
    """One weight per reward function."""
    num_train_prompts: int | None = None
    """Training prompts (default: the preset's; all of the task's with ``full``)."""
    num_eval_prompts: int | None = None
    """Held-out prompts for the evaluation."""
    samples_per_prompt: int | None = None
    """K: completions sampled per training prompt from the base model to build the pairs."""
    eval_samples_per_prompt: int | None = None
    """Completions per held-out prompt and model in the evaluation."""
    base_eval_samples_per_prompt: int | None = None
    """Completions per held-out prompt of the base model (default: the preset's, else --eval_samples_per_prompt).
    Every "above the base" comparison rests on the base's per-prompt means, so the preset samples it more than
    the trained models: one model's sampling narrows every comparison against the base."""
    max_steps: int | None = None
    """Optimizer steps per method (iterative-dpo: split over its 2 rounds)."""
    budget: str | None = None
    """Instead of --max_steps, what each method may spend: training tokens (``200000tokens``: the loop's
    ``num_tokens``) or seconds of training (``600s``; loading, saving and evaluation not counted). A short
    calibration run of each method (``<method>/calibration``) measures its tokens and seconds per step, and the
    method then trains for as many steps as the budget buys (at least its minimum)."""
    seeds: int | None = None
    """Train every method this many times, with seeds seed, seed+1, ... (default: the preset's; 3 for full):
    the table reports each method's mean and spread over seeds, the verdict compares over prompts and seeds."""
    prompts_per_step: int | None = None
    """Prompts (dpo: pairs) per step for every method: the shared budget."""
    num_generations: int | None = None
    """Completions per prompt of GRPO (its group), of Online DPO (the best and the worst of them pair up) and of
    PPO (each scored on its own, against the value model's baseline)."""
    max_new_tokens: int | None = None
    """Completion budget in tokens, for sampling in every stage (default: the task's)."""
    num_ppo_epochs: int | None = None
    """PPO's passes over each rollout (TRL's ``num_ppo_epochs``; default: the preset's)."""
    learning_rate: float | None = None
    """One learning rate for every method (default: the default preset's per-method values, tuned offline;
    otherwise 5e-6 for the DPO family and 1e-5 for PPO and GRPO)."""
    temperature: float = 1.0
    """Sampling temperature of every stage (pairs, online training, evaluation)."""
    eval_split_size: float = 0.2
    """With a prompts file: the fraction held out for the evaluation."""
    resume: bool = False
    """Reuse the stages a previous run in ``output_dir`` finished (pairs, each method, each evaluation)."""
    seed: int = 42
    generation_backend: str = "auto"
    """How completions are sampled (docs/rollouts.md): ``generate`` (transformers ``generate``, dynamic KV
    cache), ``static`` (static KV cache, compiled decode step), ``paged`` (transformers' continuous batching,
    paged KV cache) or ``auto`` (the fastest measured on the device type),
    for every stage: the pairs, the online methods' runs and the evaluation."""
    bf16: bool | None = None
    """bf16 autocast; unset: on where bf16 matrix products are fast (``alignlab.train.config.fast_bf16_available``)."""
    trust_remote_code: bool = False
    tune: list[str] | None = None
    """Tune these per method before the final runs (``learning_rate``/``lr``, ``beta``/``kl``: each method's KL
    coefficient), on a validation split of the training prompts, never the held-out ones
    (:mod:`alignlab.experiments.tuning`; docs/compare.md)."""
    tune_factors: list[float] | None = None
    """Multiples of each method's starting value tried by ``--tune`` (default 0.5 1 2)."""
    tune_steps: int | None = None
    """Steps of each tuning trial (default: half of ``--max_steps``, at least 1)."""
    tune_validation_size: float = 0.25
    """Fraction of the training prompts held out as the validation split of ``--tune``."""

    def __post_init__(self) -> None:
        from alignlab.experiments.tuning import parse_tune

        check_ranges(self)
        self.bf16 = resolve_bf16(self.bf16)
        self.tune = parse_tune(self.tune) or None
        self.tune_factors = [float(f) for f in (self.tune_factors or [0.5, 1.0, 2.0])]
        if any(not f > 0 for f in self.tune_factors):
            raise UserError(f"--tune_factors must all be > 0, got {self.tune_factors}")
        if not 0 < self.tune_validation_size < 1:
            raise UserError(f"--tune_validation_size must be in (0, 1), got {self.tune_validation_size}")
        if not self.output_dir:
            raise UserError("--output_dir is required")
        check_writable(self.output_dir)
        if self.budget is not None:
            if self.tune:
                raise UserError("--tune trains every trial for --tune_steps steps: give --max_steps, not --budget")
            if self.max_steps is not None:
                raise UserError("give --budget or --max_steps, not both")
            parse_budget(self.budget)
        preset = PRESETS[self.preset]
        for name, value in preset.items():
            if name not in PRESET_ONLY and getattr(self, name, None) is None:
                setattr(self, name, value)
        from alignlab.methods import compare_entries, method_groups

        groups, known = method_groups(), compare_entries()
        self.methods = [m for name in (self.methods or preset["methods"]) for m in groups.get(name, [name])]
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise UserError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(known)} "
                            f"or a group ({', '.join(groups)})")
        if len(set(self.methods)) != len(self.methods):
            raise UserError("--methods: a method is listed twice")
        for name in self.methods:
            if self.max_steps < known[name][1].min_steps:
                raise UserError(f"{name} splits its budget over {known[name][1].min_steps} parts: "
                                f"give --max_steps >= {known[name][1].min_steps}")
        for name in ("samples_per_prompt", "num_generations"):
            if getattr(self, name) < 2:
                raise UserError(f"--{name} must be >= 2, got {getattr(self, name)}")
        if self.tune_steps is None:
            self.tune_steps = max(1, self.max_steps // 2)
        if self.base_eval_samples_per_prompt is None:
            self.base_eval_samples_per_prompt = self.eval_samples_per_prompt
        for name in ("max_steps", "prompts_per_step", "eval_samples_per_prompt", "base_eval_samples_per_prompt",
                     "seeds", "tune_steps", "num_ppo_epochs"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_train_prompts", "num_eval_prompts", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.eval_split_size < 1:
            raise UserError(f"--eval_split_size must be in (0, 1), got {self.eval_split_size}")
        if self.generation_backend not in engines.BACKENDS:
            raise UserError(f"--generation_backend must be one of {', '.join(engines.BACKENDS)}, "
                            f"got {self.generation_backend!r}")


CALIBRATION_STEPS = 3
"""Steps of a ``--budget`` calibration run; the first step (warm-up) is left out of the seconds per step."""

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(tokens|s)\s*$")


def parse_budget(text: str) -> tuple[str, float]:
    """``"200000tokens"`` -> ``("tokens", 200000.0)``; ``"600s"`` -> ``("seconds", 600.0)``.

    Raises:
        UserError: anything else, or an amount of 0.
    """
    match = _BUDGET.match(str(text))
    if not match or not float(match.group(1)) > 0:
        raise UserError(f"--budget {text!r}: give training tokens (200000tokens) or seconds (600s), more than 0")
    return ("tokens" if match.group(2) == "tokens" else "seconds"), float(match.group(1))


def cost_per_step(rows: list[dict]) -> dict[str, float]:
    """Tokens and wall seconds per optimizer step from a run's ``metrics.jsonl`` rows (one row per step): tokens
    from the last ``num_tokens`` over the steps, seconds from each row's tokens over its ``tokens_per_second``
    (the time of that step), the first step left out when there are more.

    Raises:
        ValueError: no training rows with ``num_tokens`` and ``tokens_per_second``.
    """
    rows = [r for r in rows if "num_tokens" in r and r.get("tokens_per_second")]
    if not rows:
        raise ValueError("the calibration run logged no tokens")
    seconds, previous = [], 0
    for row in rows:
        seconds.append((row["num_tokens"] - previous) / row["tokens_per_second"])
        previous = row["num_tokens"]
    timed = seconds[1:] or seconds
    return {"steps": rows[-1]["step"], "tokens_per_step": rows[-1]["num_tokens"] / rows[-1]["step"],
            "seconds_per_step": sum(timed) / len(timed)}


def steps_for_budget(budget: str, cost: dict[str, float], min_steps: int = 1) -> int:
    """Optimizer steps that ``budget`` buys at ``cost`` (:func:`cost_per_step`), at least ``min_steps``."""
    kind, amount = parse_budget(budget)
    per_step = cost["tokens_per_step"] if kind == "tokens" else cost["seconds_per_step"]
    return max(min_steps, int(amount // per_step) if per_step > 0 else min_steps)


def _write_jsonl(rows: list[dict], path: Path) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _write_json(data: Any, path: Path) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


_PROGRESS_BAR = re.compile(r"\d+%\|.*\|")


def last_line(text: str) -> str:
    """The last non-empty line of a process's output that is not a progress bar (carriage returns count as line
    breaks): alignlab's one-line error, or the last line of a traceback, when it failed."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    lines = [line for line in lines if not _PROGRESS_BAR.search(line)]
    return lines[-1] if lines else ""


def run_process(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``argv`` with its stdout and stderr in ``log_path`` (and ``env`` added to the environment); returns
    ``{"returncode", "wall_seconds", "peak_rss_bytes"}`` (peak resident set of the process and the children it
    waited for, ``os.wait4``'s ``ru_maxrss``, KiB on Linux)."""
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return {"returncode": proc.returncode, "wall_seconds": time.perf_counter() - start,
            "peak_rss_bytes": int(usage.ru_maxrss) * 1024}


def _abs_reward_specs(specs: list[str] | None) -> list[str] | None:
    """``file.py:name`` specs made absolute (the method processes may run elsewhere); module specs as they are."""
    out = []
    for spec in specs or []:
        target, _, name = spec.rpartition(":")
        out.append(f"{os.path.abspath(os.path.expanduser(target))}:{name}" if target.endswith(".py") else spec)
    return out or None


class Compare:
    """Runs the stages of ``alignlab compare``; see the module docstring.

    Raises:
        UserError / DataError: bad flags, an unreadable task or model, a failing reward function while the
            pairs are built (a method's own failure is recorded, not raised).
    """

    def __init__(self, config: CompareConfig):
        from alignlab.tasks import resolve_task

        from alignlab.methods import compare_entries

        self.config = cfg = config
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.layout = RunLayout(self.out)
        self.entries = compare_entries(include_stages=True)
        # a built-in task's split is the task's own (seed 0), the same as `alignlab evaluate --task` uses
        train = resolve_task(cfg.task, "train", reward_funcs=cfg.reward_funcs, reward_weights=cfg.reward_weights)
        if not train.reward_funcs:
            raise UserError(f"--task {cfg.task}: a prompts file needs --reward_funcs")
        self.description = train.description
        self.reward_funcs = _abs_reward_specs(train.reward_funcs)
        self.reward_weights = train.reward_weights
        preset = PRESETS[cfg.preset]
        cap = preset["max_new_tokens_cap"]
        self.max_new_tokens = cfg.max_new_tokens or min(train.max_new_tokens, cap or train.max_new_tokens)
        from alignlab.tasks import TASKS

        if cfg.task in TASKS:
            train_rows = train.rows
            eval_rows = resolve_task(cfg.task, "test").rows
        else:
            from alignlab.train.setup import split_rows

            train_rows, eval_rows = split_rows(train.rows, cfg.eval_split_size, cfg.seed)
        self.train_rows = train_rows[: cfg.num_train_prompts] if cfg.num_train_prompts else train_rows
        self.eval_rows = eval_rows[: cfg.num_eval_prompts] if cfg.num_eval_prompts else eval_rows
        if len(self.train_rows) < cfg.prompts_per_step:
            raise UserError(f"--prompts_per_step {cfg.prompts_per_step} is more than the {len(self.train_rows)} "
                            "training prompts")
        values = preset.get("method_values", {})
        self.values_source = preset.get("method_values_source") if values else None
        # --learning_rate, else the preset's value for the method, else the method's default
        self.lr = {name: cfg.learning_rate or values.get(name, {}).get("learning_rate") or entry.learning_rate
                   for name, (_, entry) in self.entries.items()}
        # each method's KL coefficient: the preset's, or once --tune has chosen it (else the method's default)
        self.kl: dict[str, float] = {m: v["beta"] for m, v in values.items() if "beta" in v}
        self.tuning: dict[str, Any] = {}
        self.seeds = [cfg.seed + k for k in range(cfg.seeds)]
        self.seed = cfg.seed  # the seed of the runs being built
        self.steps: dict[str, int] = {}  # --budget: each method's steps, from its calibration run
        self.stages: dict[str, dict[str, Any]] = {}  # --tune's stages (by run name), on tuning-train pairs only

    def run_name(self, method: str) -> str:
        """The run folder of ``method`` (or a stage) for the current seed (:func:`~.layout.run_name`)."""
        return run_name(method, self.seed, self.seeds)

    # ---------------------------------------------------------------- stage 1: prompts and pairs
    def _write_prompts(self) -> None:
        _write_jsonl([row for _, row in self.train_rows], self.layout.train_prompts)
        _write_jsonl([row for _, row in self.eval_rows], self.layout.eval_prompts)

    def _pairs(self) -> dict[str, Any]:
        """Sample K completions per training prompt from the base model and write best-vs-worst pairs
        (:meth:`sample_pairs`), one draw per seed, each with its seed, or reuse them with ``--resume``. Returns
        the draw's figures with one seed; with several, ``pairs`` (the mean number), ``prompts``,
        ``samples_per_prompt``, ``base_mean_reward`` (the mean), ``wall_seconds`` (the sum) and ``seeds`` (each
        draw's figures)."""
        cfg = self.config
        draws = {}
        for seed in self.seeds:
            path, info_path = self.layout.pairs(seed, self.seeds), self.layout.pairs_info(seed, self.seeds)
            info = _read_json(info_path)
            if cfg.resume and path.exists() and info:
                logger.info("pairs: reusing %s (%d pairs)", path, info["pairs"])
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                info = self.sample_pairs(self.train_rows, path, samples_per_prompt=cfg.samples_per_prompt, seed=seed,
                                         progress="sampling pairs" + (f" (seed {seed})" if len(self.seeds) > 1 else ""))
                _write_json(info, info_path)
            draws[seed] = info
        if len(draws) == 1:
            return next(iter(draws.values()))
        infos = list(draws.values())
        return {"pairs": sum(i["pairs"] for i in infos) / len(infos), "prompts": infos[0]["prompts"],
                "samples_per_prompt": cfg.samples_per_prompt,
                "base_mean_reward": sum(i["base_mean_reward"] for i in infos) / len(infos),
                "wall_seconds": sum(i["wall_seconds"] for i in infos), "seeds": {str(s): i for s, i in draws.items()}}

    def sample_pairs(self, rows: list, path: Path, *, samples_per_prompt: int, seed: int,
                     progress: str = "sampling pairs") -> dict[str, Any]:
        """Sample ``samples_per_prompt`` completions of each prompt of ``rows`` (``(location, row)``) from the base
        model (the run's completion cap, temperature, precision and generation backend; torch seeded with
        ``seed``), score them with the task's reward and write each prompt's best against its worst to ``path``
        (prompts whose completions all tie give none). Returns ``{"pairs", "prompts", "samples_per_prompt",
        "base_mean_reward", "wall_seconds"}``.

        Raises:
            UserError: every prompt's completions tied (no pair).
        """
        from alignlab.data.prompts import build_prompt_examples
        from alignlab.models import load_causal_lm, load_tokenizer
        from alignlab.rollout.experience import sample_and_score_batches
        from alignlab.rollout.pairs import write_pairs
        from alignlab.rollout.rewards import build_reward_sources
        from alignlab.train.runtime import Runtime

        cfg = self.config
        start = time.perf_counter()
        tokenizer = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        examples, _ = build_prompt_examples(rows, tokenizer, max_prompt_length=512)
        sources = build_reward_sources(self.reward_funcs, self.reward_weights, with_reward_model=False)
        runtime = Runtime(cfg)  # one process on the device PyTorch finds, the config's precision
        device = runtime.device
        model = load_causal_lm(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code).to(device).eval()
        torch.manual_seed(seed)
        with torch.no_grad():
            parts = sample_and_score_batches(
                model, tokenizer, examples, sources, batch_size=16, progress=progress,
                precision_fn=runtime.precision,
                device=device, max_new_tokens=self.max_new_tokens, temperature=cfg.temperature,
                num_generations=samples_per_prompt, generation_backend=cfg.generation_backend,
            )
        n = write_pairs(parts, samples_per_prompt, path)
        scores = torch.cat([p.scores for p in parts])
        return {"pairs": n, "prompts": len(examples), "samples_per_prompt": samples_per_prompt,
                "base_mean_reward": float(scores.mean()), "wall_seconds": time.perf_counter() - start}

    # ---------------------------------------------------------------- stage 2: training
    def shared_budget(self, max_steps: int | None = None, *, prompts: Path | None = None,
                      pairs: Path | None = None, stages: dict[str, str] | None = None) -> CompareBudget:
        """The budget every method's run is built from (:class:`~alignlab.methods.CompareBudget`); ``max_steps``
        replaces ``--max_steps`` (a method's steps under ``--budget``), ``prompts`` and ``pairs`` the training
        prompts and pairs files, ``stages`` the run names of the stages it reads (``--tune``'s trials train on
        the tuning-train part only, with a reward model trained on it)."""
        cfg = self.config
        stages = stages or {}
        return CompareBudget(
            prompts=str(prompts or self.layout.train_prompts),
            pairs=str(pairs or self.layout.pairs(self.seed, self.seeds)),
            max_steps=max_steps or cfg.max_steps,
            prompts_per_step=cfg.prompts_per_step, max_new_tokens=self.max_new_tokens, temperature=cfg.temperature,
            num_generations=cfg.num_generations, num_ppo_epochs=cfg.num_ppo_epochs,
            samples_per_prompt=cfg.samples_per_prompt, reward_funcs=self.reward_funcs,
            reward_weights=self.reward_weights,
            stage_model=lambda name: str(self.layout.model_dir(stages.get(name) or self.run_name(name))),
        )

    def method_args(self, method: str, trial: dict[str, Any] | None = None) -> dict[str, Any]:
        """The flags of one method's run for the current seed (written to its ``args.yaml``): the shared ones, then
        the method's own from its registry entry, then its learning rate and KL coefficient (the preset's or the
        ones ``--tune`` chose). ``trial``: a ``--tune`` trial's ``steps``, ``prompts``, ``pairs``, ``values`` and
        ``stages`` (the run names of its reward model) instead."""
        from alignlab.experiments.tuning import kl_flag

        cfg = self.config
        trial = trial or {}
        steps = trial.get("steps") or self.steps.get(method, cfg.max_steps)
        args: dict[str, Any] = {
            "model_name_or_path": cfg.model_name_or_path, "output_dir": str(self.layout.model_dir(self.run_name(method))),
            "seed": self.seed, "bf16": cfg.bf16, "max_steps": steps, "save_steps": 0, "logging_steps": 1,
            "learning_rate": self.lr[method], "trust_remote_code": cfg.trust_remote_code,
            "overwrite_output_dir": True,  # compare's own folder: a failed or earlier run of it is trained again
        }
        args.update(self.entries[method][1].args(
            self.shared_budget(steps, prompts=trial.get("prompts"), pairs=trial.get("pairs"),
                               stages=trial.get("stages"))))
        values = {"learning_rate": self.lr[method], **({"beta": self.kl[method]} if method in self.kl else {}),
                  **trial.get("values", {})}
        flag = kl_flag(self.entries[method][0].config)
        args["learning_rate"] = values["learning_rate"]
        if "beta" in values and flag:
            args[flag] = values["beta"]
        if cfg.generation_backend != "auto" and "generation_backend" in {
                f.name for f in dataclasses.fields(self.entries[method][0].config)}:
            args["generation_backend"] = cfg.generation_backend  # the methods that sample
        return {k: v for k, v in args.items() if v is not None}

    def _run_stage(self, method: str, name: str | None = None, trial: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train one stage in its own process (or reuse it with ``--resume``) as run ``name`` (default: the
        method's run for the current seed; ``trial``: a ``--tune`` trial, :meth:`method_args`); returns its
        ``result.json``."""
        layout, command = self.layout, self.entries[method][0].command
        name = name or self.run_name(method)
        result_path = layout.result(name)
        done = _read_json(result_path)
        if self.config.resume and done and done.get("status") == "ok":
            logger.info("%s: finished before, reusing %s", name, layout.model_dir(name))
            return done
        layout.method_dir(name).mkdir(parents=True, exist_ok=True)
        layout.evaluation(name).unlink(missing_ok=True)  # a retrained model invalidates its old evaluation
        layout.error(name).unlink(missing_ok=True)
        args = {**self.method_args(method, trial), "output_dir": str(layout.model_dir(name))}
        layout.args(name).write_text(yaml.safe_dump(args, sort_keys=False), encoding="utf-8")
        argv = [sys.executable, "-m", "alignlab.cli", command, "--config", str(layout.args(name))]
        logger.info("%s: training (alignlab %s --config %s; log %s)", name, command, layout.args(name),
                    layout.log(name))
        run = run_process(argv, layout.log(name), env={ERROR_FILE_ENV: str(layout.error(name))})
        result: dict[str, Any] = {"status": "ok" if run["returncode"] == 0 else "failed",
                                  "command": f"alignlab {command} --config {layout.args(name)}",
                                  "wall_seconds": run["wall_seconds"], "peak_rss_bytes": run["peak_rss_bytes"],
                                  "model_dir": str(layout.model_dir(name)), "seed": self.seed,
                                  "max_steps": args["max_steps"]}
        if run["returncode"] != 0:
            result["error"] = self._error(name, run["returncode"])
            logger.info("%s: FAILED after %.0f s: %s", name, run["wall_seconds"], result["error"])
        else:
            rows = read_metrics(layout.model_dir(name))
            result["num_tokens"] = int(rows[-1]["num_tokens"]) if rows and "num_tokens" in rows[-1] else None
            logger.info("%s: done in %.0f s, peak RSS %.2f GiB", method, run["wall_seconds"],
                        run["peak_rss_bytes"] / 2**30)
        _write_json(result, result_path)
        return result

    def _error(self, method: str, returncode: int) -> str:
        """A failed stage's one-line error: what its process recorded, else its log's last line that is not a
        progress bar, else its exit status."""
        recorded = self.layout.error(method)
        if recorded.exists() and recorded.read_text(encoding="utf-8").strip():
            return recorded.read_text(encoding="utf-8").strip().splitlines()[-1]
        log = self.layout.log(method).read_text(encoding="utf-8", errors="replace")
        return last_line(log) or f"exit status {returncode}"

    def _calibrate(self, method: str) -> dict[str, Any]:
        """``--budget``: a :data:`CALIBRATION_STEPS`-step run of ``method`` (its stages already trained), whose
        cost per step sets ``self.steps[method]``; returns the run's result with ``cost`` and ``steps`` added."""
        entry = self.entries[method][1]
        self.steps[method] = max(CALIBRATION_STEPS, entry.min_steps)
        name = calibration_name(method)
        run = self._run_stage(method, name)
        del self.steps[method]
        if run["status"] != "ok":
            return run
        cost = cost_per_step(read_metrics(self.layout.model_dir(name)))
        self.steps[method] = steps_for_budget(self.config.budget, cost, entry.min_steps)
        logger.info("%s: %.0f tokens and %.1f s per step: %d steps for --budget %s", method, cost["tokens_per_step"],
                    cost["seconds_per_step"], self.steps[method], self.config.budget)
        return {**run, "cost": cost, "steps": self.steps[method]}

    def train(self, method: str) -> dict[str, Any]:
        """One method's training for the current seed, after the stages it requires (a reward model for ``ppo``)
        and, with ``--budget``, its calibration run: wall times and token counts added up (the calibration's
        aside), the largest peak memory."""
        runs = []
        for stage in self.entries[method][1].requires:
            run = self._run_stage(stage)
            if run["status"] != "ok":
                return {**run, "error": f"{stage}: {run['error']}",
                        "model_dir": str(self.layout.model_dir(self.run_name(method)))}
            runs.append((stage, run))
        calibration = None
        if self.config.budget and method not in self.steps:
            calibration = self._calibrate(method)
            if calibration["status"] != "ok":
                return {**calibration, "error": f"calibration: {calibration['error']}"}
        result = dict(self._run_stage(method))
        if calibration is not None:
            result["calibration"] = {k: calibration[k] for k in ("cost", "steps", "wall_seconds")}
        for stage, run in runs:
            result["wall_seconds"] += run["wall_seconds"]
            result["peak_rss_bytes"] = max(result["peak_rss_bytes"], run["peak_rss_bytes"])
            result[f"{stage.replace('-', '_')}_seconds"] = run["wall_seconds"]
            if result.get("num_tokens") is not None and run.get("num_tokens") is not None:
                result["num_tokens"] += run["num_tokens"]
        return result

    # ---------------------------------------------------------------- stage 2b: tuning (--tune)
    def _tuning_data(self) -> dict[str, Any]:
        """Split the training prompts into ``tune/train.jsonl`` and ``tune/validation.jsonl`` and keep the pairs
        (``--seed``'s draw) of the tuning-train prompts in ``tune/pairs.jsonl``; returns the paths and sizes."""
        from alignlab.experiments.tuning import validation_split

        cfg = self.config
        folder = self.out / "tune"
        folder.mkdir(parents=True, exist_ok=True)
        train, validation = validation_split([row for _, row in self.train_rows], cfg.tune_validation_size, cfg.seed,
                                             cfg.prompts_per_step)
        keys = {json.dumps(row["prompt"], sort_keys=True) for row in train}
        drawn = self.layout.pairs(cfg.seed, self.seeds).read_text(encoding="utf-8")
        pairs = [json.loads(line) for line in drawn.splitlines() if line.strip()]
        kept = [p for p in pairs if json.dumps(p["prompt"], sort_keys=True) in keys]
        if not kept:
            raise UserError("--tune: no preference pair is left among the tuning-train prompts")
        paths = {"prompts": folder / "train.jsonl", "validation": folder / "validation.jsonl",
                 "pairs": folder / "pairs.jsonl"}
        _write_jsonl(train, paths["prompts"])
        _write_jsonl(validation, paths["validation"])
        _write_jsonl(kept, paths["pairs"])
        return {**paths, "train_prompts": len(train), "validation_prompts": len(validation), "pairs_kept": len(kept),
                "steps": cfg.tune_steps}

    def _validation_evaluator(self, data: dict[str, Any]):
        """An :class:`~alignlab.experiments.evaluate.Evaluator` on the validation prompts, the base model
        evaluated first (the trials' KL is measured against it)."""
        from alignlab.experiments.evaluate import EvaluateConfig, Evaluator

        cfg = self.config
        evaluator = Evaluator(EvaluateConfig(
            model_name_or_path=[cfg.model_name_or_path or "embedded:smollm2-135m-instruct"],
            dataset_name=str(data["validation"]), reward_funcs=self.reward_funcs, reward_weights=self.reward_weights,
            samples_per_prompt=cfg.eval_samples_per_prompt, base_samples_per_prompt=cfg.base_eval_samples_per_prompt,
            max_new_tokens=self.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed, bf16=cfg.bf16,
            trust_remote_code=cfg.trust_remote_code, generation_backend=cfg.generation_backend))
        evaluator.evaluate("base (validation)", cfg.model_name_or_path)
        return evaluator

    def _trial(self, method: str, values: dict[str, float], data: dict[str, Any], evaluator, index: int):
        """Train and validate one ``--tune`` trial of ``method`` (reused with ``--resume``)."""
        from alignlab.experiments.tuning import Trial

        name = f"{method}/tune-{index}"
        trial = Trial(values=dict(values), run=name)
        saved = _read_json(self.layout.evaluation(name))
        if self.config.resume and saved is not None and saved.get("values") == trial.values:
            trial.validation_reward, trial.validation_kl = saved["mean_reward"], saved["kl_to_base"]
            return trial
        stages = {stage: tune_stage_name(stage) for stage in self.entries[method][1].requires}
        run = self._run_stage(method, name, trial={"steps": data["steps"], "prompts": data["prompts"],
                                                   "pairs": data["pairs"], "values": values, "stages": stages})
        if run["status"] != "ok":
            trial.error = run.get("error", "failed")
            return trial
        figures = evaluator.evaluate(name, run["model_dir"])
        trial.validation_reward, trial.validation_kl = figures["mean_reward"], figures["kl_to_base"]
        _write_json({"values": trial.values, "mean_reward": trial.validation_reward,
                     "kl_to_base": trial.validation_kl}, self.layout.evaluation(name))
        logger.info("%s: %s -> validation reward %.4f, KL %.3f", name, values, trial.validation_reward,
                    trial.validation_kl)
        return trial

    def tune_method(self, method: str, data: dict[str, Any], evaluator):
        """``--tune`` for one method: the learning rate over the grid, then (``beta``) the KL coefficient at the
        best learning rate; sets the chosen values for the final runs and returns the
        :class:`~alignlab.experiments.tuning.MethodTuning`."""
        from alignlab.experiments.tuning import MethodTuning, default_value, grid, kl_flag

        cfg = self.config
        config_cls = self.entries[method][0].config
        flag = kl_flag(config_cls)
        start = {"learning_rate": self.lr[method]}
        if flag:
            start["beta"] = self.kl.get(method, default_value(config_cls, flag))
        tuning = MethodTuning(flag=flag, start=start)
        current = dict(start)
        for name in cfg.tune:
            if name == "beta" and not current.get("beta"):
                continue  # no KL term (e.g. GRPO's beta 0): nothing to scale
            candidates = []
            for value in grid(current[name], cfg.tune_factors):
                values = {**current, name: value}
                done = next((t for t in tuning.trials if t.values == values), None)
                if done is None:
                    done = self._trial(method, values, data, evaluator, len(tuning.trials))
                    tuning.trials.append(done)
                candidates.append(done)
            best = tuning.best(candidates)
            if best is not None:
                current = dict(best.values)
        chosen = tuning.chosen
        self.lr[method] = chosen["learning_rate"]
        if "beta" in chosen and flag:
            self.kl[method] = chosen["beta"]
        logger.info("%s: tuned on %d validation prompts: %s", method, data["validation_prompts"], chosen)
        return tuning

    # ---------------------------------------------------------------- stage 3: evaluation
    def _evaluate(self, trained: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from alignlab.experiments.evaluate import EvaluateConfig, Evaluator

        cfg = self.config
        todo = {"base": cfg.model_name_or_path}
        todo.update({m: r["model_dir"] for m, r in trained.items() if r["status"] == "ok"})
        cached = {}
        if cfg.resume:
            for name in todo:
                data = _read_json(self.layout.evaluation(name))
                if data is not None:
                    cached[name] = data
        results: dict[str, dict[str, Any]] = {}
        if all(name in cached for name in todo):
            return cached
        ecfg = EvaluateConfig(
            model_name_or_path=[todo["base"] or "embedded:smollm2-135m-instruct"], dataset_name=str(self.layout.eval_prompts),
            reward_funcs=self.reward_funcs, reward_weights=self.reward_weights,
            samples_per_prompt=cfg.eval_samples_per_prompt, base_samples_per_prompt=cfg.base_eval_samples_per_prompt,
            max_new_tokens=self.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed, bf16=cfg.bf16,
            trust_remote_code=cfg.trust_remote_code, generation_backend=cfg.generation_backend,
        )
        evaluator = Evaluator(ecfg)
        for name, path in todo.items():  # base first: the others are measured against it
            if name in cached and name != "base":
                results[name] = cached[name]
                continue
            logger.info("evaluating %s on %d held-out prompts", name, len(self.eval_rows))
            try:
                results[name] = evaluator.evaluate(name, path)
            except UserError as exc:
                if name == "base":
                    raise
                results[name] = {"status": "failed", "error": f"evaluation: {exc}"}
                continue
            self.layout.method_dir(name).mkdir(parents=True, exist_ok=True)
            _write_json(results[name], self.layout.evaluation(name))
        return results

    @staticmethod
    def _verdict(methods: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        """Paired comparisons over the held-out prompts (:func:`alignlab.experiments.stats.verdict`): each method
        against the base and against the best, the winner or the methods tied with the best, the Pareto front
        of reward against KL. ``None`` with fewer than one evaluated method besides the base."""
        from alignlab.experiments.stats import pareto_front, verdict

        ok = {m: e for m, e in methods.items() if e.get("status") == "ok" and "prompt_scores" in e}
        if "base" not in ok or len(ok) < 2:
            return None
        result = verdict({m: e["prompt_scores"] for m, e in ok.items()}).to_dict()
        result["pareto_front"] = pareto_front({m: (e["kl_to_base"], e["mean_reward"]) for m, e in ok.items()})
        return result

    # ---------------------------------------------------------------- all stages
    def budget(self) -> dict[str, Any]:
        """The shared budget, as stated in the report."""
        cfg = self.config
        return {
            "base_model": cfg.model_name_or_path or "embedded SmolLM2-135M-Instruct",
            "train_prompts": len(self.train_rows), "eval_prompts": len(self.eval_rows),
            "samples_per_prompt_for_pairs": cfg.samples_per_prompt,
            "eval_samples_per_prompt": cfg.eval_samples_per_prompt,
            "base_eval_samples_per_prompt": cfg.base_eval_samples_per_prompt,
            "max_steps": {m: self.steps[m] for m in cfg.methods if m in self.steps} if cfg.budget else cfg.max_steps,
            "budget": cfg.budget, "seeds": self.seeds, "prompts_per_step": cfg.prompts_per_step,
            "grpo_num_generations": cfg.num_generations, "max_new_tokens": self.max_new_tokens,
            "temperature": cfg.temperature, "ppo_epochs": cfg.num_ppo_epochs,
            "learning_rate": {m: self.lr[m] for m in cfg.methods},
            "kl_coefficient": {m: self.kl[m] for m in cfg.methods if m in self.kl},
            "seed": cfg.seed, "bf16": cfg.bf16,
        }

    def run_fairness(self, tune_info: dict[str, Any] | None = None) -> dict[str, Any]:
        """What this run held equal between the methods and what it tuned, and where each method's values come
        from (:func:`~alignlab.experiments.tuning.fairness`)."""
        from alignlab.experiments.tuning import fairness

        source = None if self.config.learning_rate else self.values_source
        return fairness(self.budget(), self.tuning or None, tune_info, self.config.methods, preset_source=source)

    def run(self) -> dict[str, Any]:
        """All stages; returns the ``results.json`` content."""
        from alignlab.experiments.report import write_report

        cfg = self.config
        start = time.perf_counter()
        self._write_prompts()
        pairs = self._pairs()
        logger.info("pairs: %g from %d prompts x %d samples (base mean reward %.4f)", pairs["pairs"],
                    pairs["prompts"], pairs["samples_per_prompt"], pairs["base_mean_reward"])
        tune_info = None
        if cfg.tune:
            data = self._tuning_data()
            evaluator = self._validation_evaluator(data)
            for method in cfg.methods:
                for stage in self.entries[method][1].requires:
                    # ppo's reward model for the trials learns from the tuning-train pairs only: one trained on
                    # the validation prompts' pairs would favour ppo on those prompts
                    name = tune_stage_name(stage)
                    if name not in self.stages:
                        self.stages[name] = self._run_stage(stage, name, trial={"prompts": data["prompts"],
                                                                                "pairs": data["pairs"]})
                    if self.stages[name]["status"] != "ok":
                        break
                else:
                    self.tuning[method] = self.tune_method(method, data, evaluator).to_dict()
            del evaluator
            tune_info = {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}
        trained = {}
        for i, method in enumerate(cfg.methods, 1):
            for seed in self.seeds:
                self.seed = seed
                logger.info("[%d/%d] %s%s", i, len(cfg.methods), method,
                            f" (seed {seed})" if len(self.seeds) > 1 else "")
                trained[self.run_name(method)] = self.train(method)
        self.seed = cfg.seed
        evaluated = self._evaluate(trained)
        runs: dict[str, dict[str, Any]] = {}
        for name, run in trained.items():
            entry = {k: v for k, v in run.items() if k != "status"}
            figures = evaluated.get(name, {})
            status = "ok" if run["status"] == "ok" and figures.get("status") != "failed" else "failed"
            entry.update(figures)
            entry["status"] = status
            runs[name] = entry
        methods: dict[str, dict[str, Any]] = {"base": {"status": "ok", **evaluated["base"]}}
        for method in cfg.methods:
            if len(self.seeds) == 1:
                methods[method] = runs[method]
            else:
                methods[method] = over_seeds({seed: runs[run_name(method, seed, self.seeds)] for seed in self.seeds})
        budget = self.budget()
        results = {"task": cfg.task, "description": self.description, "preset": cfg.preset,
                   "budget": budget, "pairs": pairs, "methods": methods, "verdict": self._verdict(methods),
                   "tuning": {"validation": tune_info, "methods": self.tuning} if cfg.tune else None,
                   "fairness": self.run_fairness(tune_info),
                   "wall_seconds": time.perf_counter() - start,
                   "config": dataclasses.asdict(cfg)}
        _write_json(results, self.layout.results)
        write_report(results, self.out)
        return results


def tune_stage_name(stage: str) -> str:
    """The run name of a stage (ppo's reward model) that ``--tune``'s trials read: trained on the tuning-train
    pairs only, apart from the final runs' own."""
    return f"{stage}/tune"


SEED_FIELDS = ("status", "error", "mean_reward", "win_rate_vs_base", "kl_to_base", "mean_length", "wall_seconds",
               "num_tokens", "max_steps", "model_dir")
"""What ``results.json`` keeps of each seed's run under its method's ``seeds``."""


def over_seeds(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One method's ``results.json`` entry from its runs with several seeds (``{seed: entry}``).

    Over the seeds whose training and evaluation succeeded: ``mean_reward``, ``win_rate_vs_base``, ``kl_to_base``,
    ``mean_length``, ``wall_seconds`` (per run) and ``num_tokens`` are means; ``seed_spread`` is
    :func:`~alignlab.experiments.stats.seed_spread` of the seeds' mean rewards; ``reward_ci95`` the normal
    interval over every completion of every seed; ``prompt_scores`` stacks the seeds' ``(samples, P)`` scores
    into ``(K, samples, P)`` for the paired verdict (which resamples the seeds as well as the prompts);
    ``peak_rss_bytes`` the largest; ``samples`` and ``model_dir`` (the training curve) the first seed's. ``seeds`` keeps each run's figures, ``failed_seeds`` the
    errors of those that failed; the method failed when every seed did.
    """
    from alignlab.experiments.evaluate import confidence_interval
    from alignlab.experiments.stats import seed_spread

    ok = {seed: e for seed, e in runs.items() if e.get("status") == "ok" and "mean_reward" in e}
    failed = {str(seed): e.get("error", "failed") for seed, e in runs.items() if seed not in ok}
    per_seed = {str(seed): {k: e[k] for k in SEED_FIELDS if k in e} for seed, e in runs.items()}
    if not ok:
        seed, error = next(iter(failed.items()))
        return {"status": "failed", "error": f"seed {seed}: {error}", "seeds": per_seed, "failed_seeds": failed}

    def mean(key: str) -> float | None:
        values = [e[key] for e in ok.values() if e.get(key) is not None]
        return sum(values) / len(values) if values else None

    first = ok[min(ok)]
    scores = [e["prompt_scores"] for e in ok.values()]  # (K, samples, P)
    low, high = confidence_interval(torch.tensor(scores, dtype=torch.float64).flatten())
    entry = {"status": "ok", "mean_reward": mean("mean_reward"), "reward_ci95": [low, high],
             "seed_spread": seed_spread([e["mean_reward"] for e in ok.values()]),
             "win_rate_vs_base": mean("win_rate_vs_base"), "kl_to_base": mean("kl_to_base"),
             "mean_length": mean("mean_length"), "wall_seconds": mean("wall_seconds"),
             "peak_rss_bytes": max(e.get("peak_rss_bytes") or 0 for e in ok.values()) or None,
             "num_tokens": None if mean("num_tokens") is None else int(mean("num_tokens")),
             "prompt_scores": scores, "samples": first.get("samples", []), "model_dir": first.get("model_dir"),
             "seeds": per_seed}
    if failed:
        entry["failed_seeds"] = failed
    return entry


def compare(config: CompareConfig) -> dict[str, Any]:
    """Run ``alignlab compare`` as configured; the Python twin of the command."""
    return Compare(config).run()

"""``alignlab evaluate``: held-out figures for a base model and any number of trained policies, measured the
same way for all of them (the evaluation step of ``alignlab compare``).

For every model, one or more completions per held-out prompt are sampled with the same settings and the same
random seed, scored with the task's reward (or the user's reward functions / reward model), and compared with
the base model (the first model given):

* ``mean_reward`` and ``reward_ci95``: the mean over completions and its 95% confidence interval, normal
  approximation ``mean +- 1.96 * std / sqrt(n)`` (std with Bessel's correction);
* ``win_rate_vs_base``: the probability that the model's completion of a prompt scores higher than the base
  model's, ties counted half (AlpacaEval's convention for ties), estimated over every pair of a model's and the
  base's completions of the same prompt;
* ``kl_to_base``: the sampled (k1) estimate of the sequence-level ``KL(pi || pi_base)`` in nats per completion,
  ``mean_i sum_t [log pi(y_it) - log pi_base(y_it)]`` over completions ``y_i ~ pi`` (Schulman, "Approximating
  KL divergence", 2020; the ``objective/kl`` of TRL's PPO), both log-probs at the sampling temperature.
  ``log pi`` is what the sampler recorded as it drew the token (no second forward of the model; as TRL's PPO
  takes its old log-probs) when it samples from ``softmax(logits / temperature)`` itself (``top_p`` 1), else
  one forward recomputes it; ``log pi_base`` is one forward of the base model;
* ``mean_length`` (completion tokens), ``eos_rate``, each reward source's mean, generated tokens and wall time.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignlab.data.io import read_rows, write_text_atomic
from alignlab.data.prompts import build_prompt_examples
from alignlab.errors import UserError
from alignlab.train.config import check_ranges, resolve_bf16
from alignlab.models import load_causal_lm, load_tokenizer
from alignlab.rollout.engines import BACKENDS
from alignlab.rollout.experience import ScoredCompletions, sample_and_score_batches
from alignlab.rollout.generation import completion_token_logps
from alignlab.rollout.rewards import build_reward_sources
from alignlab.tasks import PromptSet, resolve_task
from alignlab.train.runtime import Runtime

logger = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    """Settings of ``alignlab evaluate``."""

    model_name_or_path: list[str] | None = None
    """Models to evaluate, the base model first (win rate and KL are measured against it): Hugging Face ids or
    local directories (any alignlab output_dir). Unset: the embedded SmolLM2-135M-Instruct alone."""
    model_names: list[str] | None = None
    """Labels for the models in the printed table and results (default: the paths)."""
    task: str | None = None
    """A built-in task (its held-out split and its reward), or a prompts file (then give --reward_funcs)."""
    dataset_name: str | None = None
    """Prompts file or dataset instead of --task (rows with a ``prompt``, text or messages)."""
    dataset_config: str | None = None
    dataset_split: str = "test"
    """Split of a hub dataset or saved DatasetDict (local files are read whole)."""
    prompt_column: str = "prompt"
    reward_funcs: list[str] | None = None
    """Python reward functions, ``path/to/file.py:name`` or ``module:name`` (default with --task: the task's)."""
    reward_weights: list[float] | None = None
    """One weight per reward source: the reward functions in order, then the reward model."""
    reward_model_path: str | None = None
    """A trained reward model (an ``alignlab reward`` output_dir)."""
    num_prompts: int | None = None
    """Evaluate on the first this many prompts (default: all)."""
    samples_per_prompt: int = 1
    """Completions sampled per prompt and model."""
    base_samples_per_prompt: int | None = None
    """Completions per prompt of the base model (the first model; default: --samples_per_prompt). Every model is
    compared with the base, so its per-prompt means enter every paired comparison: more base samples narrow all
    of them for the price of sampling one model more."""
    max_new_tokens: int | None = None
    """Most tokens per completion (default: the task's budget, else 64)."""
    temperature: float = 1.0
    """Sampling temperature (also the temperature of the KL's log-probs)."""
    top_p: float = 1.0
    max_prompt_length: int | None = 512
    generation_batch_size: int = 32
    """Prompts per ``generate`` call (decoding a small model on a CPU is bound by reading the weights once per
    token, so larger batches cost little more per step)."""
    seed: int = 42
    """Seed of the sampling noise, reset before every model so all models see the same draws."""
    generation_backend: str = "auto"
    """How completions are sampled (docs/rollouts.md): ``generate`` (transformers ``generate``, dynamic KV
    cache), ``static`` (static KV cache, compiled decode step), ``paged`` (transformers' continuous batching,
    paged KV cache) or ``auto`` (the fastest measured on the device type)."""
    bf16: bool | None = None
    """bf16 autocast; unset: on where bf16 matrix products are fast (``alignlab.train.config.fast_bf16_available``)."""
    samples_to_keep: int = 8
    """Completions per model kept in the results (first sample of the first prompts) for side-by-side reading."""
    output_file: str | None = None
    """Write the results as JSON here."""
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        check_ranges(self)
        self.bf16 = resolve_bf16(self.bf16)
        if self.output_file:
            from alignlab.train.output_dir import check_writable_file

            check_writable_file(self.output_file, "--output_file")
        if not self.task and not self.dataset_name:
            raise UserError("give --task (a built-in task or a prompts file) or --dataset_name")
        if self.task and self.dataset_name:
            raise UserError("give --task or --dataset_name, not both")
        if self.model_names and len(self.model_names) != len(self.model_name_or_path or [None]):
            raise UserError(f"--model_names has {len(self.model_names)} labels for "
                            f"{len(self.model_name_or_path or [None])} models")
        if self.base_samples_per_prompt is None:
            self.base_samples_per_prompt = self.samples_per_prompt
        for name in ("samples_per_prompt", "base_samples_per_prompt", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise UserError(f"--num_prompts must be >= 1, got {self.num_prompts}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        if self.generation_backend not in BACKENDS:
            raise UserError(f"--generation_backend must be one of {', '.join(BACKENDS)}, "
                            f"got {self.generation_backend!r}")


def confidence_interval(values: torch.Tensor) -> tuple[float, float]:
    """95% normal-approximation interval ``mean +- 1.96 * std / sqrt(n)`` of ``(n,)`` values (std with Bessel's
    correction; the interval is the mean itself when ``n == 1``)."""
    mean = float(values.mean())
    if values.numel() < 2:
        return mean, mean
    half = 1.96 * float(values.std()) / math.sqrt(values.numel())
    return mean - half, mean + half


def win_rate(scores: torch.Tensor, base_scores: torch.Tensor) -> float:
    """Probability that a model's completion beats the base model's on the same prompt, ties counted half.

    ``scores`` ``(P, K)`` and ``base_scores`` ``(P, K_base)``: the rewards of ``K`` and ``K_base`` completions of each
    of ``P`` prompts (``(P,)`` is one completion per prompt). The estimate is the mean over prompts of the
    Mann-Whitney statistic of prompt ``j``, ``mean_{k, l} [1(s_jk > b_jl) + 0.5 * 1(s_jk = b_jl)]``: every pair of
    the two models' completions of a prompt (Mann & Whitney 1947; with one completion each, the fraction of
    prompts won, AlpacaEval's rule for ties).

    Raises:
        ValueError: the numbers of prompts differ, or an input has more than 2 dimensions.
    """
    a = scores.reshape(scores.shape[0], -1) if scores.dim() else scores.reshape(1, 1)
    b = base_scores.reshape(base_scores.shape[0], -1) if base_scores.dim() else base_scores.reshape(1, 1)
    if scores.dim() > 2 or base_scores.dim() > 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"scores {tuple(scores.shape)} and base scores {tuple(base_scores.shape)} must be (P, K) "
                         "and (P, K_base) over the same prompts")
    a, b = a[:, :, None], b[:, None, :]  # (P, K, 1), (P, 1, K_base)
    return float(((a > b).float() + 0.5 * (a == b).float()).mean())


def prompt_text(prompt) -> str:
    """A prompt as one line of text: the last user message of a conversation, else the string."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        return users[-1] if users else str(prompt[-1].get("content", ""))
    return prompt


class Evaluator:
    """Samples, scores and compares models on one prompt set; see the module docstring.

    Raises:
        UserError / DataError: unreadable prompts or models, a failing reward function, models whose tokenizer
            differs from the base model's (the KL needs the same tokens under both).
    """

    def __init__(self, config: EvaluateConfig):
        from alignlab.rollout.scoring import attach_reward_model

        self.config = config
        self.paths = list(config.model_name_or_path or [None])
        self.names = list(config.model_names or [p or "embedded" for p in self.paths])
        self.runtime = Runtime(config)  # one process on the device PyTorch finds, the config's precision
        self.device = self.runtime.device
        if config.task:
            prompt_set = resolve_task(config.task, "test", reward_funcs=config.reward_funcs,
                                      reward_weights=config.reward_weights, seed=0)
        else:
            rows = read_rows(config.dataset_name, config_name=config.dataset_config, split=config.dataset_split)
            prompt_set = PromptSet(rows, config.reward_funcs, config.reward_weights, 64, config.dataset_name)
        self.max_new_tokens = config.max_new_tokens or prompt_set.max_new_tokens
        rows = prompt_set.rows[: config.num_prompts] if config.num_prompts else prompt_set.rows
        self.tokenizer = load_tokenizer(self.paths[0], trust_remote_code=config.trust_remote_code)
        self.prompts, _ = build_prompt_examples(rows, self.tokenizer, max_prompt_length=config.max_prompt_length,
                                                prompt_column=config.prompt_column)
        self.sources = build_reward_sources(prompt_set.reward_funcs, prompt_set.reward_weights,
                                            with_reward_model=bool(config.reward_model_path))
        self.reward_tokenizer = attach_reward_model(self.sources, config, self.runtime)
        self.base_model = None
        self.base_scores = None

    def _precision(self):
        return self.runtime.precision()

    def _sample(self, model, name: str, samples_per_prompt: int, *, return_logps: bool = False
                ) -> list[ScoredCompletions]:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        return sample_and_score_batches(
            model, self.tokenizer, self.prompts, self.sources, batch_size=cfg.generation_batch_size,
            precision_fn=self._precision, progress=f"evaluating {name}", device=self.device,
            max_new_tokens=self.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            num_generations=samples_per_prompt, reward_tokenizer=self.reward_tokenizer,
            generation_backend=cfg.generation_backend, return_logps=return_logps,
        )

    def _kl(self, model, parts: list[ScoredCompletions]) -> torch.Tensor:
        """``(N,)`` per-completion ``sum_t log pi - log pi_base`` over the sampled completions: ``log pi`` as the
        sampler recorded it (``sequences["sampling_logps"]``) when present, else from a forward of ``model``;
        ``log pi_base`` from a forward of the base model."""
        out = []
        pad = self.tokenizer.pad_token_id
        for part in parts:
            with self._precision():
                logps = part.sequences.get("sampling_logps")
                if logps is None:
                    logps = completion_token_logps(model, part.sequences, temperature=self.config.temperature,
                                                   pad_token_id=pad)
                base = completion_token_logps(self.base_model, part.sequences, temperature=self.config.temperature,
                                              pad_token_id=pad)
            out.append((logps - base).sum(dim=1))
        return torch.cat(out)

    def evaluate(self, name: str, path: str | None) -> dict[str, Any]:
        """The figures of one model; the first model evaluated is the base."""
        cfg = self.config
        start = time.perf_counter()
        if path is not None and self.base_model is not None:
            tok = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
            if tok.get_vocab() != self.tokenizer.get_vocab():
                raise UserError(f"{path}: its tokenizer differs from the base model's; the KL to the base needs the same tokens")
        model = load_causal_lm(path, trust_remote_code=cfg.trust_remote_code).to(self.device).eval()
        is_base = self.base_model is None
        k = cfg.base_samples_per_prompt if is_base else cfg.samples_per_prompt
        with torch.no_grad():
            # the sampler's log-probs are the model's own when it draws from softmax(logits / temperature)
            parts = self._sample(model, name, k, return_logps=not is_base and cfg.top_p == 1.0)
            scores = torch.cat([p.scores for p in parts])
            if is_base:
                self.base_model, self.base_scores = model, scores.view(-1, k)  # (P, K_base)
                kl = torch.zeros_like(scores)
            else:
                kl = self._kl(model, parts)
        lengths = torch.cat([p.lengths for p in parts])
        low, high = confidence_interval(scores)
        result: dict[str, Any] = {
            "model": path or "embedded",
            "mean_reward": float(scores.mean()),
            "reward_ci95": [low, high],
            "reward_std": float(scores.std()) if scores.numel() > 1 else 0.0,
            "win_rate_vs_base": win_rate(scores.view(-1, k), self.base_scores),
            "kl_to_base": float(kl.mean()),
            "mean_length": float(lengths.mean()),
            "eos_rate": float(torch.cat([p.has_eos for p in parts]).float().mean()),
            "completions": int(scores.numel()),
            # (samples_per_prompt, prompts): every completion's reward, for paired comparisons between models
            "prompt_scores": scores.view(-1, k).t().tolist(),
            "generated_tokens": int(lengths.sum()),
        }
        for source in self.sources:
            values = torch.cat([p.per_source[source.name] for p in parts])
            result[f"rewards/{source.name}"] = float(torch.nanmean(values))
        keep = []
        flat = [(p.examples[i]["prompt"], p.texts[i], float(p.scores[i])) for p in parts for i in range(len(p.texts))]
        for prompt, text, score in flat[:: k][: cfg.samples_to_keep]:
            keep.append({"prompt": prompt_text(prompt), "completion": text, "reward": score})
        result["samples"] = keep
        result["eval_seconds"] = time.perf_counter() - start
        if model is not self.base_model:
            del model
        logger.info("%s: mean reward %.4f [%.4f, %.4f], win rate %.3f, KL %.3f, length %.1f", name,
                    result["mean_reward"], low, high, result["win_rate_vs_base"], result["kl_to_base"],
                    result["mean_length"])
        return result

    def run(self) -> dict[str, dict[str, Any]]:
        """All models, base first: ``{name: figures}``."""
        return {name: self.evaluate(name, path) for name, path in zip(self.names, self.paths)}


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The results as a fixed-width text table (one row per model)."""
    head = f"{'model':<16} {'mean reward':>11} {'95% CI':>19} {'win vs base':>11} {'KL to base':>10} {'length':>7}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if "mean_reward" not in r:
            lines.append(f"{name:<16} {'failed: ' + str(r.get('error', ''))[:60]}")
            continue
        low, high = r["reward_ci95"]
        lines.append(f"{name:<16} {r['mean_reward']:>11.4f} {f'[{low:.3f}, {high:.3f}]':>19} "
                     f"{r['win_rate_vs_base']:>11.3f} {r['kl_to_base']:>10.3f} {r['mean_length']:>7.1f}")
    return "\n".join(lines)


def evaluate(config: EvaluateConfig) -> dict[str, dict[str, Any]]:
    """Evaluate the configured models; writes ``config.output_file`` when set. The Python twin of
    ``alignlab evaluate``."""
    results = Evaluator(config).run()
    if config.output_file:
        path = Path(config.output_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"methods": results}, indent=2, ensure_ascii=False))
    return results

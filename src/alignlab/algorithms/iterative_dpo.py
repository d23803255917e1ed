"""Iterative DPO: rounds of sample -> score -> best-vs-worst pairs -> DPO, each round starting from the last
(the multi-round recipe of Llama 3, Dubey et al. 2024, arXiv 2407.21783, section 4.1, and Tulu 3, Lambert et
al. 2024, arXiv 2411.15124; Xiong et al. 2024, "Iterative Preference Learning from Human Feedback", arXiv
2312.11456). Glue over :mod:`alignlab.rollout.experience` and :mod:`alignlab.algorithms.dpo`.

Layout of ``output_dir``::

    round-1/pairs.jsonl    the round's pairs (prompt, chosen, rejected, and both scores): inspect or edit them
    round-1/model/         DPO's output for the round (model, metrics.jsonl, plots/)
    round-2/...
    rounds.json            per round: pairs, mean held-out reward before and after
    metrics.jsonl          every round's rows one after another (steps numbered on, ``round`` added, ``num_tokens``
                           counted from the first round), as every training command writes it
    (the final model)      a copy of the last round's model files

A round whose ``model/`` is complete is skipped when the command runs again; a round with ``pairs.jsonl``
but no model trains on those pairs as they are (so hand-edited pairs are used): delete ``model/`` to rerun a
round from its pairs, delete ``pairs.jsonl`` as well to resample.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from alignlab.algorithms.dpo import DPOConfig, train_dpo
from alignlab.data.io import read_rows, write_text_atomic
from alignlab.data.prompts import build_prompt_examples
from alignlab.errors import UserError
from alignlab.methods import CompareEntry, Method, register_method
from alignlab.models import load_causal_lm, load_tokenizer
from alignlab.rollout.engines import BACKENDS
from alignlab.rollout.experience import sample_and_score_batches
from alignlab.rollout.pairs import write_pairs
from alignlab.rollout.rewards import build_reward_sources
from alignlab.rollout.scoring import attach_reward_model
from alignlab.train.runtime import build_runtime
from alignlab.train.setup import split_rows

logger = logging.getLogger(__name__)


@dataclass
class IterativeDPOConfig(DPOConfig):
    """Settings of ``alignlab iterative-dpo``: every ``alignlab dpo`` flag (applied to each round's DPO run;
    ``max_steps`` / ``num_train_epochs`` per round) plus the sampling and reward flags below. ``dataset_name``
    holds prompts (as for PPO); ``eval_split_size`` / ``eval_dataset_name`` name held-out prompts on which the
    mean reward is measured before the first round and after each."""

    rounds: int = 2
    """Rounds of sampling and DPO."""
    samples_per_prompt: int = 4
    """Completions sampled per prompt each round (K); the best and the worst by reward make the pair."""
    reference: Literal["previous", "initial"] = "previous"
    """Each round's DPO reference: the round's starting model (previous) or the initial model (initial)."""
    reward_model_path: str | None = None
    """A trained reward model (as for PPO)."""
    reward_funcs: list[str] | None = None
    """Python reward functions, ``path/to/file.py:name`` or ``module:name`` (TRL signature)."""
    reward_weights: list[float] | None = None
    """One weight per reward source: the reward functions in order, then the reward model. Default: all 1."""
    max_new_tokens: int = 64
    """Most tokens sampled per completion."""
    temperature: float = 1.0
    """Sampling temperature (for the pairs and the held-out evaluation)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_prompt_length: int | None = 512
    """Keep at most the last this many prompt tokens."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of completions without EOS."""
    generation_batch_size: int = 16
    """Prompts per ``generate`` call while sampling."""
    generation_backend: str = "auto"
    """How completions are sampled (docs/rollouts.md): ``generate`` (transformers ``generate``, dynamic KV
    cache), ``static`` (static KV cache, compiled decode step), ``paged`` (transformers' continuous batching,
    paged KV cache) or ``auto`` (the fastest measured on the device type)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.generation_backend not in BACKENDS:
            raise UserError(f"--generation_backend must be one of {', '.join(BACKENDS)}, "
                            f"got {self.generation_backend!r}")
        if len(self.objectives) > 1 or (self.objectives and self.objectives[0].weight is not None):
            raise UserError("iterative-dpo takes one prompt set in --dataset_name (no weights)")
        if self.rounds < 1:
            raise UserError(f"--rounds must be >= 1, got {self.rounds}")
        if self.samples_per_prompt < 2:
            raise UserError(f"--samples_per_prompt must be >= 2 (a best and a worst), got {self.samples_per_prompt}")
        if not self.reward_model_path and not self.reward_funcs:
            raise UserError("give --reward_model_path and/or --reward_funcs")
        for name in ("max_new_tokens", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")


class IterativeDPO:
    """Runs the rounds; see the module docstring.

    Raises:
        UserError / DataError: bad flags, unreadable data or models, a bad row, a failing reward function.
    """

    def __init__(self, config: IterativeDPOConfig):
        config.check_inputs()
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.runtime = build_runtime(config)
        if self.runtime.num_processes > 1:
            raise UserError("iterative-dpo runs in one process (its DPO rounds can be run with torchrun by hand)")
        self.device = self.runtime.device
        self.tokenizer = load_tokenizer(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
        rows = read_rows(config.dataset_name, config_name=config.dataset_config, split=config.dataset_train_split)
        if config.eval_dataset_name:
            eval_rows = read_rows(config.eval_dataset_name, config_name=config.dataset_config,
                                  split=config.dataset_test_split)
        else:
            rows, eval_rows = split_rows(rows, config.eval_split_size, config.seed)
        kw = dict(max_prompt_length=config.max_prompt_length, prompt_column=config.prompt_column)
        self.prompts, _ = build_prompt_examples(rows, self.tokenizer, **kw)
        self.eval_prompts, _ = build_prompt_examples(eval_rows, self.tokenizer, **kw) if eval_rows else ([], None)
        self.sources = build_reward_sources(config.reward_funcs, config.reward_weights,
                                            with_reward_model=bool(config.reward_model_path))
        self.reward_tokenizer = attach_reward_model(self.sources, config, self.runtime)

    def _sample(self, policy, examples: list[dict], k: int):
        cfg = self.config
        return sample_and_score_batches(
            policy, self.tokenizer, examples, self.sources, batch_size=cfg.generation_batch_size,
            precision_fn=self.runtime.precision, device=self.device, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, num_generations=k,
            missing_eos_penalty=cfg.missing_eos_penalty, reward_tokenizer=self.reward_tokenizer,
            generation_backend=cfg.generation_backend,
        )

    def held_out_reward(self, model_path: str | None) -> float | None:
        """Mean reward of one sampled completion per held-out prompt under the model at ``model_path``."""
        if not self.eval_prompts:
            return None
        torch.manual_seed(self.config.seed)  # the same sampling noise for every model compared
        policy = load_causal_lm(model_path, trust_remote_code=self.config.trust_remote_code).to(self.device).eval()
        with torch.no_grad():
            scores = torch.cat([p.scores for p in self._sample(policy, self.eval_prompts, 1)])
        return float(scores.mean())

    def _write_pairs(self, model_path: str | None, path: Path) -> int:
        k = self.config.samples_per_prompt
        policy = load_causal_lm(model_path, trust_remote_code=self.config.trust_remote_code).to(self.device).eval()
        with torch.no_grad():
            return write_pairs(self._sample(policy, self.prompts, k), k, path)

    @staticmethod
    def _has_checkpoint(model_dir: Path) -> bool:
        """Whether a round's model folder (or its staging folder) holds a ``checkpoint-N``."""
        from alignlab.train.checkpoint import STAGING_DIR, list_checkpoints

        return bool(list_checkpoints(model_dir / STAGING_DIR) or list_checkpoints(model_dir))

    def run(self) -> list[dict]:
        """All rounds; returns the ``rounds.json`` records."""
        cfg = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        summary_path = self.output_dir / "rounds.json"
        records = json.loads(summary_path.read_text()) if summary_path.exists() else []
        initial = cfg.model_name_or_path
        current = initial
        before = records[0]["held_out_reward_before"] if records else self.held_out_reward(current)
        for i in range(1, cfg.rounds + 1):
            round_dir = self.output_dir / f"round-{i}"
            model_dir = round_dir / "model"
            pairs = round_dir / "pairs.jsonl"
            if (model_dir / "config.json").exists() and len(records) >= i:
                logger.info("round %d: done before, reusing %s", i, model_dir)
                current, before = str(model_dir), records[i - 1]["held_out_reward_after"]
                continue
            round_dir.mkdir(parents=True, exist_ok=True)
            if pairs.exists():
                n_pairs = sum(1 for line in pairs.read_text().splitlines() if line.strip())
                logger.info("round %d: training on the existing %s (%d pairs)", i, pairs, n_pairs)
            else:
                n_pairs = self._write_pairs(current, pairs)
                logger.info("round %d: %d pairs written to %s", i, n_pairs, pairs)
            dpo_fields = {f.name for f in dataclasses.fields(DPOConfig)}
            round_cfg = DPOConfig(**{
                **{name: getattr(cfg, name) for name in dpo_fields},
                "model_name_or_path": current, "dataset_name": str(pairs), "output_dir": str(model_dir),
                "eval_dataset_name": None, "eval_split_size": 0.0, "merge_lora": True if cfg.use_peft else cfg.merge_lora,
                "ref_model_name_or_path": initial if cfg.reference == "initial" and i > 1 else None,
                "prompt_column": "prompt", "chosen_column": "chosen", "rejected_column": "rejected",
                "overwrite_output_dir": True,  # a round that did not finish before is trained again
                # resume a round from its own checkpoint when it has one; a round that never wrote one starts afresh
                "resume_from_checkpoint": cfg.resume_from_checkpoint if self._has_checkpoint(model_dir) else None,
            })
            result = train_dpo(round_cfg)
            current = str(model_dir)
            after = self.held_out_reward(current)
            record = {"round": i, "pairs": n_pairs, "held_out_reward_before": before, "held_out_reward_after": after,
                      "train_rewards/accuracies": result.train_metrics.get("rewards/accuracies"),
                      "train_seconds": result.train_seconds}
            records = records[: i - 1] + [record]
            summary_path.write_text(json.dumps(records, indent=2))
            if after is not None:
                logger.info("round %d: held-out mean reward %.4f -> %.4f", i, before, after)
            before = after
        for item in Path(current).iterdir():  # the final model and tokenizer at the top of output_dir
            if item.is_file() and item.name not in ("metrics.jsonl", "config.yaml"):
                shutil.copy2(item, self.output_dir / item.name)
        self._write_metrics()
        return records

    def _write_metrics(self) -> None:
        """``metrics.jsonl`` at the top of output_dir: the rounds' rows one after another."""
        rows, step, tokens = [], 0, 0
        for i in range(1, self.config.rounds + 1):
            path = self.output_dir / f"round-{i}" / "model" / "metrics.jsonl"
            part = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
            for row in part:
                row = {**row, "step": row["step"] + step, "round": i}
                if "num_tokens" in row:
                    row["num_tokens"] += tokens
                rows.append(row)
            if part:
                step = rows[-1]["step"]
                tokens = max((r["num_tokens"] for r in rows if "num_tokens" in r), default=0)
        write_text_atomic(self.output_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def train_iterative_dpo(config: IterativeDPOConfig) -> list[dict]:
    """Run iterative DPO as configured; the Python twin of ``alignlab iterative-dpo``."""
    return IterativeDPO(config).run()


def _print_rounds(config: IterativeDPOConfig, records: list[dict]) -> None:
    for record in records:
        before, after = record["held_out_reward_before"], record["held_out_reward_after"]
        change = f", held-out mean reward {before:.4f} -> {after:.4f}" if after is not None else ""
        print(f"round {record['round']}: {record['pairs']} pairs{change}")
    print(f"final model: {config.output_dir}")


register_method(Method(
    command="iterative-dpo",
    summary="rounds of sampling, best-vs-worst pairs by reward, and DPO (Llama 3 / Tulu 3 recipe)",
    config=IterativeDPOConfig,
    train=train_iterative_dpo,
    online=True,
    curve_metric="rewards/margins",
    print_result=_print_rounds,
    checkpoints_in_runs=True,  # each round resumes from its own checkpoint
    compare=(CompareEntry(
        name="iterative-dpo",
        args=lambda b: {"dataset_name": [b.prompts], "per_device_train_batch_size": b.prompts_per_step,
                        "max_new_tokens": b.max_new_tokens, "temperature": b.temperature, "rounds": 2,
                        "samples_per_prompt": b.samples_per_prompt, "max_steps": b.max_steps // 2, **b.rule},
        learning_rate=5e-6,
        curve_label="DPO implicit reward margin (rounds one after another)",
        min_steps=2,
    ),),
))

"""Reward modelling (Bradley-Terry on preference pairs) and scoring, glue between preference data,
:mod:`alignlab.losses.reward` and the shared training loop.

Flow: rows -> pairs -> prompt+chosen and prompt+rejected token ids (tokenized as for DPO) -> batch of
[chosen; rejected] -> one forward -> a scalar score per sequence, read at its last real token ->
Bradley-Terry loss -> optimizer step -> metrics. ``alignlab score`` runs the same scoring without training.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from alignlab.algorithms.base import Algorithm
from alignlab.data.io import read_rows
from alignlab.data.preference import PairStats, build_pair_examples, collate_pairs
from alignlab.errors import DataError, UserError
from alignlab.losses.reward import bradley_terry_loss
from alignlab.methods import CompareEntry, Method, register_method
from alignlab.models import load_reward_model, load_tokenizer
from alignlab.train.trl_args import model_init_kwargs
from alignlab.rollout.scoring import sequence_scores
from alignlab.train.config import TrainConfig, resolve_bf16
from alignlab.train.setup import load_train_eval
from alignlab.train.steps import LossTerms
from alignlab.train.types import TrainResult

logger = logging.getLogger(__name__)

REWARD_PLOTS = {
    "accuracy": ["accuracy"],
    "margin": ["margin"],
    "rewards": ["rewards/chosen", "rewards/rejected"],
}


@dataclass
class RewardConfig(TrainConfig):
    """Settings of ``alignlab reward``; names and defaults follow TRL's ``RewardConfig`` (TRL 1.16) unless a
    field's docstring says otherwise."""

    learning_rate: float = 1e-4
    """Peak AdamW learning rate (TRL's reward-model default)."""
    max_length: int | None = 1024
    """Cap on prompt+completion tokens per sequence; longer pairs are handled by ``truncation_mode``."""
    truncation_mode: Literal["drop", "keep_start", "keep_end"] = "drop"
    """drop: drop pairs where either sequence is too long (TRL's behaviour); keep_start: cut the end (the
    score is then read inside the answer); keep_end: cut the start."""
    center_rewards_coefficient: float | None = None
    """Add ``c * (r_chosen + r_rejected)^2`` to the loss, pulling rewards to mean 0 (Eisenstein et al. 2023,
    arXiv 2312.09244). TRL suggests 0.01. Unset: no centring term."""
    prompt_column: str = "prompt"
    """Column holding the prompt (explicit-prompt data)."""
    chosen_column: str = "chosen"
    """Column holding the preferred completion (or full transcript)."""
    rejected_column: str = "rejected"
    """Column holding the dispreferred completion (or full transcript)."""
    margin_column: str = "margin"
    """Optional column with a per-pair margin m (reward units): the loss becomes -log sigmoid(r_w - r_l - m)
    (Llama 2, eq. 2). Used when any row has it; then every row must."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"--max_length must be >= 2, got {self.max_length}")
        coef = self.center_rewards_coefficient
        if coef is not None and not coef >= 0:
            raise UserError(f"--center_rewards_coefficient must be >= 0, got {coef}")


# ----------------------------------------------------------------------------------------------------------
def score_pairs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of a collated pair batch (rows ``[chosen; rejected]``, :func:`collate_pairs`) in one forward.

    Returns:
        ``(chosen_scores, rejected_scores)``, each ``(B,)`` float32.
    """
    scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
    return scores.chunk(2)


# ----------------------------------------------------------------------------------------------------------
def _margin(row: dict[str, Any], column: str, location: str) -> float:
    value = row.get(column)
    if value is None:
        raise DataError(f"{location}: missing field {column!r} (other rows have a margin)")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise DataError(f"{location}: field {column!r} must be a finite number, got {value!r}")
    return float(value)


def build_reward_examples(
    rows: list[tuple[str, dict]],
    tokenizer,
    *,
    max_length: int | None,
    truncation_mode: str = "drop",
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    margin_column: str | None = "margin",
) -> tuple[list[dict], PairStats]:
    """Preference rows -> examples of :func:`build_pair_examples` (prompt+chosen and prompt+rejected token ids,
    tokenized exactly as for DPO), each with ``"margin"`` when the data has a margin column.

    ``margin_column=None`` ignores margins (scoring needs none).

    Since the prompt's tokens are a prefix of both tokenized sequences, ``chosen_input_ids`` is the tokenized
    prompt+chosen (+EOS for text), the sequence TRL's ``RewardTrainer`` scores.

    Raises:
        DataError: a bad row (missing or empty field, a missing or non-numeric margin), naming its location.
    """
    use_margin = margin_column is not None and any(margin_column in row for _, row in rows)
    total = PairStats()
    examples = []
    kwargs = dict(
        max_length=max_length,
        truncation_mode=truncation_mode,
        prompt_column=prompt_column,
        chosen_column=chosen_column,
        rejected_column=rejected_column,
    )
    for location, row in rows:
        margin = _margin(row, margin_column, location) if use_margin else None
        built, stats = build_pair_examples([(location, row)], tokenizer, **kwargs)
        for f in dataclasses.fields(PairStats):
            setattr(total, f.name, getattr(total, f.name) + getattr(stats, f.name))
        for example in built:
            if margin is not None:
                example["margin"] = margin
            examples.append(example)
    return examples, total


def collate_reward_pairs(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """:func:`collate_pairs` (``(2B, T)`` ``input_ids``, ``attention_mask``, ``completion_mask``, chosen rows
    first) plus ``margin`` ``(B,)`` float32 when the examples carry one."""
    batch = collate_pairs(examples, pad_token_id)
    if "margin" in examples[0]:
        batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
    return batch


# ----------------------------------------------------------------------------------------------------------
class RewardTrainer(Algorithm):
    """A Bradley-Terry reward model trained on preference pairs.

    >>> result = RewardTrainer(RewardConfig(dataset_name="builtin:concise", output_dir="runs/rm", max_steps=10)).train()

    The model is ``AutoModelForSequenceClassification`` (``num_labels=1``) on any causal LM; with ``use_peft``
    the LoRA adapters and the whole ``score`` head are trained (peft ``modules_to_save``).

    Raises:
        UserError / DataError: bad flags, unreadable data, a bad row (named by file and line or row).
    """

    def __init__(self, config: RewardConfig):
        super().__init__(config)
        self.train_examples, self.eval_examples = load_train_eval(
            config,
            build_reward_examples,
            self.tokenizer,
            is_main_process=self.accelerator.is_main_process,
            max_length=config.max_length,
            truncation_mode=config.truncation_mode,
            prompt_column=config.prompt_column,
            chosen_column=config.chosen_column,
            rejected_column=config.rejected_column,
            margin_column=config.margin_column,
        )

        model = load_reward_model(
            config.model_name_or_path,
            pad_token_id=self.tokenizer.pad_token_id,
            trust_remote_code=config.trust_remote_code,
            use_kernels=config.use_kernels,
            init_kwargs=model_init_kwargs(config),
        )
        self.model = self.runtime.prepare_model(model, task_type="SEQ_CLS", modules_to_save=["score"])

    def compute_loss(self, model, batch: dict[str, torch.Tensor]) -> LossTerms:
        """Mean Bradley-Terry loss of a collated batch and the per-pair metrics of :func:`bradley_terry_loss`
        (``accuracy``, ``margin``, ``rewards/chosen``, ``rewards/rejected``)."""
        chosen, rejected = score_pairs(model, batch)
        losses, metrics = bradley_terry_loss(
            chosen,
            rejected,
            margin=batch.get("margin"),
            center_rewards_coefficient=self.config.center_rewards_coefficient,
        )
        return [(losses.mean(), metrics)]

    plot_panels = REWARD_PLOTS

    def loop_inputs(self) -> dict:
        return {"model": self.model, "train_dataset": self.train_examples, "eval_dataset": self.eval_examples,
                "collate_fn": lambda ex: collate_reward_pairs(ex, self.tokenizer.pad_token_id)}


def train_reward(config: RewardConfig) -> TrainResult:
    """Train a reward model as configured; the Python twin of ``alignlab reward``."""
    return RewardTrainer(config).train()


# ----------------------------------------------------------------------------------------------------------
@dataclass
class ScoreConfig:
    """Settings of ``alignlab score``: score preference pairs with a trained reward model."""

    reward_model_path: str | None = None
    """Reward model directory (an ``alignlab reward`` output_dir, adapters included) or hub id. Required."""
    dataset_name: str | None = None
    """Preference pairs, same forms and formats as for ``alignlab reward``. Required."""
    dataset_config: str | None = None
    """Configuration name of a hub dataset."""
    dataset_split: str = "train"
    """Split to score (hub datasets and saved DatasetDicts)."""
    max_length: int | None = 1024
    """Cap on prompt+completion tokens per sequence; longer pairs are handled by ``truncation_mode``."""
    truncation_mode: Literal["drop", "keep_start", "keep_end"] = "drop"
    """As for ``alignlab reward``: drop (default), keep_start or keep_end."""
    per_device_eval_batch_size: int = 8
    """Pairs per forward pass."""
    bf16: bool | None = None
    """bf16 autocast; unset: on where bf16 matrix products are fast (``alignlab.train.config.fast_bf16_available``)."""
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        self.bf16 = resolve_bf16(self.bf16)
        if not self.reward_model_path:
            raise UserError("--reward_model_path is required")
        if not self.dataset_name:
            raise UserError("--dataset_name is required")
        if self.per_device_eval_batch_size < 1:
            raise UserError(f"--per_device_eval_batch_size must be >= 1, got {self.per_device_eval_batch_size}")
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"--max_length must be >= 2, got {self.max_length}")


@dataclass
class ScoreResult:
    """Scores of a pair set: means over pairs (reward units) and the fraction with chosen > rejected."""

    pairs: int
    mean_chosen: float
    mean_rejected: float
    accuracy: float
    stats: PairStats


def score_dataset(config: ScoreConfig) -> ScoreResult:
    """Score every pair of ``config.dataset_name`` with the reward model (:func:`score_pairs`, the function
    training uses); writes nothing.

    Raises:
        UserError / DataError: bad flags, an unloadable model, unreadable data, a bad row, or no pair left.
    """
    path = os.path.expanduser(config.reward_model_path)
    if (path.startswith((".", "/")) or path.count("/") >= 2) and not os.path.exists(path):
        raise UserError(f"--reward_model_path: {config.reward_model_path} does not exist")
    tokenizer = load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    rows = read_rows(config.dataset_name, config_name=config.dataset_config, split=config.dataset_split)
    examples, stats = build_reward_examples(
        rows,
        tokenizer,
        max_length=config.max_length,
        truncation_mode=config.truncation_mode,
        prompt_column=config.prompt_column,
        chosen_column=config.chosen_column,
        rejected_column=config.rejected_column,
        margin_column=None,
    )
    logger.info("data %s: %s", config.dataset_name, stats.describe())
    if not examples:
        raise UserError(f"--dataset_name: no pair of {config.dataset_name} is left to score")
    model = load_reward_model(path, pad_token_id=tokenizer.pad_token_id, trust_remote_code=config.trust_remote_code,
                              require_score_head=True, flag="--reward_model_path")
    from alignlab.train.runtime import Runtime

    runtime = Runtime(config)  # one process on the device PyTorch finds, the config's precision
    model = runtime.frozen_model(model)
    device = runtime.device
    chosen_all, rejected_all = [], []
    size = config.per_device_eval_batch_size
    with torch.no_grad():
        for start in range(0, len(examples), size):
            batch = collate_pairs(examples[start : start + size], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with runtime.precision():
                chosen, rejected = score_pairs(model, batch)
            chosen_all.append(chosen.cpu())
            rejected_all.append(rejected.cpu())
    chosen, rejected = torch.cat(chosen_all), torch.cat(rejected_all)
    return ScoreResult(
        pairs=len(examples),
        mean_chosen=chosen.mean().item(),
        mean_rejected=rejected.mean().item(),
        accuracy=(chosen > rejected).float().mean().item(),
        stats=stats,
    )


register_method(Method(
    command="reward",
    summary="train a Bradley-Terry reward model on preference pairs",
    config=RewardConfig,
    train=train_reward,
    online=False,
    curve_metric="accuracy",
    eval_metric="eval_accuracy",
    compare=(CompareEntry(
        name="reward-model",
        args=lambda b: {"dataset_name": b.pairs, "per_device_train_batch_size": b.prompts_per_step},
        learning_rate=1e-5,
        curve_label="pair accuracy",
        stage_only=True,
    ),),
))

"""Supervised fine-tuning: next-token negative log-likelihood on target tokens (completions or assistant turns),
glue between :mod:`alignlab.data.sft` and the shared training loop.

Flow: rows -> samples -> tokenized examples with loss masks -> (packed rows) -> batch -> one forward, logits
only at target positions -> token log-probs -> mean NLL -> optimizer step -> metrics.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Literal

import torch

from alignlab.algorithms.base import Algorithm
from alignlab.data.sft import (
    build_sft_examples, collate_sft, pack_sft_examples, padding_free_row, split_sft_examples, wrap_sft_examples,
)
from alignlab.errors import UserError
from alignlab.methods import Method, register_method
from alignlab.models import load_causal_lm
from alignlab.train.trl_args import model_init_kwargs
from alignlab.ops.logprobs import supports_packing, target_token_logps
from alignlab.train.config import TrainConfig
from alignlab.train.setup import load_train_eval
from alignlab.train.steps import LossTerms
from alignlab.train.types import TrainResult

logger = logging.getLogger(__name__)

SFT_PLOTS = {"mean_token_accuracy": ["mean_token_accuracy"]}


@dataclass
class SFTConfig(TrainConfig):
    """Settings of ``alignlab sft``; names and defaults follow TRL's ``SFTConfig`` (TRL 1.16) unless a field's
    docstring says otherwise."""

    learning_rate: float = 2e-5
    """Peak AdamW learning rate (TRL's SFT default)."""
    disable_dropout: bool = False
    """Set every dropout probability to 0. Off for SFT: TRL's SFTTrainer keeps the model's dropout."""
    max_length: int | None = 1024
    """Cap on tokens per example (longer ones are truncated by ``truncation_mode``); with ``packing``, the
    length of a packed row. Unset: no cap."""
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start"
    """keep_start: cut the end (TRL's default); keep_end: cut the start."""
    packing: bool = False
    """Concatenate examples into rows of up to ``max_length`` tokens (first-fit decreasing), each example
    attending only to itself (restarting ``position_ids``); batch sizes then count packed rows."""
    completion_only_loss: bool | None = None
    """Train only on completion tokens of prompt-completion rows (unset: yes, as TRL). False: every token of
    them is a target."""
    assistant_only_loss: bool = False
    """Conversational (``messages``) rows: train only on the tokens of assistant turns. Off by default, as in
    TRL: every token of the conversation is a target."""
    dataset_text_field: str = "text"
    """Column holding plain text (language-modeling rows)."""
    prompt_column: str = "prompt"
    """Column holding the prompt (prompt-completion rows)."""
    completion_column: str = "completion"
    """Column holding the completion (prompt-completion rows)."""
    messages_column: str = "messages"
    """Column holding a conversation as a list of {role, content} messages."""
    loss_type: Literal["nll", "dft"] = "nll"
    """nll: mean negative log-likelihood of the target tokens; dft: each token's NLL weighted by its probability
    (detached), Dynamic Fine-Tuning (Wu et al. 2025, arXiv 2508.05629; TRL's ``loss_type="dft"``)."""
    packing_strategy: Literal["bfd", "bfd_split", "wrapped"] = "bfd"
    """How ``packing`` fills rows: bfd, examples truncated to ``max_length``, sorted by length and packed
    first-fit (alignlab's packer in place of TRL's best-fit decreasing: every example isolated by restarting
    position ids); bfd_split, longer examples cut into ``max_length`` fragments packed the same way instead of
    truncated; wrapped, all examples concatenated and cut every ``max_length`` tokens, attention crossing
    example boundaries (TRL's names and meanings)."""
    eval_packing: bool | None = None
    """Pack the evaluation set too (unset: as ``packing``)."""
    shuffle_dataset: bool = False
    """Shuffle the training examples once (with ``seed``) before packing (TRL's ``shuffle_dataset``)."""
    padding_free: bool = False
    """Batches without padding: the examples of a micro-batch are concatenated into one row whose
    ``position_ids`` restart at each example (TRL's ``padding_free``; the same numbers as padded rows, no compute
    on padding). Needs a model type that keeps packed examples apart, as ``packing``."""
    dataset_kwargs: dict[str, Any] | None = None
    """TRL's data-set preparation options (``skip_prepare_dataset``): alignlab always prepares the rows, so any
    value is refused (docs/trl.md)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"--max_length must be >= 2, got {self.max_length}")
        if (self.packing or self.eval_packing) and self.max_length is None:
            raise UserError("--packing needs --max_length (the length of a packed row)")
        if self.packing_strategy == "bfd-requeue":  # TRL's earlier name
            self.packing_strategy = "bfd_split"
        if self.packing_strategy not in ("bfd", "bfd_split", "wrapped"):
            raise UserError(f"--packing_strategy must be bfd, bfd_split or wrapped, got {self.packing_strategy!r}")
        packs_eval = self.packing if self.eval_packing is None else self.eval_packing
        if self.packing_strategy != "bfd" and self.packing != packs_eval:
            raise UserError(f"--packing_strategy {self.packing_strategy} keeps examples whole until packing: pack "
                            "both sets or neither (--eval_packing)")

    @property
    def assistant_only(self) -> bool:
        """Whether conversational rows train on assistant turns only (``assistant_only_loss``)."""
        return bool(self.assistant_only_loss)


class SFTTrainer(Algorithm):
    """Supervised fine-tuning of a causal LM.

    >>> result = SFTTrainer(SFTConfig(dataset_name="data.jsonl", output_dir="runs/sft", max_steps=10)).train()

    The loss of a micro-batch is the mean negative log-likelihood over its target tokens (TRL's ``nll``
    loss; Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training", eq. 1;
    Ouyang et al. 2022, InstructGPT, section 3.5 "Supervised fine-tuning").

    Raises:
        UserError / DataError: bad flags, unreadable data, a bad row (named by file and line or row),
            ``--packing`` with a model type that cannot keep packed examples apart.
    """

    def __init__(self, config: SFTConfig):
        super().__init__(config)
        self.train_examples, self.eval_examples = load_train_eval(
            config,
            build_sft_examples,
            self.tokenizer,
            is_main_process=self.accelerator.is_main_process,
            # bfd_split and wrapped cut the whole examples themselves when packing (TRL)
            max_length=None if config.packing and config.packing_strategy != "bfd" else config.max_length,
            truncation_mode=config.truncation_mode,
            completion_only_loss=config.completion_only_loss is not False,
            assistant_only_loss=config.assistant_only,
            dataset_text_field=config.dataset_text_field,
            prompt_column=config.prompt_column,
            completion_column=config.completion_column,
            messages_column=config.messages_column,
        )

        model = load_causal_lm(config.model_name_or_path, trust_remote_code=config.trust_remote_code,
                               use_kernels=config.use_kernels, init_kwargs=model_init_kwargs(config))
        if config.shuffle_dataset:
            random.Random(config.seed).shuffle(self.train_examples)
        pack_eval = config.packing if config.eval_packing is None else config.eval_packing
        if config.packing or pack_eval or config.padding_free:
            if not supports_packing(model):
                flag = "--padding_free" if config.padding_free else "--packing"
                raise UserError(
                    f"{flag}: model type {model.config.model_type!r} cannot keep packed examples apart "
                    f"(its attention mask ignores position_ids); run without {flag}"
                )
            if config.packing:
                self.train_examples = self._pack(self.train_examples, "train")
            if pack_eval and self.eval_examples:
                self.eval_examples = self._pack(self.eval_examples, "eval")
        self.model = self.runtime.prepare_model(model)

    # ------------------------------------------------------------------------------------------------------
    def _pack(self, examples: list[dict], name: str) -> list[dict]:
        limit, strategy = self.config.max_length, self.config.packing_strategy
        if strategy == "wrapped":
            packed = wrap_sft_examples(examples, limit)
        else:
            packed = pack_sft_examples(split_sft_examples(examples, limit) if strategy == "bfd_split" else examples,
                                       limit)
        self._log(f"{name} data: {len(examples)} examples packed into {len(packed)} rows of up to {limit} tokens")
        return packed


    def _log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            logger.info(message)

    def compute_loss(self, model, batch: dict[str, torch.Tensor]) -> LossTerms:
        """Mean NLL over the target tokens of a collated batch, ``mean_token_accuracy`` (the fraction of
        target tokens that are the argmax of the logits) and ``entropy`` (the mean entropy of the distributions
        the targets are predicted from, nats, from the same logits); TRL SFT's metrics."""
        token_logps, correct, entropy = target_token_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["loss_mask"],
            position_ids=batch.get("position_ids"),
            with_entropy=True,
        )
        count = max(token_logps.numel(), 1)  # a batch without targets gives a finite 0
        if self.config.loss_type == "dft":  # TRL's dft_loss: -p.detach() * log p per token
            token_logps = token_logps * token_logps.detach().exp()
        loss = -token_logps.sum() / count
        return [(loss, {"mean_token_accuracy": correct.float().sum() / count, "entropy": entropy.sum() / count})]

    plot_panels = SFT_PLOTS

    def loop_inputs(self) -> dict:
        return {"model": self.model, "train_dataset": self.train_examples, "eval_dataset": self.eval_examples,
                "collate_fn": self.collate}

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """A micro-batch of examples as tensors (:func:`~alignlab.data.sft.collate_sft`); with ``padding_free``
        one row without padding (:func:`~alignlab.data.sft.padding_free_row`)."""
        if self.config.padding_free:
            examples = padding_free_row(examples)
        return collate_sft(examples, self.tokenizer.pad_token_id)


def train_sft(config: SFTConfig) -> TrainResult:
    """Run supervised fine-tuning as configured; the Python twin of ``alignlab sft``."""
    return SFTTrainer(config).train()


register_method(Method(
    command="sft",
    summary="supervised fine-tuning on prompt-completion, conversational or plain-text data",
    config=SFTConfig,
    train=train_sft,
    online=False,
    curve_metric="mean_token_accuracy",
    eval_metric="eval_mean_token_accuracy",
))

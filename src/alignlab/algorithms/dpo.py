"""Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290): glue between preference data,
:mod:`alignlab.losses.dpo` and the shared training loop.

Flow: rows -> pairs -> tokenized examples -> batch of [chosen; rejected] -> one policy forward for both ->
sequence logps -> (reference logps) -> DPO loss -> optimizer step -> metrics.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch

from alignlab.data.preference import build_pair_examples, collate_pairs
from alignlab.errors import UserError
from alignlab.losses.dpo import dpo_loss, dpo_metrics
from alignlab.models import is_peft_model, load_causal_lm, load_tokenizer
from alignlab.ops.logprobs import completion_logps
from alignlab.train.config import TrainConfig
from alignlab.train.loop import Trainer, TrainResult, autocast, build_accelerator
from alignlab.train.setup import load_train_eval, prepare_model


DPO_PLOTS = {
    "rewards_accuracies": ["rewards/accuracies"],
    "rewards_margins": ["rewards/margins"],
    "rewards": ["rewards/chosen", "rewards/rejected"],
    "logps": ["logps/chosen", "logps/rejected"],
}


@dataclass
class DPOConfig(TrainConfig):
    """Settings of ``alignlab dpo``; names and defaults follow TRL's ``DPOConfig`` (TRL 1.16)."""

    learning_rate: float = 1e-6
    """Peak AdamW learning rate (TRL's DPO default)."""
    beta: float = 0.1
    """DPO's beta: strength of the implicit KL penalty to the reference model (the paper's beta; IPO's tau)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """sigmoid: DPO (eq. 7); ipo: IPO (Azar et al. 2023); hinge: SLiC (Zhao et al. 2023); robust: rDPO
    (Chowdhury et al. 2024). See docs/dpo.md."""
    label_smoothing: float = 0.0
    """Assumed rate of flipped preference labels in [0, 0.5): conservative DPO with loss_type sigmoid, robust
    DPO with loss_type robust."""
    max_length: int | None = 1024
    """Cap on prompt+completion tokens per sequence; longer pairs are handled by ``truncation_mode``."""
    truncation_mode: Literal["keep_start", "keep_end", "drop"] = "keep_start"
    """keep_start: cut the end (TRL's default); keep_end: cut the start; drop: drop the pair."""
    padding_free: bool = True
    """Pack the chosen and rejected sequences of a batch into as few rows as fit, with restarting position ids,
    so no compute goes to padding (the same numbers as padded rows; TRL's ``padding_free``, off there by
    default). Used for model types whose masks support it (Llama, Mistral, Qwen, Gemma, Phi-3, ...)."""
    ref_model_name_or_path: str | None = None
    """The reference model, when it is not the initial policy (e.g. the first round's start in iterative DPO).
    Unset: a frozen copy of the policy, or with ``use_peft`` the policy with its adapters disabled."""
    precompute_ref_log_probs: bool = False
    """Compute the reference log-probs once before training and free the reference model."""
    prompt_column: str = "prompt"
    """Column holding the prompt (explicit-prompt data)."""
    chosen_column: str = "chosen"
    """Column holding the preferred completion (or full transcript)."""
    rejected_column: str = "rejected"
    """Column holding the dispreferred completion (or full transcript)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise UserError(f"--beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise UserError(f"--label_smoothing applies to --loss_type sigmoid or robust, not {self.loss_type}")
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"--max_length must be >= 2, got {self.max_length}")


class DPOTrainer:
    """DPO of a causal LM on preference pairs.

    >>> trainer = DPOTrainer(DPOConfig(dataset_name="builtin:concise", output_dir="runs/dpo", max_steps=10))
    >>> result = trainer.train()   # writes the model, metrics.jsonl, config.yaml and plots/ to output_dir

    The reference model is a frozen copy of the initial policy; with ``use_peft`` it is the same network
    with the adapters disabled (no second copy in memory); with ``precompute_ref_log_probs`` its log-probs
    are computed once before training and the copy is freed.

    Raises:
        UserError / DataError: bad flags, unreadable data, a bad row (named by file and line or row).
    """

    def __init__(self, config: DPOConfig):
        self.config = config
        self.accelerator = build_accelerator(config)
        self.tokenizer = load_tokenizer(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
        self.train_examples, self.eval_examples = load_train_eval(
            config,
            build_pair_examples,
            self.tokenizer,
            is_main_process=self.accelerator.is_main_process,
            max_length=config.max_length,
            truncation_mode=config.truncation_mode,
            prompt_column=config.prompt_column,
            chosen_column=config.chosen_column,
            rejected_column=config.rejected_column,
        )
        policy = load_causal_lm(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
        self.ref_model = None
        if config.ref_model_name_or_path:
            ref = load_causal_lm(config.ref_model_name_or_path, trust_remote_code=config.trust_remote_code)
            self.ref_model = ref.to(self.accelerator.device).eval().requires_grad_(False)
        elif not config.use_peft:  # with LoRA the reference is the same network with its adapters disabled
            self.ref_model = copy.deepcopy(policy).to(self.accelerator.device).eval().requires_grad_(False)
        self.policy = prepare_model(policy, config, self.accelerator.device)

        if config.precompute_ref_log_probs:
            for examples in (self.train_examples, self.eval_examples):
                self._precompute_ref_logps(examples)
            self.ref_model = None  # freed: the logps travel with the examples

    # ------------------------------------------------------------------------------------------------------
    def _logps(self, model, batch) -> torch.Tensor:
        """``(2B,)`` sequence logps of a collated batch under ``model``."""
        return completion_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            padding_free=self.config.padding_free,
            pad_token_id=self.tokenizer.pad_token_id,
        )[1]

    def _reference_logps(self, model, batch) -> torch.Tensor:
        """``(2B,)`` reference sequence logps for a collated batch, without gradients."""
        with torch.no_grad():
            if self.ref_model is not None:
                return self._logps(self.ref_model, batch)
            unwrapped = self.accelerator.unwrap_model(model)
            if not is_peft_model(unwrapped):
                raise RuntimeError("no reference model and no adapters to disable")
            with unwrapped.disable_adapter():
                return self._logps(unwrapped, batch)

    def _precompute_ref_logps(self, examples: list[dict]) -> None:
        size = self.config.per_device_eval_batch_size
        device = self.accelerator.device
        model = self.ref_model if self.ref_model is not None else self.policy
        model.eval()
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, self.tokenizer.pad_token_id).items()}
            with autocast(self.config, device):
                logps = self._reference_logps(model, batch)
            chosen, rejected = logps.float().cpu().chunk(2)
            for example, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                example["ref_chosen_logps"] = c
                example["ref_rejected_logps"] = r
        self.policy.train()

    def compute_loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DPO loss and metrics on a collated batch (rows ``[chosen; rejected]``).

        Chosen and rejected go through the policy in one forward pass. Metrics (per pair): TRL's
        ``rewards/*`` and ``logps/*``.
        """
        cfg = self.config
        logps = self._logps(model, batch)
        chosen_logps, rejected_logps = logps.chunk(2)
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self._reference_logps(model, batch).chunk(2)
        chosen_logratios = chosen_logps - ref_chosen
        rejected_logratios = rejected_logps - ref_rejected
        lengths = batch["completion_mask"][:, 1:].sum(dim=1).float()
        chosen_lengths, rejected_lengths = lengths.chunk(2)
        losses = dpo_loss(
            cfg.loss_type,
            chosen_logratios,
            rejected_logratios,
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )
        metrics = dpo_metrics(chosen_logratios, rejected_logratios, beta=cfg.beta)
        metrics["logps/chosen"] = chosen_logps.detach()
        metrics["logps/rejected"] = rejected_logps.detach()
        return losses.mean(), metrics

    def train(self) -> TrainResult:
        """Train, evaluate, save; returns where everything went."""
        trainer = Trainer(
            self.config,
            self.accelerator,
            self.policy,
            self.tokenizer,
            self.train_examples,
            eval_dataset=self.eval_examples,
            collate_fn=lambda ex: collate_pairs(ex, self.tokenizer.pad_token_id),
            loss_fn=self.compute_loss,
            plot_panels=DPO_PLOTS,
        )
        result = trainer.train()
        self.policy = trainer.model
        return result


def train_dpo(config: DPOConfig) -> TrainResult:
    """Run DPO as configured; the Python twin of ``alignlab dpo``."""
    return DPOTrainer(config).train()

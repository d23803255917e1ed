"""GRPO (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300): its config, the registry's ``"grpo"`` estimator
(:mod:`alignlab.advantages.group`) in the shared policy-gradient rollout
(:class:`~alignlab.algorithms.online.PolicyGradientAlgorithm`), and its loss (:mod:`alignlab.losses.ppo`).

Flow of one step (TRL 1.16 ``GRPOTrainer``): prompts -> ``num_generations`` completions each (KV cache) ->
rewards (reward functions and/or a reward model) -> group-relative advantages -> (old log-probs when
``num_iterations`` > 1; reference log-probs when ``beta`` > 0) -> ``num_iterations`` optimizer steps on the
clipped surrogate (+ ``beta * k3`` KL), per-token losses reduced as ``loss_type`` says. No value model: the
group mean is the baseline. PPO and GRPO share the clipped objective and differ in the advantages.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from alignlab.advantages.group import MULTI_OBJECTIVE_AGGREGATIONS, normalize_then_sum
from alignlab.algorithms.online import GenerationBatchConfig, PolicyGradientAlgorithm, group_sampling_args
from alignlab.errors import UserError
from alignlab.losses.ppo import (
    adaptive_entropy_coef, aggregate_token_loss, clip_ratio_metrics, entropy_bonus, get_policy_loss, high_entropy_mask, importance_weights,
    off_policy_sequence_mask, policy_loss_kwargs,
)
from alignlab.train.config import Range
from alignlab.train.trl_args import GRPOTrlFields, PolicyGradientTrlFields, VllmFields
from alignlab.methods import CompareEntry, Method, register_method
from alignlab.ops.kl import kl_k3
from alignlab.ops.masked import masked_mean_or_zero
from alignlab.train.types import TrainResult
from alignlab.train.steps import LossTerms

logger = logging.getLogger(__name__)

GRPO_PLOTS = {
    "reward": ["reward"],
    "reward_std": ["reward_std"],
    "kl": ["kl"],
    "clip_ratio": ["clip_ratio/region_mean"],
    "entropy": ["entropy"],
    "completion_length": ["completions/mean_length"],
}


@dataclass
class GRPOConfig(GRPOTrlFields, PolicyGradientTrlFields, VllmFields, GenerationBatchConfig):
    """Settings of ``alignlab grpo``; names and defaults follow TRL 1.16's ``GRPOConfig`` unless a field's
    docstring says otherwise. ``per_device_train_batch_size`` counts completions, as in TRL: one step samples
    ``per_device_train_batch_size * steps_per_generation`` completions per process (``steps_per_generation``
    defaults to ``gradient_accumulation_steps``), ``num_generations`` for each of that many /
    ``num_generations`` prompts."""

    learning_rate: float = 1e-6
    """Peak AdamW learning rate (TRL's GRPO default)."""
    num_generations: int = 8
    """Completions per prompt (the group). The completions per step must be a multiple of it."""
    max_completion_length: int = 512
    """Most tokens sampled per completion (TRL's default)."""
    disable_dropout: bool = False
    """Set every dropout probability to 0 (off by default, as TRL's GRPO)."""
    shuffle_dataset: bool = True
    """Shuffle the prompts each epoch (TRL's ``shuffle_dataset``; false: in data-set order)."""
    beta: float = 0.0
    """Weight of the per-token k3 KL to the reference (TRL 1.16's default 0: no reference model is loaded)."""
    use_bias_correction_kl: bool = True
    """With ``beta`` > 0, multiply each token's k3 KL by its importance weight (the ratio of the clipped loss,
    per sequence with ``importance_sampling_level`` sequence), so that its gradient is the unbiased
    reverse-KL gradient (DeepSeek-V3.2, arXiv 2512.02556; TRL 1.16's ``use_bias_correction_kl``, default on).
    It changes the gradient even on-policy, where the weight is 1: its derivative adds ``kl * grad logp``."""
    epsilon: float = 0.2
    """Lower clip range of the ratio (and the upper one unless ``epsilon_high`` is set)."""
    epsilon_high: float | None = None
    """Upper clip range ("clip-higher", DAPO uses 0.28). Unset: ``epsilon``."""
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"] = "dapo"
    """The per-token policy loss and how it is averaged (TRL 1.16's names): grpo (clipped, per sequence then
    over sequences; the paper's eq. 3), dapo (clipped, over all tokens of the step; TRL's default, Yu et al.
    2025), dr_grpo (clipped, by a constant, Liu et al. 2025), bnpo (clipped, over the micro-batch's tokens),
    cispo (clipped importance weight times the REINFORCE term, MiniMax-M1; averaged as dapo) and sapo (soft
    gate instead of the clip; averaged as grpo). See docs/grpo.md and docs/advantages.md."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """token: a ratio per token; sequence: one length-normalised ratio per completion (GSPO, Zheng et al.
    2025)."""
    sapo_temperature_pos: float = 1.0
    """SAPO's gate temperature for tokens with a positive advantage (TRL's default)."""
    sapo_temperature_neg: float = 1.05
    """SAPO's gate temperature for the other tokens (TRL's default)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide the group-centred rewards by the group's std (the paper), the batch's std, or nothing (Dr. GRPO)."""
    num_iterations: int = 1
    """Optimizer steps per sampled batch (the paper's mu). Above 1 the old log-probs are computed once."""
    delta: float | None = None
    """Two-sided clipping (INTELLECT-2, arXiv 2505.07291): cap the unclipped ratio at ``delta`` (> 1 + epsilon
    recommended) so that tokens with a negative advantage cannot get arbitrarily large updates; unset: off
    (TRL's ``delta``; grpo, bnpo, dr_grpo and dapo losses)."""

    RANGES: ClassVar[dict[str, Range]] = {
        "max_completion_length": Range(ge=1), "num_iterations": Range(ge=1), "beta": Range(ge=0),
        "epsilon": Range(gt=0, lt=1), "epsilon_high": Range(gt=0), "sapo_temperature_pos": Range(gt=0),
        "sapo_temperature_neg": Range(gt=0), "delta": Range(gt=1), "top_entropy_quantile": Range(ge=0, le=1),
        "off_policy_mask_threshold": Range(gt=0),
    }
    """The ranges of the numeric flags (:func:`alignlab.train.config.check_ranges`; ``num_generations`` >= 2 is
    :data:`~alignlab.train.config.FIELD_RANGES`')."""

    def __post_init__(self) -> None:
        super().__post_init__()
        per_step = self.per_device_train_batch_size * self.resolved_steps_per_generation
        if per_step % self.num_generations:
            raise UserError(
                f"per_device_train_batch_size x steps_per_generation = {per_step} completions per step is not "
                f"a multiple of --num_generations {self.num_generations}"
            )
        if self.use_adaptive_entropy and not 0 <= self.entropy_coef_min <= self.entropy_coef_max:
            raise UserError(f"--entropy_coef_min {self.entropy_coef_min} and --entropy_coef_max "
                            f"{self.entropy_coef_max}: need 0 <= min <= max")
        if self.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
            raise UserError(f"--multi_objective_aggregation must be one of {', '.join(MULTI_OBJECTIVE_AGGREGATIONS)}, "
                            f"got {self.multi_objective_aggregation!r}")
        if self.multi_objective_aggregation == "normalize_then_sum" and self.missing_eos_penalty:
            raise UserError("--missing_eos_penalty changes the summed reward, which normalize_then_sum does not use: "
                            "drop one")
        if self.loss_type == "cispo" and self.epsilon_high is None:
            raise UserError("--loss_type cispo caps the importance weight at --epsilon_high: give it (e.g. 5.0)")

    @property
    def prompts_per_step(self) -> int:
        """Prompts per process per step."""
        return self.per_device_train_batch_size * self.resolved_steps_per_generation // self.num_generations


class AdaptiveEntropy:
    """TRL's adaptive entropy control (``use_adaptive_entropy``): the coefficient in force, the entropy measured
    over the last optimizer step (``inf`` before the first: no bonus), and the current step's running sum and
    token count. accelerate's checkpointable object (``state_dict`` / ``load_state_dict``), so a resumed run
    goes on with the same coefficient."""

    def __init__(self, coef: float):
        self.coef, self.last_entropy = coef, math.inf
        self.window = torch.zeros(2, dtype=torch.float64)
        self.pending: list[int] = []
        """Micro-batches per optimizer step of the rollout being trained on (one entry per update)."""
        self.seen = 0

    def state_dict(self) -> dict[str, float]:
        return {"entropy_coef": self.coef, "last_world_entropy": self.last_entropy}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef, self.last_entropy = float(state["entropy_coef"]), float(state["last_world_entropy"])


class GRPOTrainer(PolicyGradientAlgorithm):
    """GRPO of a causal LM against reward functions and/or a reward model: the shared policy-gradient rollout
    (:class:`~alignlab.algorithms.online.PolicyGradientAlgorithm`) with the registry's ``"grpo"`` estimator and
    the KL to the reference in the loss.

    Raises:
        UserError / DataError: bad flags, unreadable data or models, a bad row, a failing reward function.
    """

    plot_panels = GRPO_PLOTS

    def __init__(self, config: GRPOConfig):
        super().__init__(
            config, group_size=config.num_generations, iterations=config.num_iterations,
            max_new_tokens=config.max_completion_length, kl_coef=config.beta, kl_in_loss=True,
            batch_hint="per_device_train_batch_size x gradient_accumulation_steps / num_generations",
        )
        self.adaptive = None
        if config.use_adaptive_entropy:
            self.adaptive = AdaptiveEntropy(config.entropy_coef)
            self.accelerator.register_for_checkpointing(self.adaptive)

    def planned_updates(self, micro_batches: list[int]) -> None:
        """With ``use_adaptive_entropy``, the rollout's micro-batches per optimizer step, so that the controller
        updates once per optimizer step."""
        if self.adaptive is not None:
            self.adaptive.pending, self.adaptive.seen = list(micro_batches), 0

    def _entropy_coef(self, entropies: torch.Tensor, counted: torch.Tensor, training: bool) -> float:
        """The entropy bonus's coefficient for this micro-batch: ``entropy_coef``, or with adaptive control the
        controller's while the last step's entropy is at or below ``entropy_target`` (else 0); in training, the
        micro-batch's entropy joins the step's, and after the step's last micro-batch the coefficient moves
        (:func:`~alignlab.losses.ppo.adaptive_entropy_coef`, the entropy over every process's tokens)."""
        cfg, ctl = self.config, self.adaptive
        if ctl is None:
            return cfg.entropy_coef
        coef = ctl.coef if ctl.last_entropy <= cfg.entropy_target else 0.0
        if training and ctl.pending:
            m = counted.bool()
            ctl.window += torch.stack([torch.where(m, entropies.detach(), 0.0).sum().double().cpu(),
                                       m.sum().double().cpu()])
            ctl.seen += 1
            if ctl.seen == ctl.pending[0]:
                total = self.runtime.gather(ctl.window.float().reshape(1, 2).to(self.accelerator.device))
                total = total.reshape(-1, 2).sum(0)
                ctl.last_entropy = float(total[0] / total[1].clamp(min=1))
                ctl.coef = adaptive_entropy_coef(ctl.coef, ctl.last_entropy, target=cfg.entropy_target,
                                                 delta=cfg.entropy_coef_delta, low=cfg.entropy_coef_min,
                                                 high=cfg.entropy_coef_max)
                ctl.pending.pop(0)
                ctl.seen, ctl.window = 0, torch.zeros(2, dtype=torch.float64)
        return coef

    def advantage_estimator(self) -> tuple[str, dict[str, Any]]:
        """Group-relative advantages (:func:`alignlab.advantages.group.group_advantages`); with
        ``multi_objective_aggregation`` normalize_then_sum, the batch std of the group-centred GDPO sum, as TRL."""
        if self.config.multi_objective_aggregation == "normalize_then_sum":
            return "grpo", {"scale_rewards": "batch"}
        return "grpo", {"scale_rewards": self.config.scale_rewards}

    def advantage_scores(self, scored, group_size: int) -> torch.Tensor:
        """The weighted reward sum, or with ``multi_objective_aggregation`` normalize_then_sum each source's
        group-normalised rewards summed with their weights (:func:`~alignlab.advantages.group.normalize_then_sum`)."""
        if self.config.multi_objective_aggregation != "normalize_then_sum":
            return scored.scores
        sources = self.setup.sources
        per_source = torch.stack([scored.per_source[source.name] for source in sources], dim=1)
        weights = torch.tensor([source.weight for source in sources])
        return normalize_then_sum(per_source, weights, group_size)

    def rollout_metrics(self, scored, data, kl, estimator_metrics) -> dict[str, Any]:
        """The shared metrics less ``reward_std_within_group`` (TRL 1.16 logs the batch std as ``reward_std``)."""
        metrics = super().rollout_metrics(scored, data, kl, estimator_metrics)
        metrics.pop("reward_std_within_group", None)
        return metrics

    def compute_loss(self, model, batch: dict[str, torch.Tensor]) -> LossTerms:
        """Clipped surrogate (+ ``beta`` k3 KL, times the importance weight with ``use_bias_correction_kl``) per
        token, reduced by ``loss_type``, on one micro-batch. Metrics (TRL 1.16's): ``entropy``, the clip statistics
        of :func:`~alignlab.losses.ppo.clip_ratio_metrics` (``cispo_clip_ratio`` for cispo, none for sapo) and
        ``kl`` with ``beta`` > 0. As TRL, the policy term (not the KL) is multiplied by the off-policy sequence
        mask (``off_policy_mask_threshold``, :func:`~alignlab.losses.ppo.off_policy_sequence_mask`) and the
        high-entropy token mask (``top_entropy_quantile`` < 1, :func:`~alignlab.losses.ppo.high_entropy_mask`,
        the quantile over every process's tokens of the micro-batch); the reduction still counts every token.
        With ``entropy_coef``, minus the entropy bonus (:func:`~alignlab.losses.ppo.entropy_bonus`, over the same
        tokens as the policy term), logged as ``entropy_coef``."""
        cfg = self.config
        mask = batch["response_mask"].bool()
        metrics: dict[str, Any] = {}
        entropies: list[torch.Tensor] = []
        bonus = cfg.entropy_coef != 0.0 or cfg.use_adaptive_entropy  # TRL's: the entropies keep their gradient
        logps, old_logps = self.current_and_old_logps(model, batch, metrics, entropies=entropies,  # + TRL's entropy
                                                      entropy_grad=bonus)
        # the loss's hyperparameters, read from the config as the policy-loss registry declares them
        per_token, policy_metrics = get_policy_loss(cfg.loss_type)(
            logps, old_logps, batch["advantages"], mask, **policy_loss_kwargs(cfg.loss_type, cfg))
        if cfg.off_policy_mask_threshold is not None:
            per_token = per_token * off_policy_sequence_mask(
                batch["advantages"], logps, old_logps, mask, cfg.off_policy_mask_threshold)
        counted = mask  # the tokens the entropy bonus averages over: those of the policy term
        if cfg.top_entropy_quantile < 1.0:
            counted = high_entropy_mask(entropies[0], mask, cfg.top_entropy_quantile,
                                        pool=self._gathered(entropies[0].detach()[mask]))
            per_token = per_token * counted
        if cfg.loss_type == "cispo":
            metrics["cispo_clip_ratio"] = policy_metrics["policy/clipfrac"]
        elif cfg.loss_type != "sapo":  # TRL's clip statistics of the clipped losses
            metrics.update(clip_ratio_metrics(
                logps, old_logps, batch["advantages"], mask, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                importance_sampling_level=cfg.importance_sampling_level))
        if cfg.beta > 0:
            kl = kl_k3(logps, batch["ref_logps"])
            if cfg.use_bias_correction_kl:  # TRL 1.16: per_token_kl * coef_1
                kl = kl * importance_weights(logps, old_logps, mask,
                                             importance_sampling_level=cfg.importance_sampling_level)
            per_token = per_token + cfg.beta * kl
            metrics["kl"] = masked_mean_or_zero(kl.detach(), mask)
        loss = aggregate_token_loss(
            per_token, mask, loss_type=cfg.loss_type, max_completion_length=cfg.max_completion_length,
            num_items_in_batch=batch["num_items_in_batch"],
        )
        if bonus:
            coef = self._entropy_coef(entropies[0], counted, torch.is_grad_enabled())  # no_grad: evaluation
            loss = loss - entropy_bonus(entropies[0], counted, coef)
            metrics["entropy_coef"] = self.adaptive.coef if self.adaptive is not None else coef
        return [(loss, metrics)]


    def _gathered(self, values: torch.Tensor) -> torch.Tensor:
        """1-D ``values`` of every process, concatenated (TRL's pad-gather-drop with a negative sentinel)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return values
        sentinel = -1e9  # entropies are >= 0
        gathered = acc.gather(acc.pad_across_processes(values.float(), dim=0, pad_index=sentinel))
        return gathered[gathered != sentinel]


def train_grpo(config: GRPOConfig) -> TrainResult:
    """Run GRPO as configured; the Python twin of ``alignlab grpo``."""
    return GRPOTrainer(config).train()


register_method(Method(
    command="grpo",
    summary="GRPO: group-relative advantages over several completions per prompt, no value model",
    config=GRPOConfig,
    train=train_grpo,
    online=True,
    curve_metric="reward",
    final_metrics=("reward", "kl"),
    compare=(CompareEntry(
        name="grpo",
        args=lambda b: group_sampling_args(b, "num_generations"),
        learning_rate=1e-5,
        curve_label="task reward",
    ),),
))

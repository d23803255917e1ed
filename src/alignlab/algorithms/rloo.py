"""RLOO (Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740): REINFORCE with a leave-one-out baseline. Its
config, the registry's ``"rloo"`` estimator (:mod:`alignlab.advantages.rloo`) in the shared policy-gradient rollout
(:class:`~alignlab.algorithms.online.PolicyGradientAlgorithm`), and its sequence-level loss.

Flow of one RLOO step (TRL 1.16 ``RLOOTrainer``): prompts -> ``num_generations`` completions each -> rewards
(reward functions and/or a reward model) -> sampling-time log-probs (and the reference's when ``beta`` > 0) ->
``R = clip(reward) - beta * sum_t (log pi_old - log pi_ref)`` -> leave-one-out advantages -> ``num_iterations``
optimizer steps on the clipped surrogate of the *sequence* ratio ``exp(sum_t log pi - sum_t log pi_old)``,
averaged over sequences. No value model, no KL term in the loss (the KL is in the reward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from alignlab.algorithms.online import GenerationBatchConfig, PolicyGradientAlgorithm, group_sampling_args
from alignlab.errors import UserError
from alignlab.losses.ppo import clipped_policy_loss
from alignlab.train.config import Range
from alignlab.train.trl_args import PolicyGradientTrlFields, VllmFields
from alignlab.methods import CompareEntry, Method, register_method
from alignlab.train.types import TrainResult
from alignlab.train.steps import LossTerms


@dataclass
class RLOOConfig(PolicyGradientTrlFields, VllmFields, GenerationBatchConfig):
    """Settings of ``alignlab rloo``; names and defaults follow TRL 1.16's ``RLOOConfig`` unless a field's
    docstring says otherwise. ``per_device_train_batch_size`` counts completions, as in TRL: one step samples
    ``per_device_train_batch_size * steps_per_generation`` completions per process (``steps_per_generation``
    defaults to ``gradient_accumulation_steps``), ``num_generations`` for each of that many / ``num_generations``
    prompts."""

    learning_rate: float = 1e-6
    """Peak AdamW learning rate (TRL's RLOO default)."""
    num_generations: int = 2
    """Completions per prompt, >= 2 (each one's baseline is the mean reward of the others)."""
    max_completion_length: int = 512
    """Most tokens sampled per completion (TRL's default)."""
    disable_dropout: bool = False
    """Set every dropout probability to 0 (off by default, as TRL's RLOO)."""
    shuffle_dataset: bool = True
    """Shuffle the prompts each epoch (TRL's ``shuffle_dataset``; false: in data-set order)."""
    beta: float = 0.05
    """KL coefficient: ``beta * sum_t (log pi_old - log pi_ref)`` is subtracted from each completion's reward
    (TRL's default; 0: no reference model is loaded)."""
    num_iterations: int = 1
    """Optimizer steps per sampled batch (the paper's mu). Above 1 the old log-probs are kept from sampling."""
    epsilon: float = 0.2
    """Lower clip range of the sequence ratio (and the upper one unless ``epsilon_high`` is set)."""
    epsilon_high: float | None = None
    """Upper clip range. Unset: ``epsilon``."""
    normalize_advantages: bool = False
    """Whiten the advantages over the sampled batch (mean 0, std 1; TRL's name and default)."""
    reward_clip_range: list[float] | None = None
    """``low high``: clamp each reward to this range before the KL penalty and the baseline (TRL)."""

    RANGES: ClassVar[dict[str, Range]] = {
        "num_generations": Range(ge=2, why="the leave-one-out baseline"), "max_completion_length": Range(ge=1),
        "num_iterations": Range(ge=1), "beta": Range(ge=0), "epsilon": Range(gt=0, lt=1), "epsilon_high": Range(gt=0),
    }
    """The ranges of the numeric flags (:func:`alignlab.train.config.check_ranges`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reward_clip_range is not None:
            clip = list(self.reward_clip_range)
            if len(clip) != 2 or not clip[0] < clip[1]:
                raise UserError(f"--reward_clip_range takes two numbers low < high, got {clip}")
            self.reward_clip_range = clip


class RLOOTrainer(PolicyGradientAlgorithm):
    """RLOO of a causal LM against reward functions and/or a reward model.

    Raises:
        UserError / DataError: bad flags, unreadable data or models, a bad row, a failing reward function.
    """

    plot_panels = {"reward": ["reward"], "reward_std": ["reward_std"], "kl": ["kl"],
                   "clip_ratio": ["clip_ratio/region_mean"], "entropy": ["entropy"],
                   "completion_length": ["completions/mean_length"]}

    def __init__(self, config: RLOOConfig):
        super().__init__(config, group_size=config.num_generations, iterations=config.num_iterations,
                         max_new_tokens=config.max_completion_length, kl_coef=config.beta,
                         batch_hint="per_device_train_batch_size x gradient_accumulation_steps / num_generations")

    def advantage_estimator(self) -> tuple[str, dict[str, Any]]:
        """Leave-one-out advantages (:func:`~alignlab.advantages.rloo.rloo_advantages`), the k1 KL in the reward."""
        cfg = self.config
        return "rloo", {"normalize_advantages": cfg.normalize_advantages, "reward_clip_range": cfg.reward_clip_range,
                        "beta": cfg.beta}

    def compute_loss(self, model, batch: dict[str, torch.Tensor]) -> LossTerms:
        """TRL 1.16 ``RLOOTrainer._compute_loss``: ``-min(r A, clip(r, 1 - eps, 1 + eps_high) A)`` with the sequence
        ratio ``r = exp(sum_t log pi - sum_t log pi_old)``, averaged over the micro-batch's completions; with TRL's
        ``entropy`` (mean over the completion tokens) beside :func:`rloo_policy_loss`'s clip statistics."""
        entropy: dict[str, Any] = {}
        logps, old_logps = self.current_and_old_logps(model, batch, entropy)
        [(loss, metrics)] = rloo_policy_loss(logps.sum(-1), old_logps.sum(-1), batch["advantages"],
                                             epsilon=self.config.epsilon, epsilon_high=self.config.epsilon_high)
        return [(loss, {**metrics, **entropy})]


def rloo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, *, epsilon: float,
                     epsilon_high: float | None = None) -> LossTerms:
    """RLOO's clipped sequence-level surrogate as one loss term.

    ``loss = mean_i max(-A_i r_i, -A_i clip(r_i, 1 - epsilon, 1 + epsilon_high))``, ``r_i = exp(logps_i -
    old_logps_i)``. Source: TRL 1.16 ``RLOOTrainer._compute_loss`` (PPO's eq. 7 on sequence ratios).

    Args:
        logps, old_logps: ``(N,)`` summed completion log-probs (nats) under the current and the sampling policy.
        advantages: ``(N,)`` detached advantages.
        epsilon, epsilon_high: the clip range (``epsilon_high`` ``None``: ``epsilon``).

    Returns:
        ``[(loss, metrics)]`` with TRL's ``clip_ratio/region_mean``, ``clip_ratio/low_mean`` and
        ``clip_ratio/high_mean`` (fractions of the completions clipped below with ``A < 0``, above with
        ``A > 0``, either), ``clip_ratio/low_min`` and ``clip_ratio/high_max`` (the smallest low-clipped and
        the largest high-clipped indicator over the completions: TRL's ``nanmin`` / ``nanmax``).
    """
    ones = torch.ones_like(logps, dtype=torch.bool).unsqueeze(1)
    per_sequence, policy_metrics = clipped_policy_loss(logps.unsqueeze(1), old_logps.unsqueeze(1), advantages, ones,
                                                       cliprange=epsilon, cliprange_high=epsilon_high)
    with torch.no_grad():
        ratio = torch.exp(logps - old_logps)
        high = epsilon if epsilon_high is None else epsilon_high
        low = ((ratio < 1 - epsilon) & (advantages < 0)).float()
        above = ((ratio > 1 + high) & (advantages > 0)).float()
        metrics = {"clip_ratio/region_mean": policy_metrics["policy/clipfrac"], "clip_ratio/low_mean": low.mean(),
                   "clip_ratio/high_mean": above.mean(), "clip_ratio/low_min": low.min(),
                   "clip_ratio/high_max": above.max()}
    return [(per_sequence.mean(), metrics)]


def train_rloo(config: RLOOConfig) -> TrainResult:
    """Run RLOO as configured; the Python twin of ``alignlab rloo``."""
    return RLOOTrainer(config).train()


register_method(Method(
    command="rloo", config=RLOOConfig, train=train_rloo, online=True, curve_metric="reward",
    summary="RLOO: REINFORCE with a leave-one-out baseline over several completions per prompt, no value model",
    final_metrics=("reward", "kl"),
    compare=(CompareEntry(name="rloo", args=lambda b: group_sampling_args(b, "num_generations"), learning_rate=1e-5,
                          curve_label="task reward"),),
))

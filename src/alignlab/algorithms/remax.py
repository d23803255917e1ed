"""ReMax (Li et al. 2023, arXiv 2310.10505): REINFORCE whose baseline is the reward of the greedy completion of
the same prompt; no value model. Its config, the registry's ``"remax"`` estimator (:mod:`alignlab.advantages.remax`)
in the shared policy-gradient rollout (:class:`~alignlab.algorithms.online.PolicyGradientAlgorithm`, which samples
and scores the greedy completions because the estimator declares ``needs_greedy_baseline``), and its loss.

Flow of one step (veRL ``algorithm.adv_estimator=remax``): prompts -> ``num_generations`` sampled completions each
and one greedy completion each -> rewards of both -> (reference log-probs and the per-token k1 KL when ``beta``
> 0) -> token rewards ``-beta * k1_t`` plus the score on the last token -> returns minus the greedy score ->
``num_iterations`` optimizer steps on the per-token clipped surrogate, averaged over the micro-batch's completion
tokens (veRL's ``token-mean``; with one iteration the ratio is 1 and this is REINFORCE, the paper's gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from alignlab.algorithms.online import OnlineConfig, PolicyGradientAlgorithm, group_sampling_args
from alignlab.methods import CompareEntry, Method, register_method
from alignlab.train.config import Range
from alignlab.train.types import TrainResult
from alignlab.train.steps import LossTerms


@dataclass
class ReMaxConfig(OnlineConfig):
    """Settings of ``alignlab remax``; flag names follow TRL's online trainers (``num_generations``, ``beta``,
    ``max_completion_length``, ``epsilon``, ``num_iterations``). ``per_device_train_batch_size`` counts sampled
    completions: one step samples ``per_device_train_batch_size * gradient_accumulation_steps`` of them per
    process, ``num_generations`` for each prompt, plus one greedy completion per prompt (not trained on)."""

    learning_rate: float = 1e-6
    """Peak AdamW learning rate (TRL's RLOO default; veRL's ReMax example uses 1e-6 too)."""
    num_generations: int = 1
    """Sampled completions per prompt, each against the prompt's greedy completion (the paper: 1; veRL's
    example: 4)."""
    max_completion_length: int = 256
    """Most tokens per completion, sampled and greedy (256 as ``alignlab grpo`` and ``rloo``)."""
    beta: float = 0.0
    """KL coefficient: each completion token's reward is ``-beta * (log pi_old - log pi_ref)`` (k1), the score is
    added on the last token (veRL's ``use_kl_in_reward``; its ReMax example uses 0.001). 0 (the paper's
    Algorithm 1 has no KL term): no reference model is loaded."""
    num_iterations: int = 1
    """Optimizer steps per sampled batch; above 1 the old log-probs are kept and the loss is clipped."""
    epsilon: float = 0.2
    """Lower clip range of the per-token ratio (and the upper one unless ``epsilon_high`` is set)."""
    epsilon_high: float | None = None
    """Upper clip range. Unset: ``epsilon``."""

    RANGES: ClassVar[dict[str, Range]] = {
        "num_generations": Range(ge=1, why="each sampled completion has the greedy one as its baseline"),
        "max_completion_length": Range(ge=1),
        "num_iterations": Range(ge=1),
        "beta": Range(ge=0),
        "epsilon": Range(gt=0, lt=1),
        "epsilon_high": Range(gt=0),
    }
    """The ranges of the numeric flags (:func:`alignlab.train.config.check_ranges`)."""


class ReMaxTrainer(PolicyGradientAlgorithm):
    """ReMax of a causal LM against reward functions and/or a reward model.

    Raises:
        UserError / DataError: bad flags, unreadable data or models, a bad row, a failing reward function.
    """

    plot_panels = {"reward": ["reward", "baseline_reward"], "return": ["return"], "kl": ["kl"],
                   "clip_ratio": ["clip_ratio"], "completion_length": ["completions/mean_length"]}

    def __init__(self, config: ReMaxConfig):
        super().__init__(config, group_size=config.num_generations, iterations=config.num_iterations,
                         max_new_tokens=config.max_completion_length, kl_coef=config.beta,
                         batch_hint="per_device_train_batch_size x gradient_accumulation_steps / num_generations")

    def advantage_estimator(self) -> tuple[str, dict[str, Any]]:
        """Sampled returns minus the greedy completion's score (:func:`~alignlab.advantages.remax.remax_advantages`)."""
        return "remax", {"kl_coef": self.config.beta}

    def compute_loss(self, model, batch: dict[str, torch.Tensor]) -> LossTerms:
        """Per-token clipped surrogate with the per-token advantages, averaged over the micro-batch's completion
        tokens (veRL's actor loss with ``loss_agg_mode="token-mean"``). Metrics: ``clip_ratio``,
        ``policy/approxkl``."""
        cfg = self.config
        return self.clipped_token_loss(model, batch, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high)


def train_remax(config: ReMaxConfig) -> TrainResult:
    """Run ReMax as configured; the Python twin of ``alignlab remax``."""
    return ReMaxTrainer(config).train()


register_method(Method(
    command="remax", config=ReMaxConfig, train=train_remax, online=True, curve_metric="reward",
    summary="ReMax: REINFORCE with the greedy completion's reward as each prompt's baseline, no value model",
    final_metrics=("reward", "baseline_reward", "kl"),
    compare=(CompareEntry(name="remax", args=lambda b: group_sampling_args(b, "num_generations"), learning_rate=1e-5,
                          curve_label="task reward"),),
))

"""REINFORCE++ (Hu 2025, arXiv 2501.03262): REINFORCE with a per-token KL penalty folded into the reward and the
returns whitened over the whole batch; no critic. Its config, the registry's ``"reinforce_plus_plus[_baseline]"``
estimator (:mod:`alignlab.advantages.reinforce`) in the shared policy-gradient rollout
(:class:`~alignlab.algorithms.online.PolicyGradientAlgorithm`), and its per-token loss.

Flow of one step (OpenRLHF ``--advantage_estimator reinforce`` / ``reinforce_baseline``): prompts ->
``n_samples_per_prompt`` completions each -> rewards -> sampling-time and reference log-probs -> token rewards
``-init_kl_coef * k1_t`` plus the score on the last token -> discounted returns (``gamma``) -> whitened over every
completion token of the batch -> ``max_epochs`` optimizer steps on the per-token PPO clipped surrogate
(``eps_clip``), averaged over the micro-batch's tokens (OpenRLHF's token-level loss).

Flag names are OpenRLHF's where it has the setting (``init_kl_coef``, ``gamma``, ``n_samples_per_prompt``,
``eps_clip``, ``max_epochs``, ``advantage_estimator``, ``no_advantage_std_norm``) and the other alignlab online
commands' (TRL's) for sampling and data (``max_completion_length``, ``temperature``, ``reward_funcs``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from alignlab.algorithms.online import OnlineConfig, PolicyGradientAlgorithm, check_flags, group_sampling_args
from alignlab.train.config import Range
from alignlab.methods import CompareEntry, Method, register_method
from alignlab.train.types import TrainResult
from alignlab.train.steps import LossTerms

ESTIMATORS = {"reinforce": "reinforce_plus_plus", "reinforce_baseline": "reinforce_plus_plus_baseline"}
"""OpenRLHF's ``--advantage_estimator`` names -> alignlab's advantage-registry names."""


@dataclass
class ReinforcePPConfig(OnlineConfig):
    """Settings of ``alignlab reinforce-pp``. ``per_device_train_batch_size`` counts completions: one step samples
    ``per_device_train_batch_size * gradient_accumulation_steps`` completions per process, ``n_samples_per_prompt``
    for each prompt."""

    learning_rate: float = 5e-7
    """Peak AdamW learning rate (OpenRLHF's ``actor_learning_rate`` default)."""
    advantage_estimator: Literal["reinforce", "reinforce_baseline"] = "reinforce"
    """reinforce: REINFORCE++ (KL-shaped returns whitened over the batch); reinforce_baseline: each score minus
    its prompt's mean score first (the paper's "REINFORCE++ w/ baseline"; needs ``n_samples_per_prompt`` >= 2)."""
    n_samples_per_prompt: int = 1
    """Completions per prompt (OpenRLHF's name and default)."""
    max_completion_length: int = 256
    """Most tokens sampled per completion (OpenRLHF ``generate_max_len``; the name of the other online commands)."""
    init_kl_coef: float = 0.01
    """KL coefficient: each completion token's reward is ``-init_kl_coef * (log pi_old - log pi_ref)`` (k1), the
    score is added on the last token (OpenRLHF's name and default; 0: no reference model is loaded)."""
    gamma: float = 1.0
    """Discount of the token rewards in the returns (OpenRLHF ``gamma``); reinforce_baseline needs 1."""
    eps_clip: float = 0.2
    """Clip range of the per-token ratio in the PPO surrogate (OpenRLHF's ``eps_clip``)."""
    max_epochs: int = 1
    """Optimizer steps per sampled batch (OpenRLHF ``max_epochs``). Above 1 the old log-probs are kept."""
    no_advantage_std_norm: bool = False
    """Only subtract the batch mean of the returns; do not divide by their std (OpenRLHF)."""

    RANGES: ClassVar[dict[str, Range]] = {
        "n_samples_per_prompt": Range(ge=1), "max_completion_length": Range(ge=1), "max_epochs": Range(ge=1),
        "gamma": Range(ge=0, le=1), "init_kl_coef": Range(ge=0), "eps_clip": Range(gt=0, lt=1),
    }
    """The ranges of the numeric flags (:func:`alignlab.train.config.check_ranges`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        baseline = self.advantage_estimator == "reinforce_baseline"
        check_flags(self, [  # the rules that depend on another flag; the plain ranges are RANGES'
            ("n_samples_per_prompt", not baseline or self.n_samples_per_prompt >= 2,
             ">= 2 with --advantage_estimator reinforce_baseline"),
            ("gamma", not baseline or self.gamma == 1.0, "1 with --advantage_estimator reinforce_baseline (as OpenRLHF)"),
        ])


class ReinforcePPTrainer(PolicyGradientAlgorithm):
    """REINFORCE++ of a causal LM against reward functions and/or a reward model.

    Raises:
        UserError / DataError: bad flags, unreadable data or models, a bad row, a failing reward function.
    """

    plot_panels = {"reward": ["reward"], "return": ["return"], "kl": ["kl"], "clip_ratio": ["clip_ratio"],
                   "completion_length": ["completions/mean_length"]}

    def __init__(self, config: ReinforcePPConfig):
        super().__init__(config, group_size=config.n_samples_per_prompt, iterations=config.max_epochs,
                         max_new_tokens=config.max_completion_length, kl_coef=config.init_kl_coef,
                         batch_hint="per_device_train_batch_size x gradient_accumulation_steps / n_samples_per_prompt")

    def advantage_estimator(self) -> tuple[str, dict[str, Any]]:
        """``(N, L)`` advantages from the registry's ``reinforce_plus_plus[_baseline]`` estimator."""
        cfg = self.config
        return ESTIMATORS[cfg.advantage_estimator], {"kl_coef": cfg.init_kl_coef, "gamma": cfg.gamma,
                                                     "no_std_norm": cfg.no_advantage_std_norm}

    def compute_loss(self, model, batch: dict[str, torch.Tensor]) -> LossTerms:
        """Per-token clipped surrogate with the per-token advantages, averaged over the micro-batch's completion
        tokens (OpenRLHF ``PolicyLoss`` with its token-level mean; ``clipped_token_loss``). Metrics:
        ``clip_ratio`` (fraction of clipped tokens) and ``policy/approxkl``."""
        return self.clipped_token_loss(model, batch, epsilon=self.config.eps_clip)


def train_reinforce_pp(config: ReinforcePPConfig) -> TrainResult:
    """Run REINFORCE++ as configured; the Python twin of ``alignlab reinforce-pp``."""
    return ReinforcePPTrainer(config).train()


register_method(Method(
    command="reinforce-pp", config=ReinforcePPConfig, train=train_reinforce_pp, online=True, curve_metric="reward",
    summary="REINFORCE++: per-token KL-shaped returns whitened over the batch, no value model",
    final_metrics=("reward", "kl"),
    compare=(CompareEntry(name="reinforce-pp", learning_rate=1e-5, curve_label="task reward", args=lambda b: {
        **group_sampling_args(b, "n_samples_per_prompt"), "advantage_estimator": "reinforce_baseline"}),),
))

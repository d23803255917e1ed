"""RLOO (Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740): REINFORCE with a leave-one-out baseline,
glue between the rollout, :mod:`alignlab.advantages` and the shared loop; and :class:`SampledPolicyGradient`, the
rollout that RLOO and REINFORCE++ (:mod:`alignlab.algorithms.reinforce_pp`) share.

Flow of one RLOO step (TRL 1.16 ``RLOOTrainer``): prompts -> ``num_generations`` completions each -> rewards
(reward functions and/or a reward model) -> sampling-time log-probs (and the reference's when ``beta`` > 0) ->
``R = clip(reward) - beta * sum_t (log pi_old - log pi_ref)`` -> leave-one-out advantages -> ``num_iterations``
optimizer steps on the clipped surrogate of the *sequence* ratio ``exp(sum_t log pi - sum_t log pi_old)``,
averaged over sequences. No value model, no KL term in the loss (the KL is in the reward).
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass

import torch

from alignlab.advantages.registry import AdvantageInputs
from alignlab.advantages.rloo import rloo_advantages, sequence_kl
from alignlab.algorithms.base import OnlineAlgorithm
from alignlab.algorithms.online import OnlineConfig, OnlineSetup
from alignlab.errors import UserError
from alignlab.losses.ppo import clipped_policy_loss
from alignlab.methods import CompareBudget, CompareEntry, Method, register_method
from alignlab.ops.kl import kl_k1
from alignlab.ops.masked import masked_mean
from alignlab.rollout.experience import ScoredCompletions
from alignlab.rollout.generation import slice_rows
from alignlab.train.loop import Rollout, TrainResult, autocast
from alignlab.train.steps import LossTerms


class SampledPolicyGradient(OnlineAlgorithm, abc.ABC):
    """The rollout of the critic-free REINFORCE-style methods (RLOO, REINFORCE++): sample ``group_size``
    completions per prompt, score them, take the sampling-time log-probs (and the reference's when
    ``kl_coef > 0``), hand the per-token k1 KL and the scores to :meth:`advantages`, and cut the sampled batch
    into micro-batches of ``per_device_train_batch_size`` completions, reshuffled for each of ``iterations``
    optimizer steps. A subclass sets :attr:`plot_panels`, and defines :meth:`advantages` and
    :meth:`compute_loss`.

    Args:
        config: an :class:`~alignlab.algorithms.online.OnlineConfig` subclass.
        group_size: completions per prompt (``N = prompts * group_size`` per step and process).
        iterations: optimizer steps per sampled batch (TRL ``num_iterations``; OpenRLHF ``max_epochs``).
        kl_coef: the KL coefficient (reward units per nat); > 0 loads a reference model.

    Raises:
        UserError / DataError: bad flags, unreadable data or models, a bad row, a failing reward function.
    """


    def __init__(self, config: OnlineConfig, *, group_size: int, iterations: int, kl_coef: float):
        per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
        if per_step % group_size:
            raise UserError(f"per_device_train_batch_size x gradient_accumulation_steps = {per_step} completions per "
                            f"step is not a multiple of the {group_size} completions per prompt")
        self.config, self.group_size, self.iterations, self.kl_coef = config, group_size, iterations, kl_coef
        self.setup = OnlineSetup(config, prompts_per_step=per_step // group_size, need_reference=kl_coef > 0,
                                 batch_hint="per_device_train_batch_size x gradient_accumulation_steps / group size")
        self.accelerator, self.tokenizer = self.setup.accelerator, self.setup.tokenizer
        self.prompts, self.policy = self.setup.prompts, self.setup.policy
        self.shuffle = torch.Generator().manual_seed(config.seed)

    @abc.abstractmethod
    def advantages(self, inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(N,)`` or ``(N, L)`` detached advantages and their metrics, from the registry's estimator."""

    @abc.abstractmethod
    def compute_loss(self, model, batch: dict[str, torch.Tensor]) -> LossTerms:
        """The loss terms of one micro-batch (a slice of the rollout's data)."""

    def rollout(self, model, examples: list[dict], step: int) -> Rollout:
        """Sample, score, compute the advantages; returns ``iterations`` updates of shuffled micro-batches."""
        cfg, setup = self.config, self.setup
        policy = self.accelerator.unwrap_model(model)
        scored = setup.sample(policy, examples, max_new_tokens=cfg.max_completion_length,
                              num_generations=self.group_size)
        data = dict(scored.sequences)
        mask = data["response_mask"]
        kl = None
        start = time.perf_counter()
        if self.kl_coef > 0 or self.iterations > 1:
            with autocast(cfg, self.accelerator.device):
                old_logps = setup.logps(policy, data)
                if self.kl_coef > 0:
                    kl = kl_k1(old_logps, setup.reference_logps(policy, data))
            if self.iterations > 1:  # with one iteration the old policy is the current one (ratio 1)
                data["old_logps"] = old_logps
        forward_seconds = time.perf_counter() - start
        advantages, metrics = self.advantages(
            AdvantageInputs(scores=scored.scores, num_generations=self.group_size, mask=mask.cpu(),
                            kl=None if kl is None else kl.cpu()))
        data["advantages"] = advantages.to(self.accelerator.device)
        metrics = {**scored.metrics(), **metrics, "time/scoring": scored.scoring_seconds + forward_seconds}
        if kl is not None:
            metrics["kl"] = masked_mean(kl, mask.bool())  # TRL RLOO: per-token k1 over every completion token
        metrics.update(reward_spread(scored))
        samples = scored.sample_rows(step) if cfg.writes_samples(step) else []
        first_token = advantages if advantages.dim() == 1 else advantages[:, 0]  # per token: the first one's
        for row, value in zip(samples, first_token.tolist()):
            row["advantage"] = value
        n, micro = len(scored.texts), cfg.per_device_train_batch_size
        updates = []
        for _ in range(self.iterations):
            order = torch.randperm(n, generator=self.shuffle).to(self.accelerator.device)
            updates.append([slice_rows(data, order[i : i + micro]) for i in range(0, n, micro)])
        return Rollout(updates=updates, metrics=metrics, samples=samples)

    @property
    def prompts_per_step(self) -> int:
        """Prompts per process per step."""
        cfg = self.config
        return cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps // self.group_size


def reward_spread(scored: ScoredCompletions) -> dict[str, float]:
    """``rewards/<source>/std`` (TRL's name): the std of each reward source over the completions it scored
    (0 with fewer than two)."""
    out = {}
    for name, values in scored.per_source.items():
        kept = values[~values.isnan()]
        out[f"rewards/{name}/std"] = float(kept.std()) if kept.numel() > 1 else 0.0
    return out


def check_flags(config, rules: list[tuple[str, bool, str]]) -> None:
    """Raise ``UserError("--<flag> must be <rule>, got <value>")`` for the first ``(flag, holds, rule)`` that does
    not hold."""
    for flag, holds, rule in rules:
        if not holds:
            raise UserError(f"--{flag} must be {rule}, got {getattr(config, flag)}")


@dataclass
class RLOOConfig(OnlineConfig):
    """Settings of ``alignlab rloo``; names and defaults follow TRL 1.16's ``RLOOConfig`` unless a field's
    docstring says otherwise. ``per_device_train_batch_size`` counts completions, as in TRL: one step samples
    ``per_device_train_batch_size * gradient_accumulation_steps`` completions per process, ``num_generations``
    for each of that many / ``num_generations`` prompts."""

    learning_rate: float = 1e-6
    """Peak AdamW learning rate (TRL's RLOO default)."""
    num_generations: int = 2
    """Completions per prompt, >= 2 (each one's baseline is the mean reward of the others)."""
    max_completion_length: int = 256
    """Most tokens sampled per completion (TRL: 512; 256 here, as ``alignlab grpo``, for CPU budgets)."""
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

    def __post_init__(self) -> None:
        super().__post_init__()
        check_flags(self, [
            ("num_generations", self.num_generations >= 2, ">= 2 (the leave-one-out baseline)"),
            ("max_completion_length", self.max_completion_length >= 1, ">= 1"),
            ("num_iterations", self.num_iterations >= 1, ">= 1"),
            ("beta", self.beta >= 0, ">= 0"),
            ("epsilon", 0 < self.epsilon < 1, "in (0, 1)"),
            ("epsilon_high", self.epsilon_high is None or self.epsilon_high > 0, "> 0"),
        ])
        if self.reward_clip_range is not None:
            clip = list(self.reward_clip_range)
            if len(clip) != 2 or not clip[0] < clip[1]:
                raise UserError(f"--reward_clip_range takes two numbers low < high, got {clip}")
            self.reward_clip_range = clip


class RLOOTrainer(SampledPolicyGradient):
    """RLOO of a causal LM against reward functions and/or a reward model.

    Raises:
        UserError / DataError: bad flags, unreadable data or models, a bad row, a failing reward function.
    """

    plot_panels = {"reward": ["reward"], "reward_std": ["reward_std"], "kl": ["kl"],
             "clip_ratio": ["clip_ratio/region_mean"], "completion_length": ["completions/mean_length"]}

    def __init__(self, config: RLOOConfig):
        super().__init__(config, group_size=config.num_generations, iterations=config.num_iterations,
                         kl_coef=config.beta)

    def advantages(self, inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:func:`~alignlab.advantages.rloo.rloo_advantages` (the registry's ``"rloo"``), k1 KL in the reward."""
        cfg = self.config
        seq_kl = None if inputs.kl is None else sequence_kl(inputs.kl, inputs.mask)
        return rloo_advantages(inputs.scores, inputs.num_generations, normalize_advantages=cfg.normalize_advantages,
                               reward_clip_range=cfg.reward_clip_range, beta=cfg.beta, sequence_kl=seq_kl)

    def compute_loss(self, model, batch: dict[str, torch.Tensor]) -> LossTerms:
        """TRL 1.16 ``RLOOTrainer._compute_loss``: ``-min(r A, clip(r, 1 - eps, 1 + eps_high) A)`` with the sequence
        ratio ``r = exp(sum_t log pi - sum_t log pi_old)``, averaged over the micro-batch's completions."""
        logps, old_logps = sequence_logps(self.setup.logps(model, batch), batch.get("old_logps"))
        return rloo_policy_loss(logps, old_logps, batch["advantages"], epsilon=self.config.epsilon,
                                epsilon_high=self.config.epsilon_high)


def sequence_logps(token_logps: torch.Tensor, old_token_logps: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N,)`` summed completion log-probs (nats) of ``(N, L)`` per-token ones (0 on padding), and the old
    policy's (``old_token_logps`` summed, or the current ones detached when ``None``)."""
    logps = token_logps.sum(-1)
    return logps, (logps.detach() if old_token_logps is None else old_token_logps.sum(-1))


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
        ``A > 0``, either).
    """
    ones = torch.ones_like(logps, dtype=torch.bool).unsqueeze(1)
    per_sequence, policy_metrics = clipped_policy_loss(logps.unsqueeze(1), old_logps.unsqueeze(1), advantages, ones,
                                                       cliprange=epsilon, cliprange_high=epsilon_high)
    with torch.no_grad():
        ratio = torch.exp(logps - old_logps)
        high = epsilon if epsilon_high is None else epsilon_high
        metrics = {"clip_ratio/region_mean": policy_metrics["policy/clipfrac"],
                   "clip_ratio/low_mean": ((ratio < 1 - epsilon) & (advantages < 0)).float().mean(),
                   "clip_ratio/high_mean": ((ratio > 1 + high) & (advantages > 0)).float().mean()}
    return [(per_sequence.mean(), metrics)]


def group_sampling_args(b: CompareBudget, group_flag: str) -> dict:
    """A group-sampling method's flags from compare's budget: its prompts, ``b.num_generations`` completions
    (``group_flag``) for each of ``b.prompts_per_step`` prompts per step, the completion budget, the task's reward."""
    rule = {k: v for k, v in b.rule.items()}
    rule.update(dataset_name=b.prompts, max_completion_length=b.max_new_tokens, temperature=b.temperature)
    rule[group_flag] = b.num_generations
    rule["per_device_train_batch_size"] = b.num_generations * b.prompts_per_step
    return rule


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

"""PPO-RLHF (Ziegler et al. 2019, arXiv 1909.08593; Stiennon et al. 2020; InstructGPT, Ouyang et al. 2022): its
config, the value model, GAE (:func:`alignlab.advantages.gae.gae_estimator`) in the shared policy-gradient rollout
(:class:`~alignlab.algorithms.online.PolicyGradientAlgorithm`), and its policy and value losses.

Flow of one step (TRL ``PPOTrainer``'s "update", trl 0.24): prompts -> sample completions with the policy
(KV cache) -> old log-probs (policy), reference log-probs, values (critic), scores (reward model and/or
reward functions; ``missing_eos_penalty``) -> per-token rewards ``score - kl_coef * KL`` -> GAE advantages
and returns -> whitened advantages -> ``num_ppo_epochs`` passes over ``num_mini_batches`` shuffled
mini-batches, each one optimizer step on ``clipped policy loss + vf_coef * clipped value loss``.

Four roles: policy (trained), reference (frozen copy, or the policy with its LoRA adapters disabled), reward
model (frozen; optional when reward functions are given) and value model (trained; initialised from the
reward model when there is one, else from the policy with a fresh scalar head). Policy and value model are
trained together by one optimizer, as TRL's ``PolicyAndValueWrapper``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from alignlab.advantages.gae import gae_estimator
from alignlab.algorithms.online import OnlineConfig, PolicyGradientAlgorithm
from alignlab.errors import UserError
from alignlab.losses.ppo import clipped_policy_loss, clipped_value_loss
from alignlab.train.config import Range
from alignlab.train.trl_args import ReferenceModelFields
from alignlab.methods import CompareBudget, CompareEntry, Method, register_method
from alignlab.models import load_reward_model
from alignlab.ops.masked import masked_mean, masked_var
from alignlab.rollout.generation import completion_token_logps, token_values
from alignlab.train.types import TrainResult
from alignlab.train.steps import LossTerms

logger = logging.getLogger(__name__)

PPO_PLOTS = {
    "reward": ["objective/scores", "objective/rlhf_reward"],
    "kl": ["objective/kl"],
    "entropy": ["objective/entropy"],
    "losses": ["loss/policy", "loss/value"],
    "clipfrac": ["policy/clipfrac", "val/clipfrac"],
    "completion_length": ["completions/mean_length"],
}


@dataclass
class PPOConfig(ReferenceModelFields, OnlineConfig):
    """Settings of ``alignlab ppo``; names and defaults follow TRL's ``PPOConfig`` (trl 0.24) unless a field's
    docstring says otherwise. One step = one rollout of ``per_device_train_batch_size *
    gradient_accumulation_steps * num_mini_batches`` prompts per process and its updates."""

    learning_rate: float = 3e-6
    """Peak AdamW learning rate (TRL's PPO default)."""
    value_model_path: str | None = None
    """Initialise the value model from this checkpoint instead (default: the reward model, else the policy
    with a fresh scalar head)."""
    response_length: int = 53
    """Most tokens sampled per completion (TRL's default 53)."""
    temperature: float = 0.7
    """Sampling temperature (TRL PPO's default); log-probs are computed at the same temperature."""
    kl_coef: float = 0.05
    """Per-token KL penalty coefficient (reward units per nat)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """k1: ``log pi - log pi_ref`` (unbiased, can be negative); k3: ``(r - 1) - log r`` (>= 0). See docs/ppo.md."""
    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """Lambda of GAE."""
    whiten_rewards: bool = False
    """Scale the per-token rewards to unit variance before GAE (TRL's ``whiten_rewards``)."""
    cliprange: float = 0.2
    """Clip range of the policy ratio."""
    cliprange_value: float = 0.2
    """Clip range of the value prediction (reward units)."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    num_ppo_epochs: int = 4
    """Passes over each rollout."""
    num_mini_batches: int = 1
    """Mini-batches per pass; each is one optimizer step of ``per_device_train_batch_size *
    gradient_accumulation_steps`` completions per process."""
    num_generations: int = 1
    """Completions sampled per prompt (OpenRLHF's ``n_samples_per_prompt``; TRL's PPO samples one): a step
    samples ``per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches`` completions, for
    that many / ``num_generations`` prompts. GAE and the whitening of the advantages are unchanged: the critic,
    not the group, is the baseline."""

    RANGES: ClassVar[dict[str, Range]] = {
        "response_length": Range(ge=1), "num_ppo_epochs": Range(ge=1), "num_mini_batches": Range(ge=1),
        "kl_coef": Range(ge=0), "gamma": Range(ge=0, le=1), "lam": Range(ge=0, le=1), "cliprange": Range(gt=0, lt=1),
        "cliprange_value": Range(gt=0), "vf_coef": Range(ge=0), "num_generations": Range(ge=1),
    }
    """The ranges of the numeric flags (:func:`alignlab.train.config.check_ranges`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reward_func_errors != "raise":
            raise UserError("ppo supports --reward_func_errors raise only (its mini-batches are fixed fractions of a rollout)")

    @property
    def rollout_batch_size(self) -> int:
        """Prompts per process per step."""
        return (self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches
                // self.num_generations)


class PolicyAndValue(torch.nn.Module):
    """Policy and value model as one module, so one optimizer, one DDP wrapper and one checkpoint hold both
    (TRL ``PolicyAndValueWrapper``). ``forward(batch)`` returns both models' per-completion-token outputs."""

    def __init__(self, policy: torch.nn.Module, value_model: torch.nn.Module, *, temperature: float,
                 padding_free: bool, pad_token_id: int):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.temperature = temperature
        self.padding_free = padding_free
        self.pad_token_id = pad_token_id

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logps, values)``, each ``(N, L)`` float32 over the completion tokens of a
        :func:`~alignlab.rollout.generation.build_sequences` batch, 0 on padding."""
        return self.policy_logps(batch), self.values(batch)

    def policy_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(N, L)`` policy log-probs of the completion tokens at the sampling temperature."""
        return completion_token_logps(self.policy, batch, temperature=self.temperature,
                                      padding_free=self.padding_free, pad_token_id=self.pad_token_id)

    def values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(N, L)`` value-model outputs ``V(s_t)`` for the completion tokens."""
        return token_values(self.value_model, batch, padding_free=self.padding_free, pad_token_id=self.pad_token_id)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over the masked tokens (0-d): 1 is a perfect critic, 0 no
    better than a constant, negative worse (CleanRL ``explained_var``; OpenAI baselines). Single token: NaN."""
    if int(mask.sum()) < 2:
        return torch.tensor(math.nan)
    var_returns = masked_var(returns, mask)
    return 1 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)


class PPOTrainer(PolicyGradientAlgorithm):
    """PPO of a causal LM against a reward model and/or reward functions: the shared policy-gradient rollout
    (:class:`~alignlab.algorithms.online.PolicyGradientAlgorithm`) with a critic's values, GAE on the
    KL-penalised per-token rewards, and ``num_mini_batches`` optimizer steps per pass.

    >>> PPOTrainer(PPOConfig(dataset_name="prompts.jsonl", reward_funcs=["rewards.py:short"], output_dir="runs/ppo",
    ...                      max_steps=20)).train()

    Raises:
        UserError / DataError: bad flags, unreadable data or models, a bad row, a failing reward function.
    """

    plot_panels = PPO_PLOTS
    log_sample_advantages = False

    def __init__(self, config: PPOConfig):
        # When the policy samples from softmax(logits / temperature) itself, its old log-probs are those of the
        # sampled tokens under it, which the sampler records as it draws (TRL 0.24 takes them from the
        # generation logits too); otherwise one more forward computes them.
        super().__init__(
            config, group_size=config.num_generations, iterations=config.num_ppo_epochs,
            max_new_tokens=config.response_length, kl_coef=config.kl_coef, kl_estimator=config.kl_estimator,
            mini_batches=config.num_mini_batches, need_reference=True, keep_old_logps=True,
            old_logps_from_sampling=config.samples_logp_distribution,
            batch_hint="per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches / "
                       "num_generations",
        )
        cfg, tok = config, self.tokenizer
        value_path = config.value_model_path or config.reward_model_path or config.model_name_or_path
        value_model = load_reward_model(value_path, pad_token_id=tok.pad_token_id,
                                        trust_remote_code=config.trust_remote_code, use_kernels=config.use_kernels)
        value_model = self.setup.runtime.prepare_model(value_model, task_type="SEQ_CLS", modules_to_save=["score"])
        self.model = PolicyAndValue(
            self.setup.policy, value_model, temperature=cfg.temperature, padding_free=cfg.padding_free,
            pad_token_id=tok.pad_token_id,
        )

    @property
    def ref_model(self):
        return self.setup.ref_model

    def advantage_estimator(self) -> tuple[Any, dict[str, Any]]:
        """GAE on the KL-penalised per-token rewards, advantages whitened, value targets as ``returns``."""
        cfg = self.config
        return gae_estimator, {"kl_coef": cfg.kl_coef, "gamma": cfg.gamma, "lam": cfg.lam,
                               "whiten_rewards": cfg.whiten_rewards}

    def policy_of(self, model: PolicyAndValue) -> torch.nn.Module:
        return model.policy

    def critic_values(self, model: PolicyAndValue, data: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(N, L)`` critic values ``V(s_t)`` at sampling time (the loss's ``old_values``)."""
        return token_values(model.value_model, data, padding_free=self.config.padding_free,
                            pad_token_id=self.tokenizer.pad_token_id)

    def rollout_metrics(self, scored, data, kl, estimator_metrics) -> dict[str, Any]:
        """TRL PPO's ``objective/*`` (scores, summed KL, entropy of the sampled tokens, non-score and RLHF reward)
        and ``val/explained_variance``, with the completion statistics (no ``rewards/<source>/mean`` when it is
        the only source: the same number as ``objective/scores``)."""
        cfg = self.config
        mask = data["response_mask"].bool()
        scores = scored.scores.to(self.accelerator.device)
        kl = torch.where(mask, kl, 0).sum(1)
        non_score = -cfg.kl_coef * kl
        metrics = scored.metrics()
        metrics.update({
            "objective/scores": scores,
            "objective/kl": kl,
            "objective/entropy": -data["old_logps"].sum(1),
            "objective/non_score_reward": non_score,
            "objective/rlhf_reward": scores + non_score,
            "val/explained_variance": explained_variance(data["old_values"], data["returns"], mask),
        })
        if len(self.setup.sources) == 1:
            metrics.pop(f"rewards/{self.setup.sources[0].name}/mean")  # the same number as objective/scores
        return metrics

    def compute_loss(self, model, batch: dict[str, torch.Tensor]) -> LossTerms:
        """``loss/policy + vf_coef * loss/value`` on one micro-batch of the rollout (token means, as TRL).

        In one process (``model`` is the :class:`PolicyAndValue` itself) the two terms come one after the
        other (:data:`alignlab.train.steps.LossTerms`): the policy's forward and backward, then the value
        model's, so the two models' activations are never held at once. The gradient is the same: the models
        share no parameters. DDP-wrapped, both forwards run first and their sum is one term (DDP expects one
        backward per forward); so does a module sharded with FSDP2 (its root's forward gathers and its backward
        hooks reduce)."""
        if isinstance(model, PolicyAndValue) and not self.setup.is_sharded(model):
            yield self._policy_loss(model.policy_logps(batch), batch)
            yield self._value_loss(model.values(batch), batch)
            return
        logps, values = model(batch)
        policy_loss, metrics = self._policy_loss(logps, batch)
        value_loss, value_metrics = self._value_loss(values, batch)
        yield policy_loss + value_loss, {**metrics, **value_metrics}

    def _policy_loss(self, logps: torch.Tensor, batch: dict[str, torch.Tensor]):
        """Clipped surrogate (token mean) and its metrics."""
        mask = batch["response_mask"].bool()
        pg, metrics = clipped_policy_loss(logps, batch["old_logps"], batch["advantages"], mask,
                                          cliprange=self.config.cliprange)
        policy_loss = masked_mean(pg, mask)
        return policy_loss, {"loss/policy": policy_loss.detach(), **metrics}

    def _value_loss(self, values: torch.Tensor, batch: dict[str, torch.Tensor]):
        """``vf_coef`` times the clipped value loss (token mean), and its metrics."""
        mask = batch["response_mask"].bool()
        vf, metrics = clipped_value_loss(values, batch["old_values"], batch["returns"], mask,
                                         cliprange_value=self.config.cliprange_value)
        value_loss = masked_mean(vf, mask)
        return self.config.vf_coef * value_loss, {"loss/value": value_loss.detach(), **metrics}

    def loop_inputs(self) -> dict:
        return {"model": self.model, "train_dataset": self.prompts, "collate_fn": list, "rollout_fn": self.rollout,
                "rollout_batch_size": self.config.rollout_batch_size, "model_to_save": lambda wrapper: wrapper.policy}


def train_ppo(config: PPOConfig) -> TrainResult:
    """Run PPO as configured; the Python twin of ``alignlab ppo``."""
    return PPOTrainer(config).train()


def _ppo_args(b: CompareBudget) -> dict:
    """PPO's flags from compare's budget: ``b.num_generations`` completions for each of ``b.prompts_per_step``
    prompts per step, as many as GRPO and Online DPO sample (with one completion per prompt, TRL's default, PPO
    learned from a quarter of their samples and stayed level with the base model; benchmarks/README.md, "PPO
    samples as many completions per step as GRPO")."""
    return {"dataset_name": b.prompts, "num_generations": b.num_generations,
            "per_device_train_batch_size": b.prompts_per_step * b.num_generations,
            "response_length": b.max_new_tokens, "temperature": b.temperature, "num_ppo_epochs": b.num_ppo_epochs}


register_method(Method(
    command="ppo",
    summary="PPO-RLHF: policy, reference, reward and value models; rewards from a reward model and/or functions",
    config=PPOConfig,
    train=train_ppo,
    online=True,
    curve_metric="objective/scores",
    final_metrics=("objective/scores", "objective/kl"),
    compare=(
        CompareEntry(
            name="ppo",
            args=lambda b: {**_ppo_args(b), "reward_model_path": b.stage_model("reward-model")},
            learning_rate=1e-5,
            curve_label="reward-model score",
            requires=("reward-model",),
        ),
        CompareEntry(name="ppo-rule", args=lambda b: {**_ppo_args(b), **b.rule}, learning_rate=1e-5,
                     curve_label="task reward"),
    ),
))

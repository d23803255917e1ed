"""PPO-RLHF (Ziegler et al. 2019, arXiv 1909.08593; Stiennon et al. 2020; InstructGPT, Ouyang et al. 2022):
glue between rollout, rewards, :mod:`alignlab.advantages.gae`, :mod:`alignlab.losses.ppo` and the shared loop.

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

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch

from alignlab.advantages.gae import compute_gae, kl_penalized_rewards
from alignlab.data.io import read_rows
from alignlab.data.preference import tokenize_text
from alignlab.data.prompts import build_prompt_examples
from alignlab.errors import UserError
from alignlab.losses.ppo import clipped_policy_loss, clipped_value_loss
from alignlab.models import is_peft_model, load_causal_lm, load_reward_model, load_tokenizer
from alignlab.ops.kl import KL_ESTIMATORS
from alignlab.ops.masked import masked_mean, masked_var, masked_whiten
from alignlab.rollout.generation import (
    build_sequences,
    completion_token_logps,
    sample_completions,
    slice_rows,
    token_values,
)
from alignlab.rollout.rewards import build_reward_sources, compute_rewards
from alignlab.train.config import TrainConfig
from alignlab.train.loop import Rollout, Trainer, TrainResult, autocast, build_accelerator
from alignlab.train.setup import prepare_model

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
class PPOConfig(TrainConfig):
    """Settings of ``alignlab ppo``; names and defaults follow TRL's ``PPOConfig`` (trl 0.24) unless a field's
    docstring says otherwise. One step = one rollout of ``per_device_train_batch_size *
    gradient_accumulation_steps * num_mini_batches`` prompts per process and its updates."""

    learning_rate: float = 3e-6
    """Peak AdamW learning rate (TRL's PPO default)."""
    logging_steps: int = 1
    """Write a row to ``metrics.jsonl`` every this many steps (each step is a whole rollout)."""
    reward_model_path: str | None = None
    """A trained reward model (an ``alignlab reward`` output_dir or hub id); its score of the prompt+completion,
    read at the last token, is the reward. Needs the policy's tokenizer vocabulary or its own (re-tokenized)."""
    reward_funcs: list[str] | None = None
    """Python reward functions, ``path/to/file.py:name`` or ``module:name`` (TRL signature
    ``fn(prompts, completions, **columns) -> list[float]``); several allowed."""
    reward_weights: list[float] | None = None
    """One weight per reward source: the reward functions in order, then the reward model. Default: all 1."""
    value_model_path: str | None = None
    """Initialise the value model from this checkpoint instead (default: the reward model, else the policy
    with a fresh scalar head)."""
    response_length: int = 53
    """Most tokens sampled per completion (TRL's default 53)."""
    temperature: float = 0.7
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1: off, as TRL PPO; then the log-probs are exact)."""
    max_prompt_length: int | None = 512
    """Keep at most the last this many prompt tokens (alignlab; TRL PPO does not truncate)."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of completions that reach ``response_length`` without EOS (TRL)."""
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
    sample_steps: int = 10
    """Append the step's prompts, completions and rewards to ``samples.jsonl`` at step 1 and every this many
    steps (0: never)."""
    padding_free: bool = True
    """Pack sequences without padding for the policy's log-prob passes (as ``alignlab dpo``)."""
    prompt_column: str = "prompt"
    """Column holding the prompt (text or messages); rows without it may be preference pairs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.reward_model_path and not self.reward_funcs:
            raise UserError("give --reward_model_path and/or --reward_funcs")
        for name in ("response_length", "num_ppo_epochs", "num_mini_batches"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise UserError(f"--max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if not self.kl_coef >= 0:
            raise UserError(f"--kl_coef must be >= 0, got {self.kl_coef}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.cliprange < 1:
            raise UserError(f"--cliprange must be in (0, 1), got {self.cliprange}")
        if not self.cliprange_value > 0:
            raise UserError(f"--cliprange_value must be > 0, got {self.cliprange_value}")
        if not self.vf_coef >= 0:
            raise UserError(f"--vf_coef must be >= 0, got {self.vf_coef}")
        if self.sample_steps < 0:
            raise UserError(f"--sample_steps must be >= 0, got {self.sample_steps}")
        if self.eval_dataset_name or self.eval_split_size:
            raise UserError("alignlab ppo has no evaluation pass: drop --eval_dataset_name / --eval_split_size")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise UserError(f"--missing_eos_penalty must be >= 0, got {self.missing_eos_penalty}")

    @property
    def rollout_batch_size(self) -> int:
        """Prompts per process per step."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches


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
        logps = completion_token_logps(
            self.policy, batch, temperature=self.temperature, padding_free=self.padding_free,
            pad_token_id=self.pad_token_id,
        )
        return logps, token_values(self.value_model, batch)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over the masked tokens (0-d): 1 is a perfect critic, 0 no
    better than a constant, negative worse (CleanRL ``explained_var``; OpenAI baselines). Single token: NaN."""
    if int(mask.sum()) < 2:
        return torch.tensor(math.nan)
    var_returns = masked_var(returns, mask)
    return 1 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)


class PPOTrainer:
    """PPO of a causal LM against a reward model and/or reward functions.

    >>> PPOTrainer(PPOConfig(dataset_name="prompts.jsonl", reward_funcs=["rewards.py:short"], output_dir="runs/ppo",
    ...                      max_steps=20)).train()

    Raises:
        UserError / DataError: bad flags, unreadable data or models, a bad row, a failing reward function.
    """

    def __init__(self, config: PPOConfig):
        self.config = cfg = config
        self.accelerator = acc = build_accelerator(config)
        device = acc.device
        self.tokenizer = tok = load_tokenizer(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
        rows = read_rows(config.dataset_name, config_name=config.dataset_config, split=config.dataset_train_split)
        self.prompts, stats = build_prompt_examples(
            rows, tok, max_prompt_length=config.max_prompt_length, prompt_column=config.prompt_column
        )
        if acc.is_main_process:
            logger.info("prompts %s: %s", config.dataset_name, stats.describe())
        if len(self.prompts) < config.rollout_batch_size:
            raise UserError(
                f"one rollout takes {config.rollout_batch_size} prompts per process (per_device_train_batch_size x "
                f"gradient_accumulation_steps x num_mini_batches) but {config.dataset_name} has {len(self.prompts)}"
            )
        self.sources = build_reward_sources(
            config.reward_funcs, config.reward_weights, with_reward_model=bool(config.reward_model_path)
        )

        policy = load_causal_lm(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
        self.ref_model = None
        if not config.use_peft:  # with LoRA the reference is the policy with its adapters disabled
            self.ref_model = copy.deepcopy(policy).to(device).eval().requires_grad_(False)
        policy = prepare_model(policy, config, device)

        self.reward_model, self.reward_tokenizer = None, None
        if config.reward_model_path:
            self.reward_tokenizer = load_tokenizer(config.reward_model_path, trust_remote_code=config.trust_remote_code)
            self.reward_model = load_reward_model(
                config.reward_model_path,
                pad_token_id=self.reward_tokenizer.pad_token_id,
                trust_remote_code=config.trust_remote_code,
            ).to(device).eval().requires_grad_(False)
            self.sources[-1].model = self.reward_model
        self.same_vocab = self.reward_tokenizer is None or self.reward_tokenizer.get_vocab() == tok.get_vocab()

        value_path = config.value_model_path or config.reward_model_path or config.model_name_or_path
        value_model = load_reward_model(value_path, pad_token_id=tok.pad_token_id, trust_remote_code=config.trust_remote_code)
        value_model = prepare_model(value_model, config, device, task_type="SEQ_CLS", modules_to_save=["score"])
        self.model = PolicyAndValue(
            policy, value_model, temperature=cfg.temperature, padding_free=cfg.padding_free, pad_token_id=tok.pad_token_id
        )
        self.shuffle = torch.Generator().manual_seed(config.seed)

    # ------------------------------------------------------------------------------------------------------
    def _reference_logps(self, policy: torch.nn.Module, sequences: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = dict(temperature=self.config.temperature, padding_free=self.config.padding_free,
                      pad_token_id=self.tokenizer.pad_token_id)
        if self.ref_model is not None:
            return completion_token_logps(self.ref_model, sequences, **kwargs)
        if not is_peft_model(policy):
            raise RuntimeError("no reference model and no adapters to disable")
        with policy.disable_adapter():
            return completion_token_logps(policy, sequences, **kwargs)

    def _reward_inputs(self, examples: list[dict], completion_ids: list[list[int]], texts: list[str],
                       sequences: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The reward model's input: the policy's own token ids when the vocabularies match, else the prompt
        and completion text re-tokenized with the reward model's tokenizer (chat template for messages)."""
        if self.reward_model is None:
            return None
        if self.same_vocab:
            return sequences
        rtok = self.reward_tokenizer
        ids = []
        for ex, text in zip(examples, texts):
            prompt = ex["prompt"]
            if isinstance(prompt, list):
                ids.append(tokenize_text(rtok, prompt + [{"role": "assistant", "content": text}]))
            else:
                ids.append(tokenize_text(rtok, prompt + text + (rtok.eos_token or "")))
        seq = build_sequences([i[:1] for i in ids], [i[1:] for i in ids], rtok.pad_token_id)
        return {k: seq[k] for k in ("input_ids", "attention_mask")}

    def rollout(self, model, examples: list[dict], step: int) -> Rollout:
        """Sample, score and compute advantages for one batch of prompts; returns the step's updates.

        Called by the loop without gradients, the models in eval mode.
        """
        cfg, acc, tok = self.config, self.accelerator, self.tokenizer
        device = acc.device
        wrapper = acc.unwrap_model(model)
        policy = wrapper.policy
        prompt_ids = [ex["prompt_ids"] for ex in examples]

        start = time.perf_counter()
        with autocast(cfg, device):
            completions = sample_completions(
                policy, prompt_ids, max_new_tokens=cfg.response_length, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, temperature=cfg.temperature, top_p=cfg.top_p,
            )
        generation_seconds = time.perf_counter() - start

        start = time.perf_counter()
        seq = {k: v.to(device) for k, v in build_sequences(prompt_ids, completions.ids, tok.pad_token_id).items()}
        texts = tok.batch_decode(completions.ids, skip_special_tokens=True)
        prompts = [ex["prompt"] for ex in examples]
        shown = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]
        columns = {k: [ex["columns"].get(k) for ex in examples] for k in examples[0]["columns"]}
        with autocast(cfg, device):
            old_logps = completion_token_logps(
                policy, seq, temperature=cfg.temperature, padding_free=cfg.padding_free, pad_token_id=tok.pad_token_id
            )
            ref_logps = self._reference_logps(policy, seq)
            old_values = token_values(wrapper.value_model, seq)
            scores, per_source = compute_rewards(
                self.sources, prompts=prompts, completions=shown, completion_ids=completions.ids, columns=columns,
                reward_inputs=self._reward_inputs(examples, completions.ids, texts, seq),
            )
        has_eos = torch.tensor(completions.has_eos)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~has_eos).float()
        scoring_seconds = time.perf_counter() - start

        mask = seq["response_mask"].bool()
        rewards = kl_penalized_rewards(
            scores.to(device), old_logps, ref_logps, mask, kl_coef=cfg.kl_coef, estimator=cfg.kl_estimator
        )
        if cfg.whiten_rewards:
            rewards = torch.where(mask, masked_whiten(rewards, mask, shift_mean=False), 0)
        advantages, returns = compute_gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
        advantages = torch.where(mask, masked_whiten(advantages, mask), 0)

        kl = torch.where(mask, KL_ESTIMATORS[cfg.kl_estimator](old_logps, ref_logps), 0).sum(1)
        non_score = -cfg.kl_coef * kl
        lengths = torch.tensor(completions.lengths, dtype=torch.float32)
        metrics = {
            "objective/scores": scores,
            "objective/kl": kl,
            "objective/entropy": -old_logps.sum(1),
            "objective/non_score_reward": non_score,
            "objective/rlhf_reward": scores.to(device) + non_score,
            "val/explained_variance": explained_variance(old_values, returns, mask),
            "completions/mean_length": lengths,
            "completions/clipped_ratio": (~has_eos).float(),
            "time/generation": generation_seconds,
            "time/scoring": scoring_seconds,
            "tokens_per_second/generation": float(lengths.sum()) / max(generation_seconds, 1e-9),
        }
        if len(self.sources) > 1:
            for name, values in per_source.items():
                metrics[f"rewards/{name}/mean"] = torch.nanmean(values)

        data = dict(seq, old_logps=old_logps, old_values=old_values, advantages=advantages, returns=returns)
        n, micro = len(examples), cfg.per_device_train_batch_size
        mini = n // cfg.num_mini_batches
        updates = []
        for _ in range(cfg.num_ppo_epochs):
            order = torch.randperm(n, generator=self.shuffle)
            for m in range(cfg.num_mini_batches):
                rows = order[m * mini : (m + 1) * mini]
                updates.append([slice_rows(data, rows[i : i + micro].to(device)) for i in range(0, mini, micro)])

        samples = []
        if cfg.sample_steps and (step == 1 or step % cfg.sample_steps == 0):
            for i, (prompt, text) in enumerate(zip(prompts, texts)):
                row = {"step": step, "prompt": prompt, "completion": text, "score": float(scores[i])}
                row.update({f"rewards/{name}": float(v[i]) for name, v in per_source.items()})
                samples.append(row)
        return Rollout(updates=updates, metrics=metrics, samples=samples)

    def compute_loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``loss/policy + vf_coef * loss/value`` on one micro-batch of the rollout (token means, as TRL)."""
        cfg = self.config
        logps, values = model(batch)
        mask = batch["response_mask"].bool()
        pg, pg_metrics = clipped_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, cliprange=cfg.cliprange)
        vf, vf_metrics = clipped_value_loss(
            values, batch["old_values"], batch["returns"], mask, cliprange_value=cfg.cliprange_value
        )
        policy_loss = masked_mean(pg, mask)
        value_loss = masked_mean(vf, mask)
        metrics = {"loss/policy": policy_loss.detach(), "loss/value": value_loss.detach(), **pg_metrics, **vf_metrics}
        return policy_loss + cfg.vf_coef * value_loss, metrics

    def train(self) -> TrainResult:
        """Train, save the policy; returns where everything went."""
        trainer = Trainer(
            self.config,
            self.accelerator,
            self.model,
            self.tokenizer,
            self.prompts,
            collate_fn=list,
            loss_fn=self.compute_loss,
            plot_panels=PPO_PLOTS,
            rollout_fn=self.rollout,
            rollout_batch_size=self.config.rollout_batch_size,
            model_to_save=lambda wrapper: wrapper.policy,
        )
        result = trainer.train()
        self.model = trainer.model
        return result


def train_ppo(config: PPOConfig) -> TrainResult:
    """Run PPO as configured; the Python twin of ``alignlab ppo``."""
    return PPOTrainer(config).train()

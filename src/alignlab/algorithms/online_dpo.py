"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv 2402.04792):
glue between rollout, rewards, :mod:`alignlab.losses.dpo` and the shared loop.

Flow of one step (TRL 1.16's experimental ``OnlineDPOTrainer``): prompts -> two completions each from the
current policy (``num_generations``; with more, the best and the worst make the pair) -> rewards (reward
model and/or functions; ``missing_eos_penalty``) -> the better one is chosen; a pair whose two completions
score the same carries no preference and is left out of the loss (``drop_tied_pairs``; TRL trains on it
with the first completion as chosen) -> reference log-probs (when a loss needs them) -> one optimizer step
on the preference loss of those pairs (any of :mod:`alignlab.losses.dpo`'s, as ``alignlab dpo``:
``--loss_type``, ``--loss_weights`` and the hyperparameters the losses declare). The preference pairs are
fresh every step, so the data stays on-policy.
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar
from dataclasses import dataclass

import torch

from alignlab.algorithms.base import OnlineAlgorithm
from alignlab.algorithms.dpo import PreferenceLossConfig
from alignlab.algorithms.online import OnlineConfig, OnlineSetup
from alignlab.data.sequences import build_sequences, left_truncated_prompts, slice_rows
from alignlab.errors import UserError
from alignlab.losses.dpo import PairLogps, combined_reward_kind, preference_loss, preference_metrics
from alignlab.train.config import Range
from alignlab.train.trl_args import PolicyGradientTrlFields, ReferenceModelFields, VllmFields
from alignlab.methods import CompareEntry, Method, register_method
from alignlab.train.steps import LossTerms
from alignlab.train.types import Rollout, TrainResult

logger = logging.getLogger(__name__)

ONLINE_DPO_PLOTS = {
    "scores": ["objective/scores"],
    "kl": ["objective/kl"],
    "rewards_margins": ["rewards/margins"],
    "rewards_accuracies": ["rewards/accuracies"],
    "rewards": ["rewards/chosen", "rewards/rejected"],
}


@dataclass
class OnlineDPOConfig(PreferenceLossConfig, PolicyGradientTrlFields, VllmFields, ReferenceModelFields, OnlineConfig):
    """Settings of ``alignlab online-dpo``; names and defaults follow TRL 1.16's ``OnlineDPOConfig``. One step
    samples ``num_generations`` completions for each of ``per_device_train_batch_size *
    gradient_accumulation_steps`` prompts per process and makes one optimizer step. ``loss_type`` takes any
    preference loss ``alignlab dpo`` takes (TRL's Online DPO: sigmoid and ipo; here ipo averages log-ratios per
    token, as ``alignlab dpo``, where TRL's online IPO uses sums), with the same hyperparameter flags; no
    reference model is loaded when every loss is reference-free (simpo, cpo, orpo, sft), and ``objective/kl`` is
    then not logged."""

    learning_rate: float = 5e-7
    """Peak AdamW learning rate (TRL's Online DPO default)."""
    max_new_tokens: int = 64
    """Most tokens sampled per completion."""
    temperature: float = 0.9
    """Sampling temperature (TRL's default). The DPO log-probs are the policy's own (temperature 1), as TRL."""
    max_length: int | None = 512
    """Cap on prompt+completion tokens of the log-prob forwards (policy and reference): each pair's prompts
    lose their leftmost tokens so that they fit with the step's longest completion (at least one prompt token
    stays); sampling sees the whole prompt (TRL's; unset: no cap)."""
    vllm_gpu_memory_utilization: float = 0.55
    """GPU memory share of a colocated vLLM (with ``use_vllm``; TRL's Online DPO default)."""

    num_generations: int = 2
    """Completions sampled per prompt; the highest-scored one is chosen and the lowest-scored one rejected (TRL's
    Online DPO: always 2). More than 2 widens the reward gap of the pairs and makes ties rarer, at the cost of
    sampling and scoring them; only the pair is trained on, so training costs the same (with 4, Online DPO
    first rose above the base model at compare's default preset: benchmarks/README.md, "Online DPO's pairs")."""
    drop_tied_pairs: bool = True
    """Leave a pair whose two completions get the same score out of the loss (the step's loss is the mean over
    the other pairs; a step whose pairs all tie changes nothing but the optimizer's state). TRL keeps such a
    pair with the first completion as chosen, which trains toward an arbitrary one of two equal completions; with
    a rule-based reward of few distinct values ties are common (kid-stories at compare's default preset: a
    quarter of the pairs of two), and leaving them out cut Online DPO's drift from the base model by a third
    (benchmarks/README.md, "Online DPO's pairs"). ``false``: TRL's behaviour. Logged as
    ``frac_reward_zero_std`` (TRL GRPO's name for groups whose completions all score the same)."""

    RANGES: ClassVar[dict[str, Range]] = {"max_new_tokens": Range(ge=1), "max_length": Range(ge=2)}
    """The ranges of the numeric flags (:func:`alignlab.train.config.check_ranges`)."""
    TRAIN_ROWS_PER_PROMPT: ClassVar[int] = 2
    """Rows of a training micro-batch per prompt (its chosen and rejected completions), for the memory estimate of
    ``--gradient_checkpointing auto``."""

    def __post_init__(self) -> None:
        self._check_loss_types()
        super().__post_init__()
        self._check_loss_hyperparameters()
        if self.num_generations_eval is not None:  # GRPO's and RLOO's field; TRL's Online DPO has none
            raise UserError("--num_generations_eval: Online DPO has no evaluation pass (a GRPO and RLOO flag)")

    @property
    def prompts_per_step(self) -> int:
        """Prompts per process per step."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


def pick_chosen(scores: torch.Tensor, num_generations: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the chosen and rejected completion of each prompt, from ``(P * G,)`` scores laid out prompt by
    prompt (``G = num_generations``; ``[p0 first, p0 second, ..., p1 first, ...]``): the highest score is
    chosen (the first of equal highest), the lowest rejected (the last of equal lowest), so that with ``G = 2`` a
    tie gives first-chosen, second-rejected (TRL: ``first_half >= second_half``). Returns two ``(P,)`` long
    tensors.

    Raises:
        ValueError: ``G < 2`` or a score count that is not a multiple of it."""
    if num_generations < 2 or scores.numel() % num_generations:
        raise ValueError(f"{scores.numel()} scores do not form groups of num_generations={num_generations} >= 2")
    groups = scores.view(-1, num_generations)
    base = torch.arange(groups.shape[0], device=scores.device) * num_generations
    chosen = groups.argmax(dim=1)  # the first of equal maxima
    rejected = num_generations - 1 - groups.flip(1).argmin(dim=1)  # the last of equal minima
    return base + chosen, base + rejected


def tied_pair_weights(tied: torch.Tensor) -> torch.Tensor:
    """``(P,)`` loss weights of a step's pairs that leave the tied ones out: 0 for a tied pair and ``P / U`` for
    each of the ``U`` others, so that the mean of ``weight * loss`` over the step's ``P`` pairs (the loop's mean
    over equal micro-batches) is the mean loss over the ``U`` untied pairs; all 0 when every pair ties.
    ``tied``: ``(P,)`` bool."""
    untied = (~tied).float()
    count = untied.sum()
    return untied * (tied.numel() / count) if count > 0 else untied


class OnlineDPOTrainer(OnlineAlgorithm):
    """Online DPO of a causal LM against a reward model and/or reward functions.

    Raises:
        UserError / DataError: bad flags, unreadable data or models, a bad row, a failing reward function.
    """

    trl_positional = ("model", "ref_model", "reward_funcs", "args", "data_collator", "train_dataset",
                      "eval_dataset", "processing_class", "reward_processing_classes", "peft_config")
    """TRL's positional argument order for this trainer."""

    def __init__(self, config: OnlineDPOConfig):
        self.config = config
        self.setup = setup = OnlineSetup(
            config, prompts_per_step=config.prompts_per_step,
            batch_hint="per_device_train_batch_size x gradient_accumulation_steps",
            need_reference=config.needs_reference,
        )
        self.accelerator, self.tokenizer, self.prompts = setup.accelerator, setup.tokenizer, setup.prompts
        self.runtime = setup.runtime
        self.policy = setup.policy

    def _logps(self, model, sequences: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(N,)`` summed completion log-probs at temperature 1."""
        return self.setup.logps(model, sequences, temperature=1.0).sum(1)

    def rollout(self, model, examples: list[dict], step: int) -> Rollout:
        """``num_generations`` completions per prompt, ranked by reward, the best and the worst of them paired;
        returns one update over the step's pairs (only the pairs get reference log-probs)."""
        cfg, setup = self.config, self.setup
        device = self.runtime.device
        policy = self.runtime.unwrap(model)
        scored = setup.sample(policy, examples, max_new_tokens=cfg.max_new_tokens,
                              num_generations=cfg.num_generations)
        chosen, rejected = pick_chosen(scored.scores, cfg.num_generations)
        tied = scored.scores[chosen] == scored.scores[rejected]
        num_pairs = chosen.numel()
        rows = torch.cat([chosen, rejected])  # the pairs' rows: [chosen; rejected]
        cut = None
        if cfg.max_length is not None:  # TRL's max_length: prompts cut on the left for the log-probs
            prompts = [scored.examples[i]["prompt_ids"] for i in rows.tolist()]
            completions = [scored.completions.ids[i] for i in rows.tolist()]
            cut = left_truncated_prompts(prompts, completions, cfg.max_length)
        if cut is not None and cut != prompts:
            pairs = {k: v.to(device) for k, v in build_sequences(cut, completions, self.tokenizer.pad_token_id).items()}
        else:
            pairs = slice_rows(scored.sequences, rows.to(device))
        if cfg.drop_tied_pairs:
            pairs["pair_weight"] = tied_pair_weights(tied).repeat(2).to(device)
        start = time.perf_counter()
        if setup.has_reference:
            with self.runtime.precision():  # the policy's own log-probs (and objective/kl) come from the training pass
                pairs["ref_logps"] = setup.reference_logps(policy, pairs, temperature=1.0).sum(1)
        forward_seconds = time.perf_counter() - start

        micro = cfg.per_device_train_batch_size
        update = []
        for i in range(0, num_pairs, micro):
            rows = torch.arange(i, min(i + micro, num_pairs), device=device)
            update.append(slice_rows(pairs, torch.cat([rows, rows + num_pairs])))

        metrics = scored.metrics()
        metrics.update({
            "objective/scores": scored.scores,
            "objective/scores_margin": scored.scores[chosen] - scored.scores[rejected],
            "frac_reward_zero_std": tied.float(),
            "time/scoring": scored.scoring_seconds + forward_seconds,
        })
        if len(setup.sources) == 1:
            metrics.pop(f"rewards/{setup.sources[0].name}/mean")
        samples = []
        if cfg.writes_samples(step):
            samples = scored.sample_rows(step)
            for row, is_chosen in zip(samples, torch.isin(torch.arange(len(samples)), chosen.cpu()).tolist()):
                row["chosen"] = is_chosen
        return Rollout(updates=[update], metrics=metrics, samples=samples)

    def compute_loss(self, model, batch: dict[str, torch.Tensor]) -> LossTerms:
        """The preference loss on a micro-batch of pairs (rows ``[chosen; rejected]``), TRL's ``rewards/*``
        metrics, ``objective/entropy`` (each completion's summed ``-log pi``, TRL's sampled estimate) and
        ``objective/kl`` when there is a reference."""
        cfg = self.config
        logps = self._logps(model, batch)
        chosen_logps, rejected_logps = logps.chunk(2)
        ref_chosen, ref_rejected = batch["ref_logps"].chunk(2) if "ref_logps" in batch else (None, None)
        lengths = batch["response_mask"].sum(1).float()
        chosen_lengths, rejected_lengths = lengths.chunk(2)
        pair = PairLogps(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, ref_chosen, ref_rejected)
        losses = preference_loss(cfg.loss_type, pair, loss_weights=cfg.loss_weights, **cfg.loss_hyperparameters())
        if "pair_weight" in batch:  # tied pairs weigh 0 (drop_tied_pairs); both rows of a pair hold its weight
            losses = losses * batch["pair_weight"].chunk(2)[0]
        metrics = preference_metrics(pair, beta=cfg.beta, reward_kind=combined_reward_kind(cfg.loss_type))
        if pair.has_reference:
            # summed log-ratio to the reference of every completion, before this step's update (TRL computes its
            # objective/kl from the training forward the same way)
            metrics["objective/kl"] = torch.cat([pair.chosen_logratios, pair.rejected_logratios]).detach()
        # TRL's objective/entropy: the sampled estimate -log pi(y|x) of every completion (summed over its tokens)
        metrics["objective/entropy"] = -logps.detach()
        return [(losses.mean(), metrics)]

    plot_panels = ONLINE_DPO_PLOTS


def train_online_dpo(config: OnlineDPOConfig) -> TrainResult:
    """Run Online DPO as configured; the Python twin of ``alignlab online-dpo``."""
    return OnlineDPOTrainer(config).train()


register_method(Method(
    command="online-dpo",
    summary="Online DPO: DPO on pairs of the policy's own completions, ranked by a reward",
    config=OnlineDPOConfig,
    train=train_online_dpo,
    online=True,
    curve_metric="objective/scores",
    final_metrics=("objective/scores", "objective/kl", "rewards/accuracies"),
    compare=(CompareEntry(
        name="online-dpo",
        # the best and the worst of as many completions per prompt as GRPO samples: the same sampled tokens
        args=lambda b: {"dataset_name": b.prompts, "per_device_train_batch_size": b.prompts_per_step,
                        "num_generations": b.num_generations, "max_new_tokens": b.max_new_tokens,
                        "temperature": b.temperature, **b.rule},
        learning_rate=5e-6,
        curve_label="task reward",
    ),),
))

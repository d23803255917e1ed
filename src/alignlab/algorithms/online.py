"""What the online algorithms share: the reward and sampling flags, the set-up of prompts, policy, reference
and reward sources (:class:`OnlineSetup`, used by PPO, GRPO, RLOO, REINFORCE++, ReMax and Online DPO), and the
one rollout of the policy-gradient methods (:class:`PolicyGradientAlgorithm`: GRPO, RLOO, REINFORCE++, ReMax
and PPO). Each method module adds its config, its advantage estimator's name and hyperparameters, its loss.

Precision and distribution (autocast, gathered FSDP2 weights, sharding) are reached only through
:class:`OnlineSetup`'s methods, so the method modules import nothing from the training loop's precision or
distribution layers."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from alignlab.advantages.registry import (
    AdvantageEstimator,
    AdvantageInputs,
    AdvantageOutputs,
    get_advantage_estimator,
)
from alignlab.algorithms.base import OnlineAlgorithm, reference_model
from alignlab.data.prompts import build_prompt_examples
from alignlab.errors import UserError
from alignlab.losses.ppo import aggregate_token_loss, clipped_policy_loss
from alignlab.methods import CompareBudget
from alignlab.models import is_peft_model, load_causal_lm, load_tokenizer
from alignlab.train.trl_args import apply_tokenizer_options, model_init_kwargs
from alignlab.ops.kl import KL_ESTIMATORS
from alignlab.ops.masked import masked_mean_or_zero
from alignlab.rollout.engines import BACKENDS
from alignlab.rollout.experience import ScoredCompletions, sample_and_score
from alignlab.data.sequences import slice_rows
from alignlab.rollout.generation import completion_token_logps
from alignlab.rollout.rewards import build_reward_sources
from alignlab.rollout.scoring import attach_reward_model
from alignlab.train.config import Range, TrainConfig
from alignlab.train.runtime import build_runtime
from alignlab.train.setup import load_train_eval
from alignlab.train.types import Rollout
from alignlab.train.steps import LossTerms

logger = logging.getLogger(__name__)


class GeneratorState:
    """A ``torch.Generator`` as accelerate's checkpointable object (``state_dict`` / ``load_state_dict``):
    ``accelerator.save_state`` saves its random state, ``load_state`` restores it. accelerate saves the global
    random states (Python, NumPy, torch) itself; generators of one's own need this."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rng_state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["rng_state"])


@dataclass
class OnlineConfig(TrainConfig):
    """Flags every online algorithm shares (TRL names). Each step samples from the current policy."""

    remove_unused_columns: bool = False
    """TRL's online default: keep the data set's extra columns (alignlab passes every column of a row to the
    reward functions either way)."""
    reward_model_path: str | None = None
    """A trained reward model (an ``alignlab reward`` output_dir or hub id); its score of the prompt+completion,
    read at the last token, is a reward. Scored on the policy's token ids when the vocabularies match, else
    on the text re-tokenized with its own tokenizer."""
    reward_model_name_or_path: str | None = None
    """The same as ``reward_model_path``, under the name TRL's ``trl grpo`` / ``trl rloo`` scripts give it."""
    reward_funcs: list[str] | None = None
    """Python reward functions, ``path/to/file.py:name``, ``module:name`` or ``package.module.name``, or TRL's
    built-in reward names (``accuracy_reward``, ``reasoning_accuracy_reward``, ``think_format_reward``,
    ``get_soft_overlong_punishment``; need trl installed) (TRL signature ``fn(prompts, completions, **columns)
    -> list[float]``); several allowed."""
    reward_weights: list[float] | None = None
    """One weight per reward source: the reward functions in order, then the reward model. Default: all 1."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1: off; then the log-probs are those of the sampling distribution)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: off; TRL's name and default)."""
    min_p: float | None = None
    """Drop tokens whose probability is below ``min_p`` times the most likely token's (unset: off; TRL's name
    and default; typical values 0.01-0.2)."""
    repetition_penalty: float = 1.0
    """Divide the positive logits (multiply the negative ones) of tokens already in the prompt or the completion
    by this while sampling (above 1: fewer repeats; 1: off; TRL's name and default, transformers'
    ``RepetitionPenaltyLogitsProcessor``). As in TRL, the log-probs the losses use are those of
    ``softmax(logits / temperature)``, not of the penalised distribution; so with ``top_p``, ``top_k`` and
    ``min_p``."""
    max_prompt_length: int | None = 512
    """Keep at most the last this many prompt tokens."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of completions that reach the length limit without EOS (TRL)."""
    sample_steps: int = 10
    """Append the step's prompts, completions and rewards to ``samples.jsonl`` at step 1 and every this many
    steps (0: never)."""
    log_completions: bool = False
    """Also append them at every logged step (each ``logging_steps``): TRL's completions table (prompt,
    completion, each reward, advantage) as ``samples.jsonl`` rows."""
    padding_free: bool = True
    """Pack sequences without padding (as ``alignlab dpo``) for every forward over sampled sequences: the
    policy's and the reference's log-probs, the reward model's scores and, in PPO, the value model."""
    prompt_column: str = "prompt"
    """Column holding the prompt (text or messages); rows without it may be preference pairs."""
    reward_func_errors: Literal["raise", "drop"] = "raise"
    """A reward function that raises or returns a bad value (NaN, infinite, not a number, a list of the wrong
    length): raise stops the run with a one-line error naming the function; drop leaves the completions it
    failed on out of the step's update (with GRPO and Online DPO, their prompt's whole group or pair), logs
    how many as ``rewards/dropped`` and goes on (alignlab's flag; TRL has none). PPO supports raise only."""
    generation_backend: str = "auto"
    """How completions are sampled (docs/rollouts.md): ``generate`` (transformers ``generate``, dynamic KV
    cache), ``static`` (static KV cache, compiled decode step), ``paged`` (transformers' continuous batching,
    paged KV cache) or ``auto`` (the fastest measured on the device type)."""
    use_transformers_paged: bool = False
    """TRL's switch to transformers' paged generation: the same as ``--generation_backend paged``."""
    use_transformers_continuous_batching: bool = False
    """TRL's switch to transformers' continuous batching: the same as ``--generation_backend paged``."""
    RANGES: ClassVar[dict[str, Range]] = {
        "max_prompt_length": Range(ge=1), "temperature": Range(gt=0), "top_p": Range(gt=0, le=1),
        "sample_steps": Range(ge=0), "missing_eos_penalty": Range(ge=0), "top_k": Range(ge=0),
        "min_p": Range(ge=0, le=1), "repetition_penalty": Range(gt=0),
    }
    """The ranges of the numeric flags every online method shares (:func:`alignlab.train.config.check_ranges`,
    run first by ``TrainConfig.__post_init__``)."""

    evaluates: ClassVar[bool] = False
    """Whether the method evaluates on ``eval_dataset_name`` / ``eval_split_size`` (sampling on the eval prompts,
    :meth:`PolicyGradientAlgorithm.eval_rollout`); the others refuse those flags."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reward_model_name_or_path:
            if self.reward_model_path and self.reward_model_path != self.reward_model_name_or_path:
                raise UserError("--reward_model_name_or_path and --reward_model_path name different reward models: "
                                "give one")
            self.reward_model_path = self.reward_model_name_or_path
        if self.reward_func_errors not in ("raise", "drop"):
            raise UserError(f"--reward_func_errors must be raise or drop, got {self.reward_func_errors!r}")
        if self.use_transformers_paged or self.use_transformers_continuous_batching:
            self.generation_backend = "paged"
        cache = getattr(self, "cache_implementation", None)  # TRL's KV cache of generate (GRPO, RLOO, Online DPO)
        if cache is not None:
            engines = {"dynamic": "generate", "static": "static"}
            if cache not in engines:
                raise UserError(f"--cache_implementation {cache}: alignlab's engines offer dynamic (--generation_backend "
                                "generate) and static (--generation_backend static)")
            if self.generation_backend not in ("auto", engines[cache]):
                raise UserError(f"--cache_implementation {cache} samples with --generation_backend {engines[cache]}, "
                                f"not {self.generation_backend}: give one of them")
            self.generation_backend = engines[cache]
        if self.generation_backend not in BACKENDS:
            raise UserError(f"--generation_backend must be one of {', '.join(BACKENDS)}, "
                            f"got {self.generation_backend!r}")
        if (self.eval_dataset_name or self.eval_split_size) and not self.evaluates:
            raise UserError(f"{type(self).__name__.removesuffix('Config')} has no evaluation pass: drop "
                            "--eval_dataset_name / --eval_split_size")

    def check_inputs(self) -> None:
        """:meth:`TrainConfig.check_inputs`, and a reward source (reward functions given to the trainer in Python
        count).

        Raises:
            UserError: no training data, or nothing to compute rewards with.
        """
        super().check_inputs()
        if not self.reward_model_path and not self.reward_funcs:
            raise UserError("give --reward_model_path and/or --reward_funcs")

    def writes_samples(self, step: int) -> bool:
        """Whether ``step`` appends to ``samples.jsonl``: step 1 and every ``sample_steps``, and with
        ``log_completions`` every logged step."""
        if self.log_completions and step % self.logging_steps == 0:
            return True
        return bool(self.sample_steps) and (step == 1 or step % self.sample_steps == 0)

    @property
    def updates_per_generation(self) -> int:
        """Optimizer steps per pass over one generation's completions (1 here; TRL's ``steps_per_generation /
        gradient_accumulation_steps`` in :class:`GenerationBatchConfig`)."""
        return 1

    @property
    def samples_logp_distribution(self) -> bool:
        """Whether tokens are drawn from ``softmax(logits / temperature)`` itself (no top-p, top-k, min-p or
        repetition penalty), so that the sampler's log-probs are the policy's."""
        return self.top_p == 1.0 and not self.top_k and not self.min_p and self.repetition_penalty == 1.0


@dataclass
class GenerationBatchConfig(OnlineConfig):
    """TRL 1.16's generation-batch flags of ``GRPOConfig`` and ``RLOOConfig``, ``mask_truncated_completions``, and
    evaluation on eval prompts.

    One generation samples ``per_device_train_batch_size * steps_per_generation`` completions per process
    (``generation_batch_size`` over all processes), which feed ``steps_per_generation`` micro-batches: with
    ``gradient_accumulation_steps`` micro-batches per optimizer step, ``steps_per_generation /
    gradient_accumulation_steps`` optimizer steps per pass (times ``num_iterations`` passes). alignlab counts
    one generation with all its optimizer steps as one step (``max_steps``, ``logging_steps``, ``save_steps``
    and the learning-rate schedule); TRL counts each optimizer step."""

    generation_batch_size: int | None = None
    """Completions per generation, over all processes (TRL's name; unset: ``per_device_train_batch_size x
    processes x steps_per_generation``). A multiple of ``per_device_train_batch_size x processes``; not with
    ``steps_per_generation``."""
    steps_per_generation: int | None = None
    """Micro-batches of ``per_device_train_batch_size`` completions each generation feeds (TRL's name; unset:
    ``gradient_accumulation_steps``, one optimizer step per generation). A multiple of
    ``gradient_accumulation_steps`` here (whole optimizer steps per generation); not with
    ``generation_batch_size``."""
    mask_truncated_completions: bool = False
    """Leave completions that reached ``max_completion_length`` without EOS out of the loss (their tokens get no
    weight and do not count in the token averages; their rewards still enter the advantages of their group).
    TRL's name and default (DAPO, Yu et al. 2025, recommends it)."""

    evaluates: ClassVar[bool] = True
    RANGES: ClassVar[dict[str, Range]] = {"steps_per_generation": Range(ge=1)}
    """The generation flags' ranges (``generation_batch_size``'s is :data:`~alignlab.train.config.FIELD_RANGES`')."""

    def __post_init__(self) -> None:
        super().__post_init__()
        import os

        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise UserError("--generation_batch_size and --steps_per_generation can not be both configured: give one")
        per_micro_batch = self.per_device_train_batch_size * int(os.environ.get("WORLD_SIZE", "1"))
        if self.generation_batch_size is not None and self.generation_batch_size % per_micro_batch:
            raise UserError(f"--generation_batch_size {self.generation_batch_size} must be divisible by the global "
                            f"batch size per_device_train_batch_size x processes = {per_micro_batch}")
        steps = self.resolved_steps_per_generation
        if steps % self.gradient_accumulation_steps:
            raise UserError(f"a generation feeds {steps} micro-batches (--steps_per_generation / "
                            "--generation_batch_size), not a multiple of --gradient_accumulation_steps "
                            f"{self.gradient_accumulation_steps}: alignlab runs whole optimizer steps per generation")

    @property
    def resolved_steps_per_generation(self) -> int:
        """``steps_per_generation`` as TRL resolves it: given, or from ``generation_batch_size``, or
        ``gradient_accumulation_steps``."""
        import os

        if self.steps_per_generation is not None:
            return self.steps_per_generation
        if self.generation_batch_size is not None:
            return self.generation_batch_size // (self.per_device_train_batch_size
                                                  * int(os.environ.get("WORLD_SIZE", "1")))
        return self.gradient_accumulation_steps

    @property
    def updates_per_generation(self) -> int:
        """Optimizer steps per pass over one generation: ``steps_per_generation / gradient_accumulation_steps``."""
        return self.resolved_steps_per_generation // self.gradient_accumulation_steps


class OnlineSetup:
    """Prompts, policy, reference and reward sources, loaded for an online algorithm.

    Args:
        config: the algorithm's config.
        prompts_per_step: prompts each process needs for one rollout (a clear error if the data has fewer).
        batch_hint: how that number is made up, for the error message.
        need_reference: load a reference (a frozen copy of the policy, or the policy's disabled adapters with
            ``use_peft``); GRPO with ``beta = 0`` needs none.

    Attributes: ``accelerator``, ``tokenizer``, ``prompts`` (examples), ``eval_prompts`` (from
    ``eval_dataset_name`` or an ``eval_split_size`` hold-out; empty without), ``sources`` (reward sources, models
    attached), ``policy`` (prepared for training, on the device), ``ref_model`` (``None`` with LoRA or
    without a reference), ``reward_tokenizer`` (the reward model's, which its inputs are rendered with; ``None``
    without a reward model).

    Raises:
        UserError / DataError: bad flags, unreadable data or models, a bad row.
    """

    def __init__(self, config: OnlineConfig, *, prompts_per_step: int, batch_hint: str, need_reference: bool = True):
        self.config = config
        self.runtime = runtime = build_runtime(config)
        self.accelerator = acc = runtime.accelerator
        self.tokenizer = tok = apply_tokenizer_options(
            load_tokenizer(config.model_name_or_path, trust_remote_code=config.trust_remote_code), config)
        self.prompts, self.eval_prompts = load_train_eval(
            config, build_prompt_examples, tok, is_main_process=acc.is_main_process,
            max_prompt_length=config.max_prompt_length, prompt_column=config.prompt_column,
            chat_template_kwargs=getattr(config, "chat_template_kwargs", None))
        if len(self.prompts) < prompts_per_step:
            raise UserError(
                f"one rollout takes {prompts_per_step} prompts per process ({batch_hint}) but "
                f"{config.dataset_name} has {len(self.prompts)}"
            )
        self.sources = build_reward_sources(
            config.reward_funcs, config.reward_weights, with_reward_model=bool(config.reward_model_path)
        )

        policy = load_causal_lm(config.model_name_or_path, trust_remote_code=config.trust_remote_code,
                                use_kernels=config.use_kernels, init_kwargs=model_init_kwargs(config))
        self.has_reference = need_reference
        self.ref_model = reference_model(config, policy, runtime, needed=need_reference)
        self.policy = runtime.prepare_model(policy)

        self.reward_tokenizer = attach_reward_model(self.sources, config, runtime)

    def checkpointed_generator(self, seed: int) -> torch.Generator:
        """A ``torch.Generator`` seeded with ``seed`` whose state is saved in every checkpoint and restored on
        resume (registered with the accelerator), so that a resumed run draws what the uninterrupted one would
        (the rollouts' shuffles into mini- and micro-batches). Call it in the same order on every run."""
        generator = torch.Generator().manual_seed(seed)
        self.accelerator.register_for_checkpointing(GeneratorState(generator))
        return generator

    def logps(self, model: torch.nn.Module, sequences: dict[str, torch.Tensor], *,
              temperature: float | None = None, with_entropy: bool = False, entropy_grad: bool = False) -> torch.Tensor:
        """``(N, L)`` completion-token log-probs under ``model`` at ``temperature`` (default: the sampling
        temperature); ``with_entropy``: and their ``(N, L)`` entropies, from the same pass, detached unless
        ``entropy_grad`` (:func:`~alignlab.rollout.generation.completion_token_logps`)."""
        cfg = self.config
        return completion_token_logps(
            model, sequences, temperature=cfg.temperature if temperature is None else temperature,
            padding_free=cfg.padding_free, pad_token_id=self.tokenizer.pad_token_id, with_entropy=with_entropy,
            entropy_grad=entropy_grad,
        )

    def reference_logps(self, policy: torch.nn.Module, sequences: dict[str, torch.Tensor], *,
                        temperature: float | None = None) -> torch.Tensor:
        """``(N, L)`` reference log-probs, without gradients; ``policy`` is the unwrapped policy.

        Raises:
            RuntimeError: the set-up has no reference (``need_reference=False``).
        """
        if not self.has_reference:
            raise RuntimeError("this run was set up without a reference model")
        with torch.no_grad():
            if self.ref_model is not None:
                return self.logps(self.ref_model, sequences, temperature=temperature)
            if not is_peft_model(policy):
                raise RuntimeError("no reference model and no adapters to disable")
            with policy.disable_adapter():
                return self.logps(policy, sequences, temperature=temperature)

    def precision(self) -> AbstractContextManager:
        """A fresh precision context for forward passes outside the loss (the rollout's log-probs and values):
        bf16 autocast with ``--bf16``, else a no-op (:meth:`alignlab.train.runtime.Runtime.precision`)."""
        return self.runtime.precision()

    def is_sharded(self, model: torch.nn.Module) -> bool:
        """Whether ``model`` (or a module inside it) is sharded with FSDP2
        (:meth:`alignlab.train.runtime.Runtime.is_sharded`)."""
        return self.runtime.is_sharded(model)

    def sample(self, policy: torch.nn.Module, examples: list[dict], *, max_new_tokens: int,
               num_generations: int = 1, return_logps: bool = False, do_sample: bool = True) -> ScoredCompletions:
        """Sample and score completions for ``examples`` with the (unwrapped) ``policy``; ``return_logps``: keep
        the sampled tokens' log-probs (``sequences["sampling_logps"]``); ``do_sample=False``: greedy decoding
        (the most likely token at each step; ``--temperature`` and ``--top_p`` unused). With
        ``--reward_func_errors drop`` the completions a reward function failed on are left out, with their
        prompt's group (:meth:`~alignlab.rollout.experience.ScoredCompletions.without_bad_rewards`).

        A policy sharded with FSDP2 is all-gathered once for the whole call (every process calls it) and
        resharded after it (:meth:`alignlab.train.runtime.Runtime.sampling`), so decoding runs on full weights,
        as in one process or DDP."""
        cfg, device = self.config, self.runtime.device
        sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k, "min_p": cfg.min_p,
                    "repetition_penalty": cfg.repetition_penalty}
        sampling.update(getattr(cfg, "generation_kwargs", None) or {})  # TRL: they override the flags
        with self.runtime.sampling(policy) as model:
            scored = sample_and_score(
                model, self.tokenizer, examples, self.sources, device=device, precision=self.precision(),
                max_new_tokens=max_new_tokens, **sampling, num_generations=num_generations,
                missing_eos_penalty=cfg.missing_eos_penalty,
                reward_tokenizer=self.reward_tokenizer, return_logps=return_logps,
                padding_free=cfg.padding_free, on_error=cfg.reward_func_errors,
                generation_backend=cfg.generation_backend, do_sample=do_sample,
            )
        return scored.without_bad_rewards(num_generations) if cfg.reward_func_errors == "drop" else scored


# --- the policy-gradient rollout ------------------------------------------------------------------------------
class PolicyGradientAlgorithm(OnlineAlgorithm):
    """The one rollout of the policy-gradient methods (GRPO, RLOO, REINFORCE++, ReMax, PPO). Per step:

    1. sample ``group_size`` completions for each prompt (:meth:`OnlineSetup.sample`) and score them; when the
       advantage estimator declares ``needs_greedy_baseline`` (ReMax), also one greedy completion per prompt,
       whose score becomes :attr:`~alignlab.advantages.registry.AdvantageInputs.baseline_scores`;
    2. without gradients, under :meth:`OnlineSetup.precision`: the old log-probs when the batch keeps them
       (``iterations`` > 1, or ``keep_old_logps``) or a KL in the reward needs them (from the sampler with
       ``old_logps_from_sampling``, else one forward), the reference's when a reference is loaded, and the
       critic's values (:meth:`critic_values`, PPO);
    3. the KL to the reference either goes into the batch as ``ref_logps`` for the loss (``kl_in_loss``: GRPO)
       or is estimated per token (``kl_estimator`` k1 or k3 of old and reference log-probs) and handed to the
       advantage estimator, which folds it into the reward (RLOO, REINFORCE++, ReMax, PPO);
    4. the advantages from the estimator :meth:`advantage_estimator` names: looked up in the advantage
       registry (:func:`~alignlab.advantages.registry.get_advantage_estimator`) and called with
       :class:`~alignlab.advantages.registry.AdvantageInputs`; value targets it returns
       (:class:`~alignlab.advantages.registry.AdvantageOutputs`, GAE) go into the batch as ``returns``;
    5. ``iterations`` passes over the batch, each shuffled with the checkpointed generator
       (:meth:`OnlineSetup.checkpointed_generator`, so a resumed run shuffles as the uninterrupted one) and cut
       into ``mini_batches`` optimizer steps of micro-batches of ``per_device_train_batch_size`` completions.

    Batch keys every micro-batch carries: the sequences (:func:`~alignlab.rollout.generation.build_sequences`),
    ``advantages``, and as they apply ``old_logps``, ``ref_logps``, ``old_values``, ``returns``; and the
    rollout scalar ``num_items_in_batch`` (the step's completion tokens per micro-batch, what a ``dapo`` loss
    divides by; TRL's name). Metrics: :meth:`rollout_metrics`. ``samples.jsonl`` rows carry each completion's
    advantage (its first token's when per token) and, with a greedy baseline, its prompt's ``baseline_score``.

    A method module subclasses it with its config, sets :attr:`plot_panels`, and defines
    :meth:`advantage_estimator` and :meth:`compute_loss`; PPO also :meth:`policy_of`, :meth:`critic_values`
    and :meth:`rollout_metrics`. docs/developing.md lists the steps.

    Args:
        config: an :class:`OnlineConfig` subclass.
        group_size: completions per prompt (``N = prompts * group_size`` per step and process).
        iterations: passes over each sampled batch (TRL ``num_iterations``, PPO ``num_ppo_epochs``, OpenRLHF
            ``max_epochs``).
        max_new_tokens: most tokens sampled per completion.
        kl_coef: the KL coefficient; > 0 loads a reference model (unless ``need_reference`` says otherwise).
        batch_hint: how the prompts per step are made up of flags, for the error when the data has fewer.
        kl_in_loss: the KL term is the loss's (GRPO): ``ref_logps`` go into the batch, nothing into the reward.
        kl_estimator: ``"k1"`` or ``"k3"`` (:data:`alignlab.ops.kl.KL_ESTIMATORS`) for the KL in the reward.
        mini_batches: optimizer steps per pass (PPO ``num_mini_batches``); ``per_device_train_batch_size x
            gradient_accumulation_steps x mini_batches`` completions are sampled per step.
        need_reference: load a reference whatever ``kl_coef`` (PPO logs its KL even at 0).
        keep_old_logps: the batch keeps the old log-probs even with one iteration (PPO's loss reads them).
        old_logps_from_sampling: take the old log-probs from the sampler (PPO with ``top_p`` 1, as TRL).

    Raises:
        UserError / DataError: bad flags, unreadable data or models, a bad row, a failing reward function.
    """

    log_sample_advantages = True
    """Write each completion's advantage into its ``samples.jsonl`` row."""

    def __init__(self, config: OnlineConfig, *, group_size: int, iterations: int, max_new_tokens: int,
                 kl_coef: float, batch_hint: str, kl_in_loss: bool = False, kl_estimator: str = "k1",
                 mini_batches: int = 1, need_reference: bool | None = None, keep_old_logps: bool = False,
                 old_logps_from_sampling: bool = False):
        mini_batches *= config.updates_per_generation  # steps_per_generation / generation_batch_size (TRL)
        per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * mini_batches
        if per_step % group_size:
            raise UserError(f"per_device_train_batch_size x gradient_accumulation_steps = {per_step} completions per "
                            f"step is not a multiple of the {group_size} completions per prompt")
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {kl_estimator!r}; choose from {', '.join(KL_ESTIMATORS)}")
        self.config, self.group_size, self.iterations, self.mini_batches = config, group_size, iterations, mini_batches
        self.max_new_tokens, self.kl_in_loss, self.kl_estimator = max_new_tokens, kl_in_loss, kl_estimator
        self.keep_old_logps = keep_old_logps or iterations > 1  # with one pass the old policy is the current one
        self.old_logps_from_sampling = old_logps_from_sampling
        self._prompts_per_step = per_step // group_size
        self.setup = setup = OnlineSetup(config, prompts_per_step=self._prompts_per_step, batch_hint=batch_hint,
                                         need_reference=kl_coef > 0 if need_reference is None else need_reference)
        self.runtime = setup.runtime
        self.accelerator, self.tokenizer, self.prompts, self.policy = (setup.accelerator, setup.tokenizer,
                                                                       setup.prompts, setup.policy)
        self.shuffle = setup.checkpointed_generator(config.seed)  # saved in checkpoints
        self.eval_group_size = getattr(config, "num_generations_eval", None) or group_size  # TRL's
        if setup.eval_prompts and config.per_device_eval_batch_size % self.eval_group_size:
            raise UserError(f"--per_device_eval_batch_size {config.per_device_eval_batch_size} counts eval "
                            f"completions: it must be a multiple of the {self.eval_group_size} completions per "
                            "prompt")

    def loop_inputs(self) -> dict[str, Any]:
        """The online loop inputs, and with eval prompts (``eval_dataset_name`` / ``eval_split_size``) the
        evaluation: :meth:`eval_rollout` on batches of ``per_device_eval_batch_size / eval_group_size`` prompts
        (``eval_group_size``: ``num_generations_eval``, else the training group size)."""
        inputs = super().loop_inputs()
        if self.setup.eval_prompts:
            inputs.update(eval_dataset=self.setup.eval_prompts, eval_rollout_fn=self.eval_rollout,
                          eval_batch_size=self.config.per_device_eval_batch_size // self.eval_group_size)
        return inputs

    @property
    def prompts_per_step(self) -> int:
        """Prompts per process per step."""
        return self._prompts_per_step

    # --- hooks ----------------------------------------------------------------------------------------------
    def advantage_scores(self, scored: ScoredCompletions, group_size: int) -> torch.Tensor:
        """``(N,)`` the rewards the advantage estimator reads (groups of ``group_size``): the weighted sum
        ``scored.scores``."""
        return scored.scores

    def advantage_estimator(self) -> tuple[str | AdvantageEstimator, dict[str, Any]]:
        """The advantage estimator, by its registry name (or, for one that is not registered, the function
        itself), and its hyperparameters from the config."""
        raise NotImplementedError

    def policy_of(self, model: torch.nn.Module) -> torch.nn.Module:
        """The policy inside the unwrapped trained ``model`` (PPO trains a policy-and-value module)."""
        return model

    def critic_values(self, model: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``(N, L)`` value-model outputs for the sampled ``data`` (``model``: the unwrapped trained module), or
        ``None`` without a critic. Called without gradients under the rollout's precision context."""
        return None

    def rollout_metrics(self, scored: ScoredCompletions, data: dict[str, torch.Tensor], kl: torch.Tensor | None,
                        estimator_metrics: dict[str, Any]) -> dict[str, Any]:
        """The step's metrics: the completion statistics and per-source rewards (``scored.metrics()``), the
        estimator's metrics, ``kl`` (mean per-token KL of the reward, TRL's RLOO ``kl``) when there is one and
        ``rewards/<source>/std`` (:func:`reward_spread`). The rollout adds ``time/scoring`` (scoring and the
        rollout's forwards) after it."""
        metrics = {**scored.metrics(), **estimator_metrics}
        if kl is not None:
            metrics["kl"] = masked_mean_or_zero(kl, data["response_mask"].bool())
        metrics.update(reward_spread(scored))
        return metrics

    # --- the rollout ----------------------------------------------------------------------------------------
    def planned_updates(self, micro_batches: list[int]) -> None:
        """Told, after each rollout, how many micro-batches each of its optimizer steps has (in training order);
        a method whose loss keeps per-optimizer-step state (GRPO's adaptive entropy control) overrides it."""

    def rollout(self, model, examples: list[dict], step: int) -> Rollout:
        """Sample, score, estimate the advantages; returns the step's updates (see the class docstring)."""
        data, metrics, samples = self._sampled_batch(model, examples, step)
        updates = self._updates(data)
        self.planned_updates([len(update) for update in updates])
        # dapo: every token of an update weighs the same. The loop weights each micro-batch's loss by 1 / (number
        # of micro-batches), so each divides its token sum by (the update's tokens / its micro-batches)
        n_micro = self.mini_batches * len(updates[0])
        # at least 1 token (TRL's clamp): with mask_truncated_completions every completion may be out of the loss
        tokens = max(float(data["response_mask"].sum()), 1.0)
        return Rollout(updates=updates, metrics=metrics, samples=samples,
                       scalars={"num_items_in_batch": tokens / n_micro})

    def eval_rollout(self, model, examples: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """One batch of eval prompts, sampled and scored as a training step's (``eval_group_size`` completions
        each, TRL's ``num_generations_eval``; the same sampling flags): ``(batch, metrics)``, the batch whole as one micro-batch for the loss (its
        ``num_items_in_batch`` its own completion tokens, as TRL's evaluation: no accumulation), the metrics
        those of a step (``reward``, ``reward_std``, ``rewards/<name>/mean``, ``completions/*``, ...). The
        loop logs both as ``eval_*`` (TRL's names for evaluation with ``eval_strategy``). Nothing goes to
        ``samples.jsonl`` and the training shuffle is not drawn from."""
        data, metrics, _ = self._sampled_batch(model, examples, step=None)
        data["num_items_in_batch"] = max(float(data["response_mask"].sum()), 1.0)
        return data, metrics

    def _sampled_batch(self, model, examples: list[dict],
                       step: int | None) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[dict]]:
        """Steps 1-4 of the class docstring for ``examples``: ``(data, metrics, samples)``, the sampled rows with
        their advantages (and old / reference log-probs, values, returns as they apply), the step's metrics and
        its ``samples.jsonl`` rows (none for ``step`` ``None``: evaluation). With ``mask_truncated_completions``
        the completions without EOS get a zero ``response_mask`` (and no KL in their reward), as TRL zeroes
        their ``completion_mask``; their scores still enter the advantages."""
        cfg, setup, device = self.config, self.setup, self.accelerator.device
        group = self.group_size if step is not None else self.eval_group_size
        unwrapped = self.runtime.unwrap(model)
        policy = self.policy_of(unwrapped)
        estimator, hyperparameters = self.advantage_estimator()
        if isinstance(estimator, str):
            estimator = get_advantage_estimator(estimator)
        scored = setup.sample(policy, examples, max_new_tokens=self.max_new_tokens, num_generations=group,
                              return_logps=self.old_logps_from_sampling)
        baseline = None
        if getattr(estimator, "needs_greedy_baseline", False):
            scored, baseline, baseline_seconds = self._greedy_baseline(policy, examples, scored, group)
        data = dict(scored.sequences)
        sampling_logps = data.pop("sampling_logps", None)
        kl_in_reward = setup.has_reference and not self.kl_in_loss
        kl = old_logps = values = None
        start = time.perf_counter()
        with setup.precision():
            if self.keep_old_logps or kl_in_reward:
                old_logps = sampling_logps if sampling_logps is not None else setup.logps(policy, data)
            if setup.has_reference:
                ref_logps = setup.reference_logps(policy, data)
                if self.kl_in_loss:
                    data["ref_logps"] = ref_logps
                else:
                    kl = KL_ESTIMATORS[self.kl_estimator](old_logps, ref_logps)
            values = self.critic_values(unwrapped, data)
        forward_seconds = time.perf_counter() - start
        if self.keep_old_logps:
            data["old_logps"] = old_logps
        if values is not None:
            data["old_values"] = values

        mask = data["response_mask"]
        loss_mask = mask
        if getattr(cfg, "mask_truncated_completions", False):  # GRPO's and RLOO's flag (GenerationBatchConfig)
            loss_mask = mask * scored.has_eos.to(mask.device, mask.dtype).unsqueeze(1)
            kl = None if kl is None else kl * loss_mask
        outputs = AdvantageOutputs.of(estimator(
            AdvantageInputs(scores=self.advantage_scores(scored, group).to(device), num_generations=group,
                            mask=mask, kl=kl,
                            values=values, baseline_scores=None if baseline is None else baseline.to(device)),
            **hyperparameters))
        data["advantages"] = outputs.advantages.to(device)
        if outputs.returns is not None:
            data["returns"] = outputs.returns
        data["response_mask"] = loss_mask

        metrics = self.rollout_metrics(scored, data, kl, outputs.metrics)
        metrics["time/scoring"] = scored.scoring_seconds + forward_seconds
        if baseline is not None:
            metrics["time/baseline"] = baseline_seconds
        samples = scored.sample_rows(step) if step is not None and cfg.writes_samples(step) else []
        if self.log_sample_advantages:
            advantages = outputs.advantages
            first_token = advantages if advantages.dim() == 1 else advantages[:, 0]  # per token: the first one's
            for row, value in zip(samples, first_token.tolist()):
                row["advantage"] = value
        if baseline is not None:
            for i, row in enumerate(samples):
                row["baseline_score"] = float(baseline[i // group])
        return data, metrics, samples

    def _updates(self, data: dict[str, torch.Tensor]) -> list[list[dict[str, torch.Tensor]]]:
        """``iterations x mini_batches`` updates of micro-batches: each pass shuffles the rows with the
        checkpointed generator (one ``randperm`` per pass) and cuts them into ``mini_batches`` equal parts,
        each cut into micro-batches of ``per_device_train_batch_size`` rows."""
        device = self.accelerator.device
        n, micro = data["response_mask"].shape[0], self.config.per_device_train_batch_size
        mini = n // self.mini_batches
        updates = []
        for _ in range(self.iterations):
            order = torch.randperm(n, generator=self.shuffle)
            for m in range(self.mini_batches):
                rows = order[m * mini : (m + 1) * mini]
                updates.append([slice_rows(data, rows[i : i + micro].to(device)) for i in range(0, mini, micro)])
        return updates

    def _greedy_baseline(self, policy, examples: list[dict], scored: ScoredCompletions,
                         group: int) -> tuple[ScoredCompletions, torch.Tensor, float]:
        """One greedy completion per prompt, scored: ``(scored, (P,) baseline scores of its groups' prompts,
        seconds)``. With ``--reward_func_errors drop`` a prompt whose greedy completion could not be scored
        leaves the step with its group (counted in ``rewards/dropped``)."""
        greedy = self.setup.sample(policy, examples, max_new_tokens=self.max_new_tokens, do_sample=False)
        position = {p: i for i, p in enumerate(greedy.completions.prompt_index)}
        prompts = scored.completions.prompt_index[::group]  # each group's prompt
        baseline = torch.tensor([float(greedy.scores[position[p]]) if p in position else math.nan for p in prompts])
        missing = baseline.isnan()
        if missing.any():
            bad = missing.repeat_interleave(group)
            scored = dataclasses.replace(scored, scores=torch.where(bad, math.nan, scored.scores))
            scored = scored.without_bad_rewards(group)
            baseline = baseline[~missing]
        return scored, baseline, greedy.generation_seconds + greedy.scoring_seconds

    # --- loss helpers ---------------------------------------------------------------------------------------
    def current_and_old_logps(self, model, batch: dict[str, torch.Tensor],
                              metrics: dict[str, Any] | None = None, *,
                              entropies: list[torch.Tensor] | None = None,
                              entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, L)`` completion-token log-probs of ``batch`` under ``model`` (with gradients) and the old
        policy's: the batch's ``old_logps``, or the current ones detached when the batch has none (one pass:
        the ratio is exactly 1). Given ``metrics``, puts TRL's ``entropy`` there: the mean over the batch's
        ``response_mask`` tokens of the entropy of the policy's ``softmax(logits / temperature)``, from the
        same forward (the chunked output head's running statistics: no ``(tokens x vocabulary)`` logits); given
        the list ``entropies``, appends the ``(N, L)`` per-token entropies to it (detached unless
        ``entropy_grad``)."""
        if metrics is None and entropies is None:
            logps = self.setup.logps(model, batch)
        else:
            logps, entropy = self.setup.logps(model, batch, with_entropy=True, entropy_grad=entropy_grad)
            if metrics is not None:
                metrics["entropy"] = masked_mean_or_zero(entropy.detach(), batch["response_mask"].bool())
            if entropies is not None:
                entropies.append(entropy)
        return logps, batch["old_logps"] if "old_logps" in batch else logps.detach()

    def clipped_token_loss(self, model, batch: dict[str, torch.Tensor], *, epsilon: float,
                           epsilon_high: float | None = None) -> LossTerms:
        """The per-token clipped surrogate ``max(-A_t r_t, -A_t clip(r_t, 1 - epsilon, 1 + epsilon_high))``
        (:func:`~alignlab.losses.ppo.clipped_policy_loss`, PPO's eq. 7 per token), averaged over the
        micro-batch's completion tokens (OpenRLHF ``PolicyLoss``'s token-level mean; veRL
        ``loss_agg_mode="token-mean"``). Metrics: ``clip_ratio`` (fraction of clipped tokens), ``entropy`` and
        ``policy/approxkl``. ``(N,)`` advantages are broadcast over their completion's tokens."""
        mask = batch["response_mask"].bool()
        out: dict[str, Any] = {}
        logps, old_logps = self.current_and_old_logps(model, batch, out)
        per_token, metrics = clipped_policy_loss(logps, old_logps, batch["advantages"], mask, cliprange=epsilon,
                                                 cliprange_high=epsilon_high)
        loss = aggregate_token_loss(per_token, mask, loss_type="bnpo")
        out.update({"clip_ratio": metrics["policy/clipfrac"], "policy/approxkl": metrics["policy/approxkl"]})
        return [(loss, out)]


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


def group_sampling_args(b: CompareBudget, group_flag: str) -> dict:
    """A group-sampling method's flags from compare's budget: its prompts, ``b.num_generations`` completions
    (``group_flag``) for each of ``b.prompts_per_step`` prompts per step, the completion budget, the task's reward."""
    rule = {k: v for k, v in b.rule.items()}
    rule.update(dataset_name=b.prompts, max_completion_length=b.max_new_tokens, temperature=b.temperature)
    rule[group_flag] = b.num_generations
    rule["per_device_train_batch_size"] = b.num_generations * b.prompts_per_step
    return rule

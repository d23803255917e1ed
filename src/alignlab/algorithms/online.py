"""What the online algorithms (PPO, GRPO, Online DPO) share: the reward and sampling flags, and the set-up of
prompts, policy, reference and reward sources. Each algorithm adds its own rollout and loss."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Literal
import torch

from alignlab.data.io import read_rows
from alignlab.data.prompts import build_prompt_examples
from alignlab.errors import UserError
from alignlab.models import is_peft_model, load_causal_lm, load_tokenizer
from alignlab.rollout.engines import BACKENDS
from alignlab.rollout.experience import ScoredCompletions, sample_and_score
from alignlab.rollout.generation import completion_token_logps
from alignlab.rollout.rewards import build_reward_sources
from alignlab.rollout.scoring import attach_reward_model
from alignlab.train.config import TrainConfig
from alignlab.train.distributed import gathered_parameters
from alignlab.train.loop import autocast, build_accelerator
from alignlab.train.setup import frozen_model, prepare_model

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

    logging_steps: int = 1
    """Write a row to ``metrics.jsonl`` every this many steps (each step is a whole rollout)."""
    reward_model_path: str | None = None
    """A trained reward model (an ``alignlab reward`` output_dir or hub id); its score of the prompt+completion,
    read at the last token, is a reward. Scored on the policy's token ids when the vocabularies match, else
    on the text re-tokenized with its own tokenizer."""
    reward_funcs: list[str] | None = None
    """Python reward functions, ``path/to/file.py:name`` or ``module:name`` (TRL signature
    ``fn(prompts, completions, **columns) -> list[float]``); several allowed."""
    reward_weights: list[float] | None = None
    """One weight per reward source: the reward functions in order, then the reward model. Default: all 1."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1: off; then the log-probs are those of the sampling distribution)."""
    max_prompt_length: int | None = 512
    """Keep at most the last this many prompt tokens."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of completions that reach the length limit without EOS (TRL)."""
    sample_steps: int = 10
    """Append the step's prompts, completions and rewards to ``samples.jsonl`` at step 1 and every this many
    steps (0: never)."""
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
    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.reward_model_path and not self.reward_funcs:
            raise UserError("give --reward_model_path and/or --reward_funcs")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise UserError(f"--max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.sample_steps < 0:
            raise UserError(f"--sample_steps must be >= 0, got {self.sample_steps}")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise UserError(f"--missing_eos_penalty must be >= 0, got {self.missing_eos_penalty}")
        if self.reward_func_errors not in ("raise", "drop"):
            raise UserError(f"--reward_func_errors must be raise or drop, got {self.reward_func_errors!r}")
        if self.generation_backend not in BACKENDS:
            raise UserError(f"--generation_backend must be one of {', '.join(BACKENDS)}, "
                            f"got {self.generation_backend!r}")
        if self.eval_dataset_name or self.eval_split_size:
            raise UserError("online training has no evaluation pass: drop --eval_dataset_name / --eval_split_size")

    def writes_samples(self, step: int) -> bool:
        """Whether ``step`` appends to ``samples.jsonl``."""
        return bool(self.sample_steps) and (step == 1 or step % self.sample_steps == 0)


class OnlineSetup:
    """Prompts, policy, reference and reward sources, loaded for an online algorithm.

    Args:
        config: the algorithm's config.
        prompts_per_step: prompts each process needs for one rollout (a clear error if the data has fewer).
        batch_hint: how that number is made up, for the error message.
        need_reference: load a reference (a frozen copy of the policy, or the policy's disabled adapters with
            ``use_peft``); GRPO with ``beta = 0`` needs none.

    Attributes: ``accelerator``, ``tokenizer``, ``prompts`` (examples), ``sources`` (reward sources, models
    attached), ``policy`` (prepared for training, on the device), ``ref_model`` (``None`` with LoRA or
    without a reference), ``reward_tokenizer`` (``None`` unless the reward model's vocabulary differs).

    Raises:
        UserError / DataError: bad flags, unreadable data or models, a bad row.
    """

    def __init__(self, config: OnlineConfig, *, prompts_per_step: int, batch_hint: str, need_reference: bool = True):
        self.config = config
        self.accelerator = acc = build_accelerator(config)
        device = acc.device
        self.tokenizer = tok = load_tokenizer(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
        rows = read_rows(config.dataset_name, config_name=config.dataset_config, split=config.dataset_train_split)
        self.prompts, stats = build_prompt_examples(
            rows, tok, max_prompt_length=config.max_prompt_length, prompt_column=config.prompt_column
        )
        if acc.is_main_process:
            logger.info("prompts %s: %s", config.dataset_name, stats.describe())
        if len(self.prompts) < prompts_per_step:
            raise UserError(
                f"one rollout takes {prompts_per_step} prompts per process ({batch_hint}) but "
                f"{config.dataset_name} has {len(self.prompts)}"
            )
        self.sources = build_reward_sources(
            config.reward_funcs, config.reward_weights, with_reward_model=bool(config.reward_model_path)
        )

        policy = load_causal_lm(config.model_name_or_path,
                                trust_remote_code=config.trust_remote_code, use_kernels=config.use_kernels)
        self.has_reference = need_reference
        self.ref_model = None
        if need_reference and not config.use_peft:  # with LoRA the reference is the policy, adapters disabled
            self.ref_model = frozen_model(copy.deepcopy(policy), acc)
        self.policy = prepare_model(policy, config, device)

        self.reward_tokenizer = attach_reward_model(self.sources, config, tok, device, acc)

    def checkpointed_generator(self, seed: int) -> torch.Generator:
        """A ``torch.Generator`` seeded with ``seed`` whose state is saved in every checkpoint and restored on
        resume (registered with the accelerator), so that a resumed run draws what the uninterrupted one would
        (the rollouts' shuffles into mini- and micro-batches). Call it in the same order on every run."""
        generator = torch.Generator().manual_seed(seed)
        self.accelerator.register_for_checkpointing(GeneratorState(generator))
        return generator

    def logps(self, model: torch.nn.Module, sequences: dict[str, torch.Tensor], *,
              temperature: float | None = None) -> torch.Tensor:
        """``(N, L)`` completion-token log-probs under ``model`` at ``temperature`` (default: the sampling
        temperature)."""
        cfg = self.config
        return completion_token_logps(
            model, sequences, temperature=cfg.temperature if temperature is None else temperature,
            padding_free=cfg.padding_free, pad_token_id=self.tokenizer.pad_token_id,
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

    def sample(self, policy: torch.nn.Module, examples: list[dict], *, max_new_tokens: int,
               num_generations: int = 1, return_logps: bool = False) -> ScoredCompletions:
        """Sample and score completions for ``examples`` with the (unwrapped) ``policy``; ``return_logps``: keep
        the sampled tokens' log-probs (``sequences["sampling_logps"]``). With ``--reward_func_errors drop`` the
        completions a reward function failed on are left out, with their prompt's group
        (:meth:`~alignlab.rollout.experience.ScoredCompletions.without_bad_rewards`).

        A policy sharded with FSDP2 is all-gathered once for the whole call (every process calls it) and
        resharded after it (:func:`alignlab.train.distributed.gathered_parameters`), so decoding runs on full
        weights, as in one process or DDP."""
        cfg, device = self.config, self.accelerator.device
        with gathered_parameters(policy):
            scored = sample_and_score(
                policy, self.tokenizer, examples, self.sources, device=device, precision=autocast(cfg, device),
                max_new_tokens=max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                num_generations=num_generations, missing_eos_penalty=cfg.missing_eos_penalty,
                reward_tokenizer=self.reward_tokenizer, return_logps=return_logps,
                padding_free=cfg.padding_free, on_error=cfg.reward_func_errors,
                generation_backend=cfg.generation_backend,
            )
        return scored.without_bad_rewards(num_generations) if cfg.reward_func_errors == "drop" else scored

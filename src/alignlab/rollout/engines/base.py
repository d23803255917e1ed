"""What every generation engine shares: the sampling settings, the completions it returns, and the interface
the online algorithms, ``evaluate``, ``compare`` and iterative DPO sample through."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from alignlab.registry import Registry


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions (TRL's names; vLLM's ``SamplingParams`` carries the same settings).

    Attributes:
        max_new_tokens: the length limit per completion (TRL ``max_completion_length`` / ``response_length``).
        eos_token_id, pad_token_id: from the tokenizer.
        temperature: > 0; the logits are divided by it.
        top_p: nucleus threshold in (0, 1]; 1 is off.
        top_k: keep the k most likely tokens; 0 is off.
        min_p: drop tokens whose probability is below ``min_p`` times the most likely token's (transformers'
            ``MinPLogitsWarper``; TRL ``min_p``); ``None`` is off.
        repetition_penalty: divide the positive logits (multiply the negative ones) of every token already in the
            prompt or the completion so far by this (transformers' ``RepetitionPenaltyLogitsProcessor``, CTRL's
            penalty; TRL ``repetition_penalty``); 1 is off.
        num_generations: completions per prompt, adjacent in the output (GRPO's group size).
        batch_size: prompts per call of the backend (default: all at once); engines that schedule sequences
            themselves (``paged``) take all prompts at once and ignore it.
        return_logps: also return each completion token's log-prob under the distribution it was drawn from.
        do_sample: ``False``: greedy decoding (the most likely token, temperature / top-p / top-k / min-p and the
            repetition penalty unused; the log-probs are then those of ``softmax(logits)``).

    Raises:
        ValueError: temperature <= 0, top_p outside (0, 1], top_k < 0, min_p outside [0, 1], repetition_penalty
            <= 0, max_new_tokens < 1,
            num_generations < 1 or batch_size < 1.
    """

    max_new_tokens: int
    eos_token_id: int
    pad_token_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    num_generations: int = 1
    batch_size: int | None = None
    return_logps: bool = False
    do_sample: bool = True

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {self.num_generations}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Completions:
    """Sampled completions of a batch of prompts, in prompt order (``num_generations`` per prompt, adjacent).

    Attributes:
        ids: token ids of each completion, cut after its first EOS token (the EOS kept).
        has_eos: whether each completion ended with EOS within the length limit.
        prompt_index: for each completion, the index of its prompt in the batch.
        logps: with ``return_logps``, the float32 log-prob of each completion token under the distribution it
            was sampled from (the logits after temperature / top-p / top-k), else ``None``.
    """

    ids: list[list[int]]
    has_eos: list[bool]
    prompt_index: list[int]
    logps: list[list[float]] | None = None

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.ids]


def check_prompts(prompt_ids: list[list[int]]) -> None:
    """Raises ValueError when a prompt is empty."""
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")


def repeated(prompt_ids: list[list[int]], num_generations: int) -> list[list[int]]:
    """Each prompt ``num_generations`` times in a row: the rows an engine decodes."""
    return [p for p in prompt_ids for _ in range(num_generations)]


def cut_at_eos(rows: list[list[int]], logps: list[list[float]] | None, params: SamplingParams,
               first_prompt: int = 0) -> Completions:
    """:class:`Completions` of decoded ``rows`` (``num_generations`` per prompt, adjacent), each cut after its
    first EOS; ``logps`` (one per token, or ``None``) cut alike; ``first_prompt`` offsets ``prompt_index``."""
    out = Completions(ids=[], has_eos=[], prompt_index=[], logps=[] if logps is not None else None)
    eos = params.eos_token_id
    for row, seq in enumerate(rows):
        cut = seq.index(eos) + 1 if eos in seq else len(seq)
        out.ids.append(list(seq[:cut]))
        out.has_eos.append(eos in seq)
        out.prompt_index.append(first_prompt + row // params.num_generations)
        if logps is not None:
            out.logps.append(list(logps[row][:cut]))
    return out


def concat(parts: list[Completions]) -> Completions:
    """One :class:`Completions` of several, in order."""
    with_logps = bool(parts) and parts[0].logps is not None
    return Completions(ids=[i for p in parts for i in p.ids], has_eos=[e for p in parts for e in p.has_eos],
                       prompt_index=[i for p in parts for i in p.prompt_index],
                       logps=[row for p in parts for row in p.logps] if with_logps else None)


ENGINES: Registry[type["GenerationEngine"]] = Registry("generation_backend")
"""``--generation_backend`` name -> engine class, in registration order (``generate``, ``static``, ``paged``);
each class registers itself with ``@ENGINES.register(name)`` and carries the same ``name``."""


class GenerationEngine(ABC):
    """Samples completions of token-id prompts from a policy.

    In-process engines decode with the policy module itself; an engine that serves the policy from another
    process (vLLM, SGLang: TRL's ``vllm_mode="server"``) implements the same two methods, copying the weights
    in :meth:`update_weights`, and no algorithm changes.

    Attributes:
        name: the ``--generation_backend`` value.
        returns_logps: whether :meth:`generate` can return the sampled tokens' log-probs; when false, callers
            that need them recompute them with one forward
            (:func:`~alignlab.rollout.generation.completion_token_logps`).
        model: the policy this engine decodes with.
    """

    name: ClassVar[str]
    returns_logps: ClassVar[bool] = True

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Completions:
        """Completions of ``prompt_ids`` (token ids, no padding), ``params.num_generations`` per prompt in prompt
        order, with log-probs when ``params.return_logps`` (and :attr:`returns_logps`).

        Raises:
            ValueError: an empty prompt.
        """

    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the next :meth:`generate` decode with ``model``'s current weights; called before each rollout
        (after the optimizer step). In-process engines read the module's parameters themselves, so this only
        points the engine at ``model`` (in-place updates are seen without it)."""
        self.model = model

    def close(self) -> None:
        """Release what the engine holds (nothing for in-process engines)."""

"""Sampling completions from the policy, and the per-token log-probs and values of sampled sequences (laid out
by :func:`alignlab.data.sequences.build_sequences`).

Sampling goes through a generation engine (:mod:`alignlab.rollout.engines`, ``--generation_backend``):
transformers ``generate`` with a dynamic or a static, compiled KV cache, or transformers' continuous
batching. alignlab chooses the sampling settings and cuts each completion after its first EOS token.
"""

from __future__ import annotations

import torch

# kept for grpo.py, rloo.py and ppo.py until they import it from alignlab.data.sequences
from alignlab.ops.logprobs import completion_logps
from alignlab.rollout.engines import engine_for
from alignlab.rollout.engines.base import Completions, SamplingParams
from alignlab.rollout.engines.hf_generate import InverseCDFSampling
from alignlab.rollout.scoring import token_scores

__all__ = ["Completions", "InverseCDFSampling", "SamplingParams", "completion_token_logps", "sample_completions",
           "token_values"]


def sample_completions(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_generations: int = 1,
    batch_size: int | None = None,
    return_logps: bool = False,
    do_sample: bool = True,
    generation_backend: str = "auto",
) -> Completions:
    """Sample ``num_generations`` completions for each prompt with the ``generation_backend`` engine of
    ``model`` (:func:`alignlab.rollout.engines.engine_for`: built once per model, pointed at its current
    weights before the call).

    Generation stops per completion at ``eos_token_id`` or after ``max_new_tokens``. Only temperature, top-p,
    top-k, min-p and the repetition penalty act on the distribution (the checkpoint's own generation defaults, e.g. a repetition penalty, are not
    applied), so the tokens are draws from ``softmax(logits / temperature)`` restricted by top-p / top-k: with
    ``top_p=1`` and ``top_k=0`` this is exactly the distribution whose log-probs
    :func:`completion_token_logps` computes (TRL PPO: ``top_k=0, top_p=1``).

    Args:
        model: a causal LM (possibly peft-wrapped; not DDP-wrapped), in eval mode.
        prompt_ids: token ids of each prompt (no padding).
        max_new_tokens: the length limit per completion (TRL ``response_length`` / ``max_completion_length``).
        eos_token_id, pad_token_id: from the tokenizer.
        temperature: > 0.
        top_p: nucleus threshold in (0, 1].
        top_k: keep the k most likely tokens; 0 disables.
        min_p, repetition_penalty: as :class:`SamplingParams` (``None`` / 1: off).
        num_generations: completions per prompt (GRPO's group size).
        batch_size: prompts per ``generate`` call (default: all at once; the ``paged`` engine schedules all
            prompts itself).
        return_logps: also return each sampled token's float32 log-prob under the sampling distribution, which
            PPO takes as its old log-probs.
        do_sample: ``False``: greedy decoding.
        generation_backend: ``auto``, ``generate``, ``static`` or ``paged`` (:data:`alignlab.rollout.engines.BACKENDS`).

    Returns:
        :class:`Completions`, ``len(prompt_ids) * num_generations`` of them.

    Raises:
        ValueError: temperature <= 0, top_p outside (0, 1], max_new_tokens < 1, an empty prompt or an unknown
            backend.
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, num_generations=num_generations,
                            batch_size=batch_size, return_logps=return_logps, do_sample=do_sample)
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    return engine_for(model, generation_backend).generate(prompt_ids, params)


def completion_token_logps(
    model: torch.nn.Module,
    sequences: dict[str, torch.Tensor],
    *,
    temperature: float = 1.0,
    padding_free: bool = True,
    pad_token_id: int = 0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``(N, L)`` float32 log-probs of each completion token under ``model`` at ``temperature``, 0 on padding.

    ``log softmax(logits / temperature)`` at the sampled token: the log-probs of the distribution the tokens
    were drawn from (TRL PPO and GRPO divide the logits by the sampling temperature the same way). One
    forward, only completion positions through the output head (:func:`completion_logps`). ``with_entropy``:
    also the ``(N, L)`` detached entropies of those distributions from the same pass, 0 on padding (TRL GRPO's
    ``entropies`` of ``_get_per_token_logps_and_entropies``); with ``entropy_grad`` they keep their gradient
    (TRL's entropy bonus, ``entropy_coef``).
    """
    out = completion_logps(
        model,
        sequences["input_ids"],
        sequences["attention_mask"],
        sequences["completion_mask"],
        padding_free=padding_free,
        pad_token_id=pad_token_id,
        temperature=temperature,
        token_stats=("entropy",) if with_entropy else (),
        entropy_grad=entropy_grad,
    )
    index = sequences["completion_index"].to(out[0].device)
    mask = sequences["response_mask"].to(out[0].device)
    logps = out[0].gather(1, index) * mask
    return (logps, out[2]["entropy"].gather(1, index) * mask) if with_entropy else logps


def token_values(value_model: torch.nn.Module, sequences: dict[str, torch.Tensor], *, padding_free: bool = False,
                 pad_token_id: int = 0) -> torch.Tensor:
    """``(N, L)`` float32 critic values ``V(s_t)`` for each completion token, 0 on padding.

    ``V`` for completion token ``j`` is the value head at the position before it (the state the token was
    sampled in), as TRL PPO (``values[:, context_length - 1 : -1]``). ``padding_free``, ``pad_token_id``: one
    forward over packed rows (:func:`~alignlab.rollout.scoring.token_scores`).
    """
    per_position = token_scores(value_model, sequences["input_ids"], sequences["attention_mask"],
                                padding_free=padding_free, pad_token_id=pad_token_id)
    values = per_position.gather(1, sequences["completion_index"].to(per_position.device))
    return values * sequences["response_mask"].to(values.device)

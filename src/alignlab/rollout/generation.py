"""Sampling completions from the policy, and laying prompt+completion sequences out for scoring and training.

Sampling goes through a generation engine (:mod:`alignlab.rollout.engines`, ``--generation_backend``):
transformers ``generate`` with a dynamic or a static, compiled KV cache, or transformers' continuous
batching. alignlab chooses the sampling settings and cuts each completion after its first EOS token.
"""

from __future__ import annotations

import torch

from alignlab.ops.logprobs import completion_logps
from alignlab.rollout.engines import engine_for
from alignlab.rollout.engines.base import Completions, SamplingParams
from alignlab.rollout.engines.hf_generate import InverseCDFSampling
from alignlab.rollout.scoring import token_scores

__all__ = ["Completions", "InverseCDFSampling", "SamplingParams", "build_sequences", "completion_token_logps",
           "sample_completions", "slice_rows", "token_values"]


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
    num_generations: int = 1,
    batch_size: int | None = None,
    return_logps: bool = False,
    do_sample: bool = True,
    generation_backend: str = "auto",
) -> Completions:
    """Sample ``num_generations`` completions for each prompt with the ``generation_backend`` engine of
    ``model`` (:func:`alignlab.rollout.engines.engine_for`: built once per model, pointed at its current
    weights before the call).

    Generation stops per completion at ``eos_token_id`` or after ``max_new_tokens``. Only temperature, top-p and
    top-k act on the distribution (the checkpoint's own generation defaults, e.g. a repetition penalty, are not
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
                            temperature=temperature, top_p=top_p, top_k=top_k, num_generations=num_generations,
                            batch_size=batch_size, return_logps=return_logps, do_sample=do_sample)
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    return engine_for(model, generation_backend).generate(prompt_ids, params)


def build_sequences(
    prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + completion`` rows and the index that lines their completion tokens up.

    Returns a dict of tensors (N rows, ``T`` = longest prompt+completion, ``L`` = longest completion, >= 1):

    * ``input_ids``, ``attention_mask``, ``completion_mask``: ``(N, T)``;
    * ``completion_index``: ``(N, L)`` long; entry ``[i, j]`` is the position in the ``(N, T-1)`` shifted
      per-token outputs (log-probs of token ``t+1`` given ``<= t``; a value model's ``V`` at position ``t``)
      that belongs to completion token ``j``: ``len(prompt_i) - 1 + j`` (clamped for padding);
    * ``response_mask``: ``(N, L)`` 1 for real completion tokens.

    Raises:
        ValueError: the lists differ in length, or a prompt is empty.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    n = len(prompt_ids)
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    resp = max(1, max(len(c) for c in completion_ids))
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, resp), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) : len(p) + len(c)] = 1
        response_mask[i, : len(c)] = 1
    starts = torch.tensor([len(p) - 1 for p in prompt_ids]).unsqueeze(1)
    completion_index = (starts + torch.arange(resp)).clamp(max=max(width - 2, 0))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "completion_index": completion_index,
        "response_mask": response_mask,
    }


def slice_rows(sequences: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The given rows of a :func:`build_sequences` dict (plus any other ``(N, ...)`` tensors in it), with the
    ``(., T)`` tensors trimmed to the rows' longest sequence."""
    out = {k: v[rows] for k, v in sequences.items()}
    width = int(out["attention_mask"].sum(dim=1).max())
    for key in ("input_ids", "attention_mask", "completion_mask"):
        out[key] = out[key][:, :width]
    out["completion_index"] = out["completion_index"].clamp(max=max(width - 2, 0))
    return out


def completion_token_logps(
    model: torch.nn.Module,
    sequences: dict[str, torch.Tensor],
    *,
    temperature: float = 1.0,
    padding_free: bool = True,
    pad_token_id: int = 0,
) -> torch.Tensor:
    """``(N, L)`` float32 log-probs of each completion token under ``model`` at ``temperature``, 0 on padding.

    ``log softmax(logits / temperature)`` at the sampled token: the log-probs of the distribution the tokens
    were drawn from (TRL PPO and GRPO divide the logits by the sampling temperature the same way). One
    forward, only completion positions through the output head (:func:`completion_logps`).
    """
    per_token, _ = completion_logps(
        model,
        sequences["input_ids"],
        sequences["attention_mask"],
        sequences["completion_mask"],
        padding_free=padding_free,
        pad_token_id=pad_token_id,
        temperature=temperature,
    )
    logps = per_token.gather(1, sequences["completion_index"].to(per_token.device))
    return logps * sequences["response_mask"].to(logps.device)


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

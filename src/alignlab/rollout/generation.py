"""Sampling completions from the policy, and laying prompt+completion sequences out for scoring and training.

Generation is transformers' ``generate`` (batched, left-padded prompts, KV cache, its temperature / top-k /
top-p warpers); alignlab chooses the sampling settings, draws each token with its own logits processor
(:class:`InverseCDFSampling`, cheaper than ``torch.multinomial``) and cuts each completion after its first EOS
token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alignlab.ops import cpu_kernels
from alignlab.ops.logprobs import completion_logps
from alignlab.rollout.scoring import token_scores


@dataclass
class Completions:
    """Sampled completions of a batch of prompts, in prompt order (``num_generations`` per prompt, adjacent).

    Attributes:
        ids: token ids of each completion, cut after its first EOS token (the EOS kept).
        has_eos: whether each completion ended with EOS within the length limit.
        prompt_index: for each completion, the index of its prompt in the batch.
        logps: with ``return_logps``, the log-prob of each completion token under the distribution it was
            sampled from (the sampler's logits after temperature / top-p / top-k), else ``None``.
    """

    ids: list[list[int]]
    has_eos: list[bool]
    prompt_index: list[int]
    logps: list[list[float]] | None = None

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.ids]


class InverseCDFSampling:
    """A logits processor that draws each row's next token from ``softmax(scores)`` and returns scores whose
    only finite entry (0) is the drawn token, so that ``generate``'s greedy argmax picks it.

    Inverse transform sampling: one uniform ``u`` per row, the token is the first whose cumulative probability
    (float64) reaches ``u`` times the total; a token of probability 0 is never drawn. It is the same
    distribution ``generate``'s own ``do_sample`` path draws from with ``torch.multinomial``, at a fraction of
    the cost: ``multinomial`` draws one exponential variate per vocabulary entry, this draws one uniform per
    row and makes one pass over the probabilities (19 ms saved per 116 ms decode step for 16 rows over the
    49k vocabulary of the embedded model on the 2-core CPU measured; ``benchmarks/generation.py``,
    docs/rollouts.md). Uses the global torch generator, as ``multinomial``.

    ``logps`` collects, per call, the ``(rows, 1)`` float32 log-probability of the drawn tokens under
    ``softmax(scores)``: the sampling distribution after the warpers before it.
    """

    def __init__(self) -> None:
        self.logps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scores.float(), dim=-1)  # (rows, V)
        cdf = logp.exp().double().cumsum_(dim=-1)
        u = (1.0 - torch.rand((cdf.shape[0], 1), dtype=torch.float64, device=cdf.device)) * cdf[:, -1:]  # (0, total]
        tokens = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[1] - 1)  # (rows, 1)
        self.logps.append(logp.gather(1, tokens))
        return torch.full_like(scores, -math.inf).scatter_(1, tokens, 0.0)


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
) -> Completions:
    """Sample ``num_generations`` completions for each prompt with ``model.generate`` and the KV cache.

    Prompts are left-padded (so every row's next token is at the same position) in chunks of ``batch_size``
    prompts; generation stops per row at ``eos_token_id`` or after ``max_new_tokens``. Only temperature,
    top-p and top-k act on the distribution (the checkpoint's own generation defaults, e.g. a repetition
    penalty, are not applied), so the tokens are draws from ``softmax(logits / temperature)`` restricted
    by top-p / top-k: with ``top_p=1`` and ``top_k=0`` this is exactly the distribution whose log-probs
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
        batch_size: prompts per ``generate`` call (default: all at once).
        return_logps: also return each sampled token's log-prob under the sampling distribution (recorded by
            :class:`InverseCDFSampling` as it draws), which PPO takes as its old log-probs.

    Tokens are drawn by :class:`InverseCDFSampling` at the end of ``generate``'s logits processors, on its
    greedy path (``do_sample=False``): the same distribution as ``do_sample=True``, without
    ``torch.multinomial``'s per-entry exponential draws. The call runs inside the CPU speed layer's decoding
    context (:func:`alignlab.ops.cpu_kernels.decoding`: on the CPU, linear layers decode from weights reordered
    once per call; a no-op elsewhere or with ``--cpu_kernels off``).

    Returns:
        :class:`Completions`, ``len(prompt_ids) * num_generations`` of them.

    Raises:
        ValueError: temperature <= 0, top_p outside (0, 1], max_new_tokens < 1, or an empty prompt.
    """
    from transformers import (
        GenerationConfig,
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    # generate samples through its greedy path: the warpers below shape the distribution and the last
    # processor draws the token (see InverseCDFSampling), so generate's argmax returns the draw
    sampler = InverseCDFSampling()
    processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    processors.append(sampler)
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
    )
    device = next(model.parameters()).device
    batch_size = batch_size or len(prompt_ids)
    ids, has_eos, prompt_index, logps = [], [], [], []
    # one reordered copy of the weights for all chunks (the rows hint: a full chunk)
    with cpu_kernels.decoding(model, rows=min(batch_size, len(prompt_ids)) * num_generations):
        for start in range(0, len(prompt_ids), batch_size):
            # each prompt repeated num_generations times (generate's num_return_sequences does the same, but
            # refuses the greedy path)
            chunk = [p for p in prompt_ids[start : start + batch_size] for _ in range(num_generations)]
            width = max(len(p) for p in chunk)
            input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in chunk], device=device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            sampler.logps.clear()
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                 logits_processor=processors)
            sequences = out[:, width:]
            step_logps = torch.cat(sampler.logps, dim=1).tolist() if return_logps else None  # (rows, new tokens)
            for row, seq in enumerate(sequences.tolist()):
                cut = seq.index(eos_token_id) + 1 if eos_token_id in seq else len(seq)
                ids.append(seq[:cut])
                has_eos.append(eos_token_id in seq)
                prompt_index.append(start + row // num_generations)
                if return_logps:
                    logps.append(step_logps[row][:cut])
    return Completions(ids=ids, has_eos=has_eos, prompt_index=prompt_index, logps=logps if return_logps else None)


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

"""Prompt+completion sequences as tensors: right-padded rows and the index that lines their completion tokens
up (:func:`build_sequences`), and a selection of their rows (:func:`slice_rows`). The layout every forward over
sampled or paired completions reads (rollouts, KTO's batches)."""

from __future__ import annotations

import torch


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


def left_truncated_prompts(prompt_ids: list[list[int]], completion_ids: list[list[int]],
                           max_length: int) -> list[list[int]]:
    """The prompts cut on the left so that prompt + completion fits ``max_length`` tokens with the batch's
    longest completion: each prompt keeps its last ``max_length - max(len(completion))`` tokens (at least one,
    the context of the first completion token); the completions are never cut. TRL 1.16 Online DPO's
    ``max_length`` (``OnlineDPOTrainer._forward``: the leftmost columns of the left-padded prompt block
    dropped so that the batch is at most ``max_length`` wide)."""
    keep = max(1, max_length - max((len(c) for c in completion_ids), default=0))
    return [p[-keep:] for p in prompt_ids]


def slice_rows(sequences: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The given rows of a :func:`build_sequences` dict (plus any other ``(N, ...)`` tensors in it), with the
    ``(., T)`` tensors trimmed to the rows' longest sequence."""
    out = {k: v[rows] for k, v in sequences.items()}
    width = int(out["attention_mask"].sum(dim=1).max())
    for key in ("input_ids", "attention_mask", "completion_mask"):
        out[key] = out[key][:, :width]
    out["completion_index"] = out["completion_index"].clamp(max=max(width - 2, 0))
    return out

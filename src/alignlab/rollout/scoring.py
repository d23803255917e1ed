"""Scoring sequences with a scalar-head model: a reward model's score of a whole sequence, or a value model's
(critic's) output at every position."""

from __future__ import annotations

import torch

from alignlab.errors import UserError


def _score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The ``score`` linear layer of a (possibly DDP- and peft-wrapped) sequence classifier."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    head = getattr(inner, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise UserError(f"{type(inner).__name__} has no 'score' head: not a causal-LM sequence classifier")
    return head


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of the last position whose ``attention_mask`` is 1 in each row of a ``(B, T)`` mask
    (right or left padding alike). Rows without any real token give 0."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(dim=1)


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward model's scalar score of each sequence, read at its last real token.

    The score is the linear ``score`` head (Stiennon et al. 2020, arXiv 2009.01325, section 3.4; InstructGPT,
    Ouyang et al. 2022, section 3.5) applied to the final hidden state at the last position where
    ``attention_mask`` is 1: OpenRLHF's ``RewardModel`` (``openrlhf/models/model.py``, ``eos_indices`` from the
    attention mask). transformers' ``*ForSequenceClassification.forward`` (used by TRL) instead pools at the
    rightmost token that differs from ``config.pad_token_id``, which skips a final EOS whenever the pad token is
    the EOS token (SmolLM2, many others), so the score would be read one token early. Here a forward hook
    captures the head's per-position output ``(B, T, 1)`` and the position is picked from the attention mask;
    the forward still runs through ``model`` itself, so peft and DDP wrappers work.

    Args:
        model: ``AutoModelForSequenceClassification`` with ``num_labels=1`` (possibly peft- or DDP-wrapped).
        input_ids: ``(B, T)`` token ids, padded on either side.
        attention_mask: ``(B, T)`` 1 for real tokens.

    Returns:
        ``(B,)`` float32 scores (reward units), differentiable.

    Raises:
        UserError: the model has no ``score`` head.
    """
    per_position = token_scores(model, input_ids, attention_mask)
    rows = torch.arange(input_ids.shape[0], device=per_position.device)
    return per_position[rows, last_token_index(attention_mask).to(per_position.device)]


def token_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The ``score`` head's output at every position: ``(B, T)`` float32, differentiable.

    Position ``t`` sees tokens ``<= t``. A value model (PPO's critic) is this with ``V(s_t)`` read at the
    position before each completion token (Ziegler et al. 2019; TRL ``get_reward`` returns the same
    per-position head output). Rows must be right-padded (positions are counted from the row's start).
    Same model forms and errors as :func:`sequence_scores`.
    """
    captured: list[torch.Tensor] = []
    handle = _score_head(model).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    return captured[-1][..., 0].float()  # (B, T, num_labels) -> (B, T)

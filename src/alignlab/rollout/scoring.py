"""Scoring sequences with a scalar-head model: a reward model's score of a whole sequence, or a value model's
(critic's) output at every position."""

from __future__ import annotations

import contextlib

import torch

from alignlab.errors import UserError
from alignlab.ops.logprobs import base_model, is_right_padded, packed_forward_inputs, supports_packing


def _score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The ``score`` linear layer of a (possibly DDP- and peft-wrapped) sequence classifier."""
    inner = base_model(model)
    head = getattr(inner, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise UserError(f"{type(inner).__name__} has no 'score' head: not a causal-LM sequence classifier")
    return head


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of the last position whose ``attention_mask`` is 1 in each row of a ``(B, T)`` mask
    (right or left padding alike). Rows without any real token give 0."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(dim=1)


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                    padding_free: bool = False, pad_token_id: int = 0) -> torch.Tensor:
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
        padding_free, pad_token_id: as :func:`token_scores`.

    Returns:
        ``(B,)`` float32 scores (reward units), differentiable.

    Raises:
        UserError: the model has no ``score`` head.
    """
    per_position = token_scores(model, input_ids, attention_mask, padding_free=padding_free, pad_token_id=pad_token_id)
    rows = torch.arange(input_ids.shape[0], device=per_position.device)
    return per_position[rows, last_token_index(attention_mask).to(per_position.device)]


def token_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 padding_free: bool = False, pad_token_id: int = 0) -> torch.Tensor:
    """The ``score`` head's output at every position: ``(B, T)`` float32, differentiable.

    Position ``t`` sees tokens ``<= t``. A value model (PPO's critic) is this with ``V(s_t)`` read at the
    position before each completion token (Ziegler et al. 2019; TRL ``get_reward`` returns the same
    per-position head output). Rows must be right-padded (positions are counted from the row's start).
    Same model forms and errors as :func:`sequence_scores`.

    ``padding_free``: when the rows are right-padded and the model type reads packed sequences from
    ``position_ids`` (:func:`~alignlab.ops.logprobs.supports_packing`), the real tokens of all rows are packed
    (:func:`~alignlab.ops.logprobs.packed_forward_inputs`: one row with per-sequence attention under
    ``sdpa``, else first-fit rows with ``pad_token_id`` as filler) and run in one forward; the result is laid
    back out as ``(B, T)``, 0 at padding positions. Otherwise the padded rows are run as they are (and the
    head's output at padding positions is returned too); either way, read only positions with
    ``attention_mask == 1``.
    """
    packed = padding_free and supports_packing(model) and is_right_padded(attention_mask)
    if packed:
        inputs, flat_index, context = packed_forward_inputs(model, input_ids, attention_mask, pad_token_id)
    else:
        inputs, context = {"input_ids": input_ids, "attention_mask": attention_mask}, contextlib.nullcontext()
    captured: list[torch.Tensor] = []
    handle = _score_head(model).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with context:
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    per_position = captured[-1][..., 0].float()  # (rows, T, num_labels) -> (rows, T)
    if not packed:
        return per_position
    flat = per_position.reshape(-1)[flat_index.clamp(max=per_position.numel() - 1)]
    return torch.where(attention_mask.to(flat.device).bool(), flat, 0.0)


def attach_reward_model(sources: list, config, runtime):
    """Load ``config.reward_model_path`` (if set) as a frozen model into the ``reward_model`` source (the last of
    ``sources``) with ``runtime``'s :meth:`~alignlab.train.runtime.Runtime.frozen_model`: on its device, sharded
    with FSDP2 when the trained model is. Returns the reward model's tokenizer (``None`` without a reward
    model): the completions are rendered for it as a reward model is trained on pairs
    (:func:`~alignlab.rollout.experience.reward_model_inputs`), not scored on the sampled token ids, whose last
    token (a truncated completion's last word, or a bare EOS) is not where its training read the score.

    Raises:
        UserError: the reward model or its tokenizer cannot be loaded, or it has no trained score head."""
    if not config.reward_model_path:
        return None
    from alignlab.models import load_reward_model, load_tokenizer

    rtok = load_tokenizer(config.reward_model_path, trust_remote_code=config.trust_remote_code,
                          flag="--reward_model_path")
    model = load_reward_model(config.reward_model_path, pad_token_id=rtok.pad_token_id, require_score_head=True,
                              trust_remote_code=config.trust_remote_code, flag="--reward_model_path")
    sources[-1].model = runtime.frozen_model(model)
    return rtok

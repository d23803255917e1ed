"""Attention over packed sequences without padding or masks: one causal SDPA call per sequence.

Packing many sequences into one row (restarting ``position_ids``) removes padding from every linear layer, but
transformers' ``sdpa`` attention then needs a block-diagonal mask over the whole row, whose cost grows with
the row's width squared and which keeps SDPA off its causal fast path. With ``flash_attention_2`` on a GPU,
transformers instead splits the row by ``cu_seq_lens``; PyTorch's CPU SDPA has no such variable-length
form. :func:`segment_attention` is that split for SDPA: it is registered with transformers'
``AttentionInterface`` under :data:`SEGMENT_ATTENTION` and switched on for one forward by
:func:`segments_enabled`, which packed forwards use when :func:`supports_segments` says the model allows it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

SEGMENT_ATTENTION = "alignlab_segments"
"""The name :func:`segment_attention` is registered under (``config._attn_implementation`` while it runs)."""


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    segment_lengths: list[int] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each of the consecutive sequences of one packed row.

    Args:
        module: the attention layer (its ``num_key_value_groups`` says how often each key/value head repeats).
        query: ``(1, H, T, D)``; key, value: ``(1, H_kv, T, D)``, the row's tokens in order.
        attention_mask: ignored when ``segment_lengths`` is given (no mask is built for this implementation).
        dropout, scaling: as transformers' ``sdpa_attention_forward``.
        segment_lengths: token count of each packed sequence, in order, summing to ``T``. ``None``: the call
            is not a packed forward of alignlab's, and it is passed on to ``sdpa_attention_forward`` as is.

    Returns:
        ``(attn_output (1, T, H, D), None)``, the layout transformers' attention functions return.

    Each sequence attends causally to itself only, exactly as in its own unpadded row; compute and memory go
    as the sum of the squared lengths instead of the row's width squared.

    Raises:
        ValueError: the lengths do not sum to ``T`` or the batch is not 1.
    """
    if segment_lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or sum(segment_lengths) != query.shape[2]:
        raise ValueError(f"segment lengths {segment_lengths} do not tile a packed row of shape {tuple(query.shape)}")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
        for q, k, v in zip(query.split(segment_lengths, dim=2), key.split(segment_lengths, dim=2),
                           value.split(segment_lengths, dim=2))
    ]
    output = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)


def supports_segments(config, longest: int) -> bool:
    """True if a model with this config computes the same attention with :func:`segment_attention` as with its
    own: it uses ``sdpa``, has no logit soft-capping, and no sliding window shorter than ``longest`` (the
    longest packed sequence)."""
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return False
    window = getattr(config, "sliding_window", None)
    return window is None or window >= longest


@contextlib.contextmanager
def segments_enabled(config) -> Iterator[None]:
    """Run the model of ``config`` with :func:`segment_attention` inside the block, its own attention after."""
    previous = config._attn_implementation
    config._attn_implementation = SEGMENT_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous

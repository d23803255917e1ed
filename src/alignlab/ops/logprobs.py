"""Log-probabilities of completion (or other target) tokens under a causal LM."""

from __future__ import annotations

import contextlib

import torch

from alignlab.ops.attention import segments_enabled, supports_segments
from alignlab.ops.lm_head import chunked_head, plain_head_reason

CHUNK_ELEMENTS = 1 << 22
"""Logits entries (4M: a 16 MB float32 block) :class:`_LabelLogProbs` upcasts at a time."""


class _LabelLogProbs(torch.autograd.Function):
    """``log_softmax(scale * logits)[..., label]`` with a hand-written backward that never stores float32 copies.

    The ``(..., V)`` logits are taken as ``M`` rows of ``V`` and processed in chunks of
    ``max(1, CHUNK_ELEMENTS // V)`` rows, upcast (and multiplied by ``scale``) one chunk at a time. Forward:
    ``z = scale * x``, ``lse = logsumexp(z)``, ``out = z[label] - lse``. Backward: ``d out / d z =
    onehot(label) - softmax(z)``, so ``grad_x = scale * g * (onehot - exp(z - lse))``, written chunk by chunk
    straight into the gradient (float32 logits) or through one float32 chunk (lower-precision logits). Saved
    for backward: the logits the model produced anyway, the labels and ``lse`` (one float per token).

    Why chunks: a float32 copy of all ``M x V`` logits (270 MB for 1,400 tokens over a 49k vocabulary) is a
    fresh allocation every call, and glibc maps allocations that large anew each time; on the 2-core VM
    measured every 4 KB page then cost a ~6 us fault, about 0.4 s per copy (docs/dpo.md). A 16 MB chunk is
    reused from the heap. Why ``scale`` inside: a sampling temperature applied as ``logits / T`` beforehand
    is two more passes over all the logits (forward and backward), each as slow as the log-softmax itself.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor, scale: float) -> torch.Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for float64 logits
        rows, labels = logits.reshape(-1, logits.shape[-1]), index.reshape(-1, 1)
        step = max(1, CHUNK_ELEMENTS // rows.shape[1])
        out = torch.empty(labels.shape[0], dtype=acc, device=logits.device)
        lse = torch.empty(labels.shape[0], dtype=acc, device=logits.device)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for start in range(0, rows.shape[0], step):
                chunk = rows[start : start + step].to(acc)
                if scale != 1.0:
                    chunk = chunk * scale
                lse[start : start + step] = torch.logsumexp(chunk, dim=-1)
                out[start : start + step] = chunk.gather(-1, labels[start : start + step]).squeeze(-1)
        out.sub_(lse)
        ctx.save_for_backward(logits, index, lse)
        ctx.scale = scale
        return out.view(index.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, index, lse = ctx.saved_tensors
        scale = ctx.scale
        rows, labels = logits.reshape(-1, logits.shape[-1]), index.reshape(-1, 1)
        step = max(1, CHUNK_ELEMENTS // rows.shape[1])
        g_all = grad_out.reshape(-1, 1).to(lse.dtype) * scale
        grad = torch.empty_like(rows)
        in_place = grad.dtype == lse.dtype  # float32 logits: work in the gradient's own rows
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for start in range(0, rows.shape[0], step):
                stop = start + step
                g = g_all[start:stop]  # (chunk, 1)
                probs = grad[start:stop] if in_place else None
                # softmax(scale * x) = exp(scale * x - lse), one pass that also upcasts
                probs = torch.add(lse[start:stop, None].neg(), rows[start:stop], alpha=scale, out=probs).exp_()
                probs.mul_(-g).scatter_add_(-1, labels[start:stop], g)
                if not in_place:
                    grad[start:stop] = probs
        return grad.view(logits.shape), None, None


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``index``, without materialising the full log-softmax.

    Args:
        logits: ``(B, T, V)`` unnormalised scores (any float dtype).
        index: ``(B, T)`` long token ids.
        temperature: divide the logits by this (> 0) first; applied chunk by chunk inside, never as a
            separate pass over the logits.

    Returns:
        ``(B, T)`` float32 log-probabilities (nats); float64 for float64 logits.

    ``z[index] - logsumexp(z)`` with ``z = logits / temperature``, in float32 over chunks of tokens, with a
    fused backward (``onehot - softmax``) so that neither pass keeps a ``(B, T, V)`` float32 tensor besides
    the gradient itself: peak extra memory is one 16 MB float32 block (:data:`CHUNK_ELEMENTS`). Same values
    as TRL's ``selective_log_softmax`` (``trl/trainer/utils.py``) applied to ``logits / temperature``.

    Raises:
        ValueError: ``temperature`` is not > 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _LabelLogProbs.apply(logits, index, 1.0 / temperature)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``(...)`` float32 entropy (nats) of ``softmax(logits / temperature)`` over the last dimension, without
    gradient: ``H = logsumexp(z) - sum_j softmax(z)_j z_j``, in chunks of :data:`CHUNK_ELEMENTS` entries
    upcast one at a time. TRL's ``entropy_from_logits`` (``trl/trainer/utils.py``, the ``entropy`` metric of
    its GRPO, RLOO, SFT and DPO trainers), of ``logits / temperature`` as TRL's trainers pass them.

    Raises:
        ValueError: ``temperature`` is not > 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    acc = torch.promote_types(logits.dtype, torch.float32)
    rows = logits.detach().reshape(-1, logits.shape[-1])
    out = torch.empty(rows.shape[0], dtype=acc, device=logits.device)
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    with torch.no_grad():
        for start in range(0, rows.shape[0], step):
            z = rows[start : start + step].to(acc) / temperature
            lse = torch.logsumexp(z, dim=-1)
            out[start : start + step] = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return out.reshape(logits.shape[:-1])


# Model types whose attention masks come from transformers' masking utilities, which read packed
# sequences from ``position_ids`` (a new sequence starts wherever the position does not grow by one).
PACKING_MODEL_TYPES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
     "phi3", "olmo2", "smollm3", "granite", "cohere", "starcoder2"}
)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without its DDP (``.module``) and peft (``get_base_model()``) wrappers."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def supports_packing(model: torch.nn.Module) -> bool:
    """True if ``model`` (possibly wrapped by peft or DDP) accepts packed rows through ``position_ids``."""
    return getattr(getattr(base_model(model), "config", None), "model_type", None) in PACKING_MODEL_TYPES


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit-decreasing packing of sequences into rows of at most ``width`` tokens.

    Args:
        lengths: token count of each sequence (each <= ``width``).
        width: row capacity.

    Returns:
        Rows, each a list of sequence indices in the order they are laid out. Deterministic.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(width - lengths[i])
    return rows


def packed_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int):
    """Lay the real tokens of each row of ``input_ids`` (right-padded, ``(N, T)``) out in packed rows
    (:func:`pack_rows` with the batch's width ``T``), for one padding-free forward with restarting
    ``position_ids``.

    Returns:
        ``(packed_ids (R, W), position_ids (R, W), flat_index (N, T))`` where ``flat_index[s, t]`` is the
        position of token ``t`` of sequence ``s`` in ``packed_ids.view(-1)`` (meaningful where
        ``attention_mask[s, t] == 1``). Unused row tails get positions counting from 0, a separate segment
        that no real token can attend to, as it comes after them.
    """
    n, width = input_ids.shape
    lengths = attention_mask.sum(dim=1).tolist()
    rows = pack_rows(lengths, width)
    device = input_ids.device
    packed = torch.full((len(rows), width), pad_token_id, dtype=input_ids.dtype, device=device)
    positions = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    flat_index = torch.zeros((n, width), dtype=torch.long, device=device)
    ar = torch.arange(width, device=device)
    for r, members in enumerate(rows):
        offset = 0
        for s in members:
            length = lengths[s]
            packed[r, offset : offset + length] = input_ids[s, :length]
            positions[r, offset : offset + length] = ar[:length]
            flat_index[s] = r * width + offset + ar
            offset += length
        positions[r, offset:] = ar[: width - offset]
    return packed, positions, flat_index


def segment_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Lay the real tokens of right-padded rows ``(N, T)`` end to end in one row, with no filler, for a forward
    with :func:`~alignlab.ops.attention.segment_attention` (each sequence attends to itself only).

    Returns:
        ``(ids (1, S), position_ids (1, S), flat_index (N, T), segment_lengths)``: ``S`` is the number of real
        tokens; ``flat_index[s, t]`` is where token ``t`` of row ``s`` sits in ``ids.view(-1)`` (meaningful
        where ``attention_mask[s, t] == 1``); ``segment_lengths`` lists the non-empty rows' lengths in order.
    """
    n, width = input_ids.shape
    lengths = attention_mask.sum(dim=1)
    ar = torch.arange(width, device=input_ids.device)
    real = ar < lengths[:, None]
    ids = input_ids[real].unsqueeze(0)
    positions = ar.expand(n, width)[real].unsqueeze(0)
    flat_index = (torch.cumsum(lengths, 0) - lengths)[:, None] + ar
    return ids, positions, flat_index, [length for length in lengths.tolist() if length > 0]


def packed_forward_inputs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          pad_token_id: int):
    """Padding-free inputs for one forward of ``model`` over right-padded rows, and the context to run it in.

    With ``sdpa`` attention (:func:`~alignlab.ops.attention.supports_segments`), all real tokens go in one
    row and attention runs per sequence (:func:`segment_inputs`,
    :func:`~alignlab.ops.attention.segments_enabled`): no filler at all, and no mask. Otherwise (another
    attention implementation, or gradient checkpointing, whose recomputed forwards run after the switch is
    undone) the rows are packed first-fit into rows as wide as the batch (:func:`packed_inputs`) and
    transformers builds the block mask from ``position_ids``.

    Returns:
        ``(inputs, flat_index (N, T), context)``: keyword arguments for ``model``, where each token of each
        row lands in the flattened output, and a context manager to call ``model`` in.
    """
    inner = base_model(model)
    config = getattr(inner, "config", None)
    # checkpointed layers recompute their forward during backward, after the switch is undone: they would
    # attend across the whole row there, so they get the first-fit rows
    # (transformers renamed is_gradient_checkpointing, which now warns, to is_activation_checkpointing)
    checkpointing = (getattr(inner, "is_activation_checkpointing", None)
                     if hasattr(type(inner), "is_activation_checkpointing")
                     else getattr(inner, "is_gradient_checkpointing", False))
    if config is not None and not checkpointing and supports_segments(config, input_ids.shape[1]):
        ids, positions, flat_index, segments = segment_inputs(input_ids, attention_mask)
        inputs = {"input_ids": ids, "position_ids": positions, "attention_mask": None, "segment_lengths": segments}
        return inputs, flat_index, segments_enabled(config)
    packed, positions, flat_index = packed_inputs(input_ids, attention_mask, pad_token_id)
    inputs = {"input_ids": packed, "position_ids": positions, "attention_mask": None}
    return inputs, flat_index, contextlib.nullcontext()


def shared_prompt_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                         pad_token_id: int, attn_implementation: str | None, max_width: int | None = None):
    """Packed rows in which completions of the same prompt share one copy of it (prefix sharing).

    Rows of ``input_ids`` whose prompts (the real tokens before the completion) are identical form a group,
    laid out as ``prompt, completion_1, completion_2, ...``; groups are packed into rows (:func:`pack_rows`) as
    wide as the longest group. A 4D attention mask lets each completion token see its group's prompt and the
    earlier tokens of its own completion only, and ``position_ids`` restart at the prompt length for every
    completion, so every token gets exactly the hidden state it has in its own unpacked row; the prompt is
    computed once per group instead of once per completion (GRPO's ``num_generations`` samples of a prompt,
    a DPO pair's chosen and rejected). Gradients through the shared prompt are the sum of the members'.

    Args:
        input_ids, attention_mask, completion_mask: ``(N, T)``, right-padded; each row's completion tokens
            must be its last real tokens.
        pad_token_id: filler for unused row tails (a separate segment no real token attends to).
        attn_implementation: the model's attention implementation; the mask is boolean (True: attend) for
            ``sdpa``, additive float (0 / dtype minimum) for ``eager``.
        max_width: no layout whose rows would be wider than this (the model's sliding attention window: the
            custom mask replaces the window's, so a group longer than the window would see further back than
            the model does).

    Returns:
        ``(packed_ids (R, W), position_ids (R, W), mask (R, 1, W, W), flat_index (N, T))`` as
        :func:`packed_inputs`, ``flat_index[s, t]`` being where token ``t`` of row ``s`` sits in
        ``packed_ids.view(-1)`` (shared prompt tokens map to the one copy); ``None`` when no two rows share a
        prompt, the completions are not the rows' tails, a group is longer than ``max_width``, or the
        attention implementation takes no custom 4D mask (e.g. ``flash_attention_2``): callers then pack
        without sharing.
    """
    if attn_implementation not in ("sdpa", "eager"):
        return None
    n, width = input_ids.shape
    device = input_ids.device
    ar = torch.arange(width, device=device)
    lengths = attention_mask.sum(dim=1)
    real_completion = completion_mask.bool() & attention_mask.bool()
    n_completion = real_completion.sum(dim=1)
    prompt_len = lengths - n_completion
    tails = (ar >= prompt_len[:, None]) & (ar < lengths[:, None])
    if not bool((tails == real_completion).all()):
        return None
    ids = input_ids.tolist()
    lengths, n_completion, prompt_len = lengths.tolist(), n_completion.tolist(), prompt_len.tolist()
    groups: dict[tuple[int, ...], list[int]] = {}
    for s in range(n):
        groups.setdefault(tuple(ids[s][: prompt_len[s]]), []).append(s)
    if len(groups) == n:
        return None
    members = list(groups.values())
    group_lengths = [prompt_len[m[0]] + sum(n_completion[s] for s in m) for m in members]
    row_width = max(group_lengths)
    if max_width is not None and row_width > max_width:
        return None
    rows = pack_rows(group_lengths, row_width)
    wide = torch.arange(row_width, device=device)
    packed = torch.full((len(rows), row_width), pad_token_id, dtype=input_ids.dtype, device=device)
    positions = torch.zeros((len(rows), row_width), dtype=torch.long, device=device)
    group = torch.full((len(rows), row_width), -1, dtype=torch.long, device=device)
    member = torch.full((len(rows), row_width), -1, dtype=torch.long, device=device)  # -1: prompt / filler
    flat_index = torch.zeros((n, width), dtype=torch.long, device=device)
    for r, row_groups in enumerate(rows):
        offset = 0
        for g in row_groups:
            first, p = members[g][0], prompt_len[members[g][0]]
            prompt_at = r * row_width + offset
            packed[r, offset : offset + p] = input_ids[first, :p]
            positions[r, offset : offset + p] = wide[:p]
            group[r, offset : offset + group_lengths[g]] = g
            offset += p
            for i, s in enumerate(members[g]):
                c = n_completion[s]
                packed[r, offset : offset + c] = input_ids[s, p : p + c]
                positions[r, offset : offset + c] = wide[p : p + c]
                member[r, offset : offset + c] = i
                flat_index[s, :p] = prompt_at + wide[:p]
                flat_index[s, p : p + c] = r * row_width + offset + wide[:c]
                offset += c
        positions[r, offset:] = wide[: row_width - offset]
        group[r, offset:] = len(members) + r  # the filler: a group of its own
    causal = torch.ones((row_width, row_width), dtype=torch.bool, device=device).tril()
    mask = (causal & (group[:, :, None] == group[:, None, :])
            & ((member[:, None, :] == -1) | (member[:, :, None] == member[:, None, :]))).unsqueeze(1)
    if attn_implementation == "eager":
        mask = torch.zeros(mask.shape, device=device).masked_fill_(~mask, torch.finfo(torch.float32).min)
    return packed, positions, mask, flat_index


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True if every row of a ``(B, T)`` attention mask is its real tokens followed by padding."""
    lengths = attention_mask.sum(dim=1, keepdim=True)
    return bool((attention_mask.bool() == (torch.arange(attention_mask.shape[1], device=attention_mask.device) < lengths)).all())


def selected_logits(model: torch.nn.Module, inputs: dict, selected: torch.Tensor,
                    context: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """``(1, N, V)`` logits of one forward ``model(**inputs)`` at the ``N`` flat positions ``selected`` (indices into
    the forward's ``(rows * width)`` positions), in that order.

    Only those positions go through the output projection: a forward pre-hook on the model's output embeddings
    (its ``lm_head``) keeps their hidden states alone, so positions that are not scored (prompts, padding) cost
    no vocabulary-sized work. A model without output embeddings computes all logits and the rows are picked
    after. ``context`` (default none) is entered around the forward.

    Args:
        model: a causal LM (possibly wrapped by peft or DDP) whose forward returns ``.logits``.
        inputs: keyword arguments of the forward (``use_cache=False`` is added).
        selected: ``(N,)`` long flat positions.
    """
    context = context if context is not None else contextlib.nullcontext()
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        with context:
            full = model(**inputs, use_cache=False).logits
        return full.reshape(-1, full.shape[-1])[selected].unsqueeze(0)

    def keep_selected(module, args):
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1])[selected].unsqueeze(0),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(keep_selected)
    try:
        with context:
            return model(**inputs, use_cache=False).logits
    finally:
        handle.remove()


def target_token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities and greedy hits of the target tokens of a batch, in one forward pass (SFT's).

    Token ``t`` (``t >= 1``) is a target where ``loss_mask[:, t]`` and ``attention_mask[:, t]`` are 1; it is
    predicted from the logits at position ``t - 1``. Only those positions go through the output projection
    (:func:`selected_logits`), so prompts and padding cost no vocabulary-sized work.

    Args:
        model: a causal LM (possibly wrapped by peft or DDP) whose forward returns ``.logits``.
        input_ids, attention_mask, loss_mask: ``(B, T)`` long tensors, right-padded.
        position_ids: ``(B, T)`` for packed rows (positions restart at each example); the forward then gets no
            2-D attention mask and transformers separates the examples from the positions.
        with_entropy: also the ``(N,)`` entropies (nats, detached) of the distributions the targets are predicted
            from, from the same logits (:func:`entropy_from_logits`; TRL SFT's ``entropy`` metric).

    Returns:
        ``(token_logps, correct)``: ``(N,)`` float32 log-probabilities (nats) of the ``N`` target tokens of the
        batch, in row-major order, and ``(N,)`` bools, True where the argmax of the logits is the target (TRL's
        ``mean_token_accuracy`` numerator); with ``with_entropy`` a third item, the entropies.
    """
    width = input_ids.shape[1]
    targets = loss_mask[:, 1:].bool() & attention_mask[:, 1:].bool()  # (B, T-1): token t+1 is a target
    seq_idx, tok_idx = targets.nonzero(as_tuple=True)
    labels = input_ids[:, 1:][seq_idx, tok_idx]  # (N,)
    selected = seq_idx * width + tok_idx  # flat index of the predicting position
    if position_ids is not None:
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": None}
    else:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    logits = selected_logits(model, inputs, selected)  # (1, N, V)
    token_logps = selective_log_softmax(logits, labels.unsqueeze(0)).squeeze(0)  # (N,)
    correct = logits.detach().squeeze(0).argmax(dim=-1) == labels
    if with_entropy:
        return token_logps, correct, entropy_from_logits(logits).squeeze(0)
    return token_logps, correct


TOKEN_STATS = ("entropy", "mean_logits")
"""Per-token statistics :func:`completion_logps` computes from the same pass when asked (``token_stats``): the
entropy of ``softmax(logits / temperature)`` and the mean of ``logits / temperature`` over the vocabulary (TRL's
``entropy`` and ``mean_logits``)."""


def _plain_head_logps(model, inputs, context, selected, labels, temperature, token_stats: tuple[str, ...] = (),
                      entropy_grad: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(N,)`` :func:`completion_logps` token log-probs through the model's logits of the ``selected``
    positions (:func:`selected_logits`), and ``{stat: (N,)}`` for each of ``token_stats`` (detached, but the
    entropy with ``entropy_grad``)."""
    logits = selected_logits(model, inputs, selected, context)  # (1, N, V): completion positions only
    stats = {}
    if "entropy" in token_stats and entropy_grad:
        z = logits.float() / temperature
        stats["entropy"] = (torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)).squeeze(0)
    elif "entropy" in token_stats:
        stats["entropy"] = entropy_from_logits(logits, temperature).squeeze(0)
    if "mean_logits" in token_stats:
        stats["mean_logits"] = logits.detach().mean(-1, dtype=torch.float32).squeeze(0) / temperature
    return selective_log_softmax(logits, labels.unsqueeze(0), temperature).squeeze(0), stats


_LOGITS_CHANGED: set[type] = set()
"""Model classes seen returning something other than their output head's output as the logits: they get the
plain path (:func:`completion_logps`)."""


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    padding_free: bool = False,
    pad_token_id: int = 0,
    temperature: float = 1.0,
    share_prompts: bool = True,
    token_stats: tuple[str, ...] = (),
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token and summed log-probabilities of the completion tokens, in one forward pass.

    Args:
        model: a causal LM (possibly wrapped by peft or DDP) whose forward returns ``.logits``.
        input_ids: ``(B, T)`` prompt+completion token ids, right-padded.
        attention_mask: ``(B, T)`` 1 for real tokens.
        completion_mask: ``(B, T)`` 1 for completion tokens (the tokens being scored).
        padding_free: pack the real tokens of all rows (:func:`packed_forward_inputs`: one row with
            per-sequence attention under ``sdpa``, else first-fit decreasing rows) and run one forward over
            them with restarting ``position_ids``, so no compute goes to padding.
            Ignored (padded rows are used) for model types not in :data:`PACKING_MODEL_TYPES`.
        pad_token_id: filler for unused packed slots.
        temperature: divide the logits by this (> 0) before the log-softmax: the log-probs of the sampling
            distribution ``softmax(logits / temperature)`` (TRL PPO / GRPO; 1 for DPO and SFT).
        share_prompts: with ``padding_free``, rows with the same prompt share one copy of it
            (:func:`shared_prompt_inputs`; the same log-probs, fewer tokens through the model); falls back to
            plain packing where that does not apply.
        token_stats: names in :data:`TOKEN_STATS` to compute per completion token from the same pass (the
            chunked head's running statistics, or the selected logits): ``entropy``, ``mean_logits``.
        entropy_grad: the ``entropy`` statistic keeps its gradient (an entropy bonus in the loss), the others
            stay detached; the forward then takes the selected positions' logits (:func:`selected_logits`, a
            ``(completion tokens x vocabulary)`` tensor) instead of the chunked head.

    Returns:
        ``(per_token_logps, logps)``: ``(B, T-1)`` float32 log-probability of token ``t+1`` given tokens
        ``<= t``, zero outside the completion; and ``(B,)`` their sum over the completion (nats). The sum is
        the sequence log-probability of DPO (Rafailov et al. 2023, eq. 7): EOS included when it is part of
        the completion. With ``token_stats`` a third item, ``{stat: (B, T-1)}`` float32 at the same positions,
        zero outside the completion, detached (metrics): ``entropy`` (nats) of ``softmax(logits / temperature)``
        and ``mean_logits``, the mean of ``logits / temperature`` over the vocabulary (TRL's ``entropy`` and
        ``mean_logits``).

    Raises:
        ValueError: a name in ``token_stats`` outside :data:`TOKEN_STATS`.

    Only the positions that predict a completion token go through the output projection, so the prompt costs
    no vocabulary-sized work; and where the output head is a plain linear layer whose output the model returns
    unchanged (:func:`~alignlab.ops.lm_head.plain_head_reason`), no ``(tokens x vocabulary)`` logits tensor is
    made at all: for the length of the forward the head computes the log-probs from the hidden states and its
    weight block by block (:func:`~alignlab.ops.lm_head.chunked_head`, same values and gradients). Otherwise
    :func:`selected_logits` gives the logits of those positions alone and they go through
    :func:`selective_log_softmax`.
    """
    unknown = set(token_stats) - set(TOKEN_STATS)
    if unknown:
        raise ValueError(f"unknown token_stats {sorted(unknown)}; choose from {', '.join(TOKEN_STATS)}")
    n, width = input_ids.shape
    context = contextlib.nullcontext()
    shift_mask = completion_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    seq_idx, tok_idx = shift_mask.nonzero(as_tuple=True)
    labels = input_ids[:, 1:][seq_idx, tok_idx]
    pack = padding_free and supports_packing(model)
    shared = None
    if pack and share_prompts:
        config = base_model(model).config
        shared = shared_prompt_inputs(input_ids, attention_mask, completion_mask, pad_token_id,
                                      getattr(config, "_attn_implementation", None),
                                      max_width=getattr(config, "sliding_window", None))
    if shared is not None:
        packed, positions, mask, flat_index = shared
        inputs = {"input_ids": packed, "position_ids": positions, "attention_mask": mask}
        selected = flat_index[seq_idx, tok_idx]
    elif pack:
        inputs, flat_index, context = packed_forward_inputs(model, input_ids, attention_mask, pad_token_id)
        selected = flat_index[seq_idx, tok_idx]
    else:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        selected = seq_idx * width + tok_idx

    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    # an entropy with gradient comes from the selected logits (the chunked head's statistics are metrics)
    chunked = not (entropy_grad and "entropy" in token_stats)
    if chunked and plain_head_reason(model, head) is None and type(base_model(model)) not in _LOGITS_CHANGED:
        asked = [name for name in TOKEN_STATS if name in token_stats]  # the head's column order
        with chunked_head(head, selected, labels, temperature=temperature, with_entropy="entropy" in asked,
                          with_mean_logits="mean_logits" in asked) as outputs, context:
            out = model(**inputs, use_cache=False).logits  # (1, N, 1 + stats): the log-probs (stats), from the head
        if outputs and out is outputs[-1]:
            token_logps = out[0, :, 0]
            stats = {name: out[0, :, 1 + k].detach() for k, name in enumerate(asked)}
        else:  # the model changed the head's output on its way out: it needs the logits themselves
            _LOGITS_CHANGED.add(type(base_model(model)))
            if pack and shared is None:  # a fresh context for the second forward
                context = packed_forward_inputs(model, input_ids, attention_mask, pad_token_id)[2]
            token_logps, stats = _plain_head_logps(model, inputs, context, selected, labels, temperature, token_stats,
                                                   entropy_grad)
    else:
        token_logps, stats = _plain_head_logps(model, inputs, context, selected, labels, temperature, token_stats,
                                                   entropy_grad)
    per_token = torch.zeros((n, width - 1), dtype=token_logps.dtype, device=token_logps.device)
    per_token = per_token.index_put((seq_idx, tok_idx), token_logps)
    if not token_stats:
        return per_token, per_token.sum(dim=1)
    laid_out = {name: torch.zeros((n, width - 1), dtype=v.dtype, device=v.device).index_put((seq_idx, tok_idx), v)
                for name, v in stats.items()}
    return per_token, per_token.sum(dim=1), laid_out

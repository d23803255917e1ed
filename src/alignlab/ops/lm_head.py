"""Log-probabilities of label tokens straight from the hidden states and the output head's weight, in chunks, so
that no ``(tokens x vocabulary)`` logits tensor is ever allocated or kept for backward.

Why: the logits are the largest tensor of a training step on long sequences with a large vocabulary. 3,000
completion tokens over Qwen2.5's 151,936-token vocabulary are 1.8 GB of float32 logits, kept by autograd for
the backward of the output head's matmul, plus a gradient of the same size during the backward (huggingface/trl
#3678 and #3168 report this as the first cause of running out of memory). :func:`head_label_logps` multiplies
the hidden states by the head's weight one block of vocabulary rows at a time inside one
:class:`torch.autograd.Function`, reduces each block to running per-token statistics (log-sum-exp, the
label's logit, and optionally the entropy), and in backward recomputes each block's logits to form its share of
the gradients for the hidden states, the weight and the bias: the memory of the logits becomes one block
(:data:`HEAD_CHUNK_ELEMENTS` entries) instead of ``tokens x V``, for one more matmul of the head's size in
backward. The same idea as Liger-Kernel's fused linear cross-entropy (``liger_kernel/ops/fused_linear_cross_entropy.py``)
and Cut Cross-Entropy (Wijmans et al. 2024, arXiv 2411.09009), but with an arbitrary gradient per token (DPO,
GRPO and PPO weight each token's log-prob differently), so the gradients cannot be formed in the forward pass.

:func:`chunked_head` applies it to a causal LM for the length of a ``with`` block: the output head's forward
is swapped for one that returns the per-token log-probs (``(1, N, 1)``, or ``(1, N, 2)`` with the entropy)
in place of the logits. Calling it from inside the head's own forward keeps everything around it as usual:
under FSDP2 the head's weight is the gathered one and the sharding hooks see an ordinary module call, tied
embeddings receive the head's gradient in the same parameter, and LoRA adapters on other layers are untouched.
:func:`plain_head_reason` says when the model's logits cannot be reproduced that way (a peft-wrapped head,
logit soft-capping, a logit scale); callers then keep the plain path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

HEAD_CHUNK_ELEMENTS = 1 << 22
"""Logits entries (4M: a 16 MB float32 block) computed at a time by :func:`head_label_logps`."""

MIN_CHUNK_COLUMNS = 256
"""Fewest vocabulary entries per block; beyond ``HEAD_CHUNK_ELEMENTS // MIN_CHUNK_COLUMNS`` tokens the tokens
are split into blocks too."""

_AUTOCAST_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` multiplies in here: autocast's where it is on for the device and
    both are float16 / bfloat16 / float32 (``linear`` is on autocast's lower-precision list on CPU and CUDA),
    else the two dtypes promoted."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and hidden.dtype in _AUTOCAST_FLOATS and weight.dtype in _AUTOCAST_FLOATS:
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _tiles(rows: int, vocab: int, budget: int) -> tuple[int, int]:
    """``(rows per block, vocabulary entries per block)`` for blocks of at most ``budget`` logits entries."""
    block_rows = max(1, min(rows, budget // min(vocab, MIN_CHUNK_COLUMNS)))
    return block_rows, max(1, min(vocab, budget // block_rows))


class _HeadLabelLogProbs(torch.autograd.Function):
    """``log_softmax(scale * (hidden @ weight.T + bias))[label]`` (and the entropy of that distribution) by blocks
    of vocabulary entries, with a hand-written backward that recomputes each block's logits.

    Forward, per block of tokens: for each block of ``C`` vocabulary rows, ``z = scale * (hidden @
    weight[v:v+C].T + bias)`` (the matmul in the compute dtype, autocast's as ``F.linear`` there; ``z`` in
    float32, float64 for float64 inputs), reduced to running per-token statistics as in the online softmax
    (Milakov & Gimelshein 2018, arXiv 1805.02867): the maximum ``m``, ``s = sum_j exp(z_j - m)`` and, with the
    entropy, ``t = sum_j exp(z_j - m) z_j``, both rescaled by ``exp(m_old - m_new)`` as ``m`` grows; and the
    label's ``z`` where the label falls in the block. Then ``lse = m + log s``, ``logp = z[label] - lse`` and
    ``H = lse - t / s`` (``H = -sum_j p_j log p_j`` with ``log p_j = z_j - lse``). With ``with_mean``, also the
    mean of ``z`` over the vocabulary, ``sum_j z_j / V`` (summed block by block; no gradient: TRL's
    ``mean_logits``, the ``logits/chosen`` and ``logits/rejected`` metrics of its DPO trainer).

    Backward: ``d logp / d z_j = onehot_j - p_j`` and ``d H / d z_j = -p_j (z_j - E[z])`` with ``E[z] = t / s``,
    so for upstream gradients ``g`` (log-probs) and ``e`` (entropy) ``dz_j = g onehot_j - p_j (g + e (z_j -
    E[z]))``. Then ``dlogits = scale dz`` (cast to the compute dtype, the dtype of the plain path's logits
    gradient), ``grad_hidden += dlogits @ weight[v:v+C]``, ``grad_weight[v:v+C] += dlogits.T @ hidden``,
    ``grad_bias[v:v+C] += dlogits.sum(0)``, accumulated in float32. Saved for backward: the hidden states, the
    weight, the bias, the labels, and one or two floats per token (``lse``, ``E[z]``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, scale, with_entropy, budget, with_mean=False):
        compute = _compute_dtype(hidden, weight)
        acc = torch.promote_types(compute, torch.float32)
        rows, vocab = hidden.shape[0], weight.shape[0]
        block_rows, cols = _tiles(rows, vocab, budget)
        device = hidden.device
        logp = torch.empty(rows, dtype=acc, device=device)
        lse_all = torch.empty(rows, dtype=acc, device=device)
        mean_z = torch.empty(rows, dtype=acc, device=device) if with_entropy else None
        mean_logits = torch.zeros(rows, dtype=acc, device=device) if with_mean else None
        with torch.autocast(device_type=device.type, enabled=False):
            for r0 in range(0, rows, block_rows):
                r1 = min(rows, r0 + block_rows)
                h, label = hidden[r0:r1].to(compute), labels[r0:r1]
                m = torch.full((r1 - r0,), float("-inf"), dtype=acc, device=device)
                s = torch.zeros(r1 - r0, dtype=acc, device=device)
                t = torch.zeros(r1 - r0, dtype=acc, device=device) if with_entropy else None
                target = torch.zeros(r1 - r0, dtype=acc, device=device)
                for v0 in range(0, vocab, cols):
                    z = _block_logits(h, weight, bias, v0, v0 + cols, compute, acc, scale)
                    if with_mean:
                        mean_logits[r0:r1] += z.sum(dim=1)
                    inside = (label >= v0) & (label < v0 + z.shape[1])
                    picked = z.gather(1, (label - v0).clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
                    target = torch.where(inside, picked, target)
                    new_m = torch.maximum(m, z.amax(dim=1))
                    rescale = torch.exp(m - new_m)
                    if with_entropy:
                        e = torch.sub(z, new_m[:, None]).exp_()
                        t.mul_(rescale).add_(torch.linalg.vecdot(e, z))
                    else:
                        e = z.sub_(new_m[:, None]).exp_()
                    s.mul_(rescale).add_(e.sum(dim=1))
                    m = new_m
                if with_entropy:
                    mean_z[r0:r1] = t / s
                lse = s.log_().add_(m)
                logp[r0:r1] = target - lse
                lse_all[r0:r1] = lse
        ctx.save_for_backward(hidden, weight, bias, labels, lse_all, mean_z)
        ctx.scale, ctx.compute, ctx.budget = scale, compute, budget
        ctx.set_materialize_grads(False)
        ctx.with_entropy = with_entropy
        outputs = [logp] + ([lse_all - mean_z] if with_entropy else [])
        if with_mean:
            mean_logits /= vocab
            ctx.mark_non_differentiable(mean_logits)
            outputs.append(mean_logits)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    @staticmethod
    def backward(ctx, grad_logp, *grad_rest):
        grad_entropy = grad_rest[0] if ctx.with_entropy else None
        hidden, weight, bias, labels, lse_all, mean_z = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None or not (need_hidden or need_weight or need_bias):
            return None, None, None, None, None, None, None, None
        scale, compute, acc = ctx.scale, ctx.compute, lse_all.dtype
        fused = compute == acc  # float32 (float64) throughout: the scale rides on the matmuls
        rows, vocab = hidden.shape[0], weight.shape[0]
        block_rows, cols = _tiles(rows, vocab, ctx.budget)
        device = hidden.device
        g_all = grad_logp.to(acc) if grad_logp is not None else torch.zeros_like(lse_all)
        grad_hidden = torch.empty(hidden.shape, dtype=acc, device=device) if need_hidden else None
        grad_weight = torch.empty(weight.shape, dtype=acc, device=device) if need_weight else None
        grad_bias = torch.empty(vocab, dtype=acc, device=device) if need_bias else None
        with torch.autocast(device_type=device.type, enabled=False):
            for r0 in range(0, rows, block_rows):
                r1 = min(rows, r0 + block_rows)
                h, label = hidden[r0:r1].to(compute), labels[r0:r1]
                g, lse = g_all[r0:r1, None], lse_all[r0:r1, None]
                for v0 in range(0, vocab, cols):
                    v1 = min(vocab, v0 + cols)
                    z = _block_logits(h, weight, bias, v0, v1, compute, acc, scale)
                    if grad_entropy is not None:  # dz = g onehot + p ((E[z] - z) e - g)
                        coef = torch.sub(mean_z[r0:r1, None], z).mul_(grad_entropy[r0:r1, None].to(acc)).sub_(g)
                        dz = z.sub_(lse).exp_().mul_(coef)
                    else:  # dz = g onehot - g p
                        dz = z.sub_(lse).exp_().mul_(-g)
                    inside = ((label >= v0) & (label < v1)).nonzero().squeeze(1)
                    dz.index_put_((inside, label[inside] - v0), g[inside, 0], accumulate=True)
                    if not fused:
                        dz = dz.mul_(scale).to(compute)
                    w = weight[v0:v1].to(compute)
                    alpha = scale if fused else 1.0
                    if need_hidden:
                        _accumulate(grad_hidden[r0:r1], v0 == 0, dz, w, alpha)
                    if need_weight:
                        _accumulate(grad_weight[v0:v1], r0 == 0, dz.T, h, alpha)
                    if need_bias:
                        part = dz.sum(0).to(acc).mul_(alpha)
                        grad_bias[v0:v1] = part if r0 == 0 else grad_bias[v0:v1] + part
        return (
            grad_hidden.to(hidden.dtype) if need_hidden else None,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
            None, None, None, None, None,
        )


def _block_logits(h, weight, bias, v0, v1, compute, acc, scale) -> torch.Tensor:
    """``scale * (h @ weight[v0:v1].T + bias[v0:v1])`` in ``acc``, the matmul in ``compute`` (a tensor of its own,
    free to be changed in place)."""
    w = weight[v0:v1].to(compute)
    b = None if bias is None else bias[v0:v1].to(compute)
    if compute == acc:  # the scale inside the matmul
        return torch.addmm(h.new_zeros(()) if b is None else b, h, w.T, beta=0.0 if b is None else scale, alpha=scale)
    z = F.linear(h, w, b).to(acc)
    return z.mul_(scale) if scale != 1.0 else z


def _accumulate(out: torch.Tensor, first: bool, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """``out = alpha * a @ b`` (``first``) or ``out += alpha * a @ b``, ``out`` in float32 (float64), ``a @ b`` in
    the dtype of ``a`` and ``b``."""
    if a.dtype == out.dtype:
        out.addmm_(a, b, beta=0.0 if first else 1.0, alpha=alpha)  # beta 0: out's old contents are ignored
    elif first:
        out.copy_(a @ b)
    else:
        out.add_(a @ b)


def head_label_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_elements: int | None = None,
    with_mean_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``log_softmax((hidden @ weight.T + bias) / temperature)`` at ``labels``, without the ``(N, V)`` logits.

    Args:
        hidden: ``(N, H)`` hidden states of the ``N`` positions to score (any float dtype).
        weight: ``(V, H)`` the output head's weight (the input embedding's, when tied).
        bias: ``(V,)`` the head's bias, or ``None``.
        labels: ``(N,)`` long token ids in ``[0, V)``.
        temperature: divide the logits by this (> 0): the log-probs of the sampling distribution
            ``softmax(logits / temperature)`` (TRL GRPO / PPO).
        with_entropy: also return the entropy of that distribution per token.
        with_mean_logits: also return each token's mean logit over the vocabulary, ``sum_j z_j / V`` of ``z =
            logits / temperature``, without gradient (TRL's ``mean_logits``).
        chunk_elements: logits entries computed at a time (default :data:`HEAD_CHUNK_ELEMENTS`).

    Returns:
        ``(N,)`` float32 log-probabilities (nats; float64 for float64 inputs), and with ``with_entropy`` also
        ``(N,)`` entropies (nats), then with ``with_mean_logits`` ``(N,)`` mean logits: a tuple when either is
        asked for. Differentiable in ``hidden``, ``weight`` and ``bias``.

    Values and gradients equal ``selective_log_softmax(F.linear(hidden, weight, bias), labels, temperature)``
    (:func:`alignlab.ops.logprobs.selective_log_softmax`; TRL's ``selective_log_softmax`` of ``logits /
    temperature``) up to float32 rounding; under autocast the matmul runs in autocast's dtype as
    ``F.linear`` would, and the log-softmax in float32. Peak extra memory: one block of ``chunk_elements``
    logits (a few copies of it), plus float32 gradient buffers the size of ``hidden`` and ``weight``. Entropy
    ``H = logsumexp(z) - sum_j softmax(z)_j z_j`` with ``z = logits / temperature`` (TRL GRPO's
    ``entropy_from_logits``).

    Raises:
        ValueError: ``temperature`` is not > 0, or the shapes do not fit together.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden (N, H), weight (V, H), labels (N,) expected, got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    budget = HEAD_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    return _HeadLabelLogProbs.apply(hidden, weight, bias, labels, 1.0 / temperature, with_entropy, budget,
                                    with_mean_logits)


def plain_head_reason(model: torch.nn.Module, head: torch.nn.Module | None) -> str | None:
    """Why :func:`chunked_head` cannot stand in for ``model``'s output head, or ``None`` when it can.

    It can when the head is a plain ``torch.nn.Linear`` (FSDP2's wrapped class included: it keeps Linear's
    forward) and the model's forward hands the head's output on as the logits unchanged. Feature-detected
    reasons not to: no output head; a head of another class or with its own forward (a peft LoRA or
    ``modules_to_save`` wrapper, a quantized layer); and the configuration or model attributes by which
    transformers' causal LMs change the logits after the head (``final_logit_softcapping``: Gemma 2/3;
    ``logit_scale``: Cohere; ``logits_scaling`` other than 1: Granite; ``unpadded_vocab_size``; a
    ``final_logits_bias``). :func:`chunked_head` also checks after each forward that the output came back as it
    left the head.
    """
    if head is None:
        return "the model has no output embeddings"
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        return f"the output head is a {type(head).__name__}, not a plain Linear layer"
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    configs = [getattr(inner, "config", None)]
    if configs[0] is not None and hasattr(configs[0], "get_text_config"):
        configs.append(configs[0].get_text_config())
    for config in configs:
        if config is None:
            continue
        if getattr(config, "final_logit_softcapping", None) is not None:
            return "the model soft-caps its logits"
        if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
            return "the model scales its logits (logit_scale)"
        if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
            return "the model scales its logits (logits_scaling)"
        if getattr(config, "unpadded_vocab_size", None) is not None:
            return "the model slices its logits to an unpadded vocabulary"
    for name in ("logit_scale", "final_logits_bias", "logit_softcap"):
        if getattr(inner, name, None) is not None:
            return f"the model changes its logits after the head ({name})"
    return None


@contextlib.contextmanager
def chunked_head(
    head: torch.nn.Linear,
    positions: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_mean_logits: bool = False,
) -> Iterator[list[torch.Tensor]]:
    """For the length of the block, ``head`` (a plain ``nn.Linear`` output head, see :func:`plain_head_reason`)
    returns per-token log-probs of ``labels`` in place of logits.

    Inside the block, a call ``head(hidden)`` with ``hidden`` ``(..., H)`` takes the rows ``positions`` of
    ``hidden.reshape(-1, H)`` and returns ``(1, N, 1)`` :func:`head_label_logps` of ``labels`` at
    ``temperature`` (``(1, N, k)``: the log-probs, then the entropies with ``with_entropy`` and the mean logits
    with ``with_mean_logits``, these two without gradient), using ``head.weight`` and
    ``head.bias`` as they are at that moment (under FSDP2: the gathered weight). Each output is also appended to
    the yielded list, so that the caller can check the model returned it unchanged. The head's previous
    instance-level forward (e.g. one installed by :mod:`alignlab.ops.linear`) is restored on exit.

    Args:
        head: the output head.
        positions: ``(N,)`` long flat indices of the positions to score.
        labels: ``(N,)`` long token ids they predict.
        temperature, with_entropy, with_mean_logits: as :func:`head_label_logps`.
    """
    outputs: list[torch.Tensor] = []
    had_own = "forward" in head.__dict__
    previous = head.__dict__.get("forward")

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1])[positions]
        result = head_label_logps(rows, head.weight, head.bias, labels, temperature=temperature,
                                  with_entropy=with_entropy, with_mean_logits=with_mean_logits)
        if not isinstance(result, tuple):
            result = (result,)
        # the statistics detached: metrics, so the backward gets no (zero) gradient for them to fold in
        out = torch.stack((result[0], *(r.detach() for r in result[1:])), dim=-1).unsqueeze(0)
        outputs.append(out)
        return out

    head.forward = forward
    try:
        yield outputs
    finally:
        if had_own:
            head.forward = previous
        else:
            del head.forward

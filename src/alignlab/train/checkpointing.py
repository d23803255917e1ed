"""``--gradient_checkpointing auto`` (the default): decide from the model, the data and the memory available
whether to recompute activations in the backward pass.

The estimate is Korthikanti et al. 2022 (arXiv 2205.05198) eq. 1, the activations one transformer layer keeps for
its backward, adapted to today's decoder layers (RMS norms, grouped-query attention, a gated MLP, no dropout):
per token and layer

* the two norms' inputs: ``2 h``;
* attention: the projections' input ``h``, the queries ``h``, the keys and values ``2 h_kv`` (``h_kv`` = key-value
  heads x head size), the output projection's input ``h``; with eager attention also the softmax's output,
  ``a s`` per token (``a`` heads, ``s`` the row's width) -- SDPA and flash attention keep no score matrix;
* the gated MLP: its input ``h`` and four tensors of the intermediate size ``i`` (the gate and up projections'
  outputs, the activation's output and the product that enters the down projection): ``h + 4 i``.

That is ``(6 h + 2 h_kv + 4 i + [a s]) x bytes`` per token and layer, bytes being 2 under bf16 autocast and the
parameters' size otherwise (4 in float32). Korthikanti's ``34 s b h`` counts 2-byte values and 1-byte dropout
masks of a GPT layer with a ``4 h`` MLP; without the masks the same count gives ``16 h``
values, and ours gives
``6 h + 2 h + 16 h = 24 h`` for a gated MLP of ``4 h`` with full multi-head attention.
Calibration (docs/memory.md): on the embedded model (4 rows of 256 tokens, float32, SDPA) the estimate is
1,170 MiB; checkpointing measurably saved 964 MiB of peak resident memory (the estimate less the layer inputs it
keeps and one layer's recomputation: 1,061 MiB), so the estimate errs ~10% on the side of memory.

Checkpointing goes on when the estimate for the largest micro-batch exceeds :data:`SHARE` of the memory available
(the host's available RAM on CPU, ``psutil``; the device's free memory on GPU, ``torch.cuda.mem_get_info``), and
the decision is logged in one line with its numbers. The largest micro-batch comes from the data: offline, the
``per_device_train_batch_size`` examples with the most tokens, collated as the loop collates them; online, the
longest prompt plus the completion cap, for every completion of a micro-batch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

SHARE = 0.5
"""Checkpointing goes on when the estimated activations of the largest micro-batch exceed this share of the memory
available (the rest is left to the weights, the optimizer state, the reference model and the allocator)."""

COMPLETION_CAPS = ("max_completion_length", "response_length", "max_new_tokens")
"""The online configs' completion caps, in the order they are looked for (GRPO / RLOO / ReMax / REINFORCE++;
PPO; Online DPO)."""


def trained_models(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost transformers models inside ``model`` (the model itself, the base model under peft or DDP,
    PPO's policy and value model inside their wrapper)."""
    from transformers import PreTrainedModel

    found: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, PreTrainedModel):
            continue
        found.append(module)
        inside.update(id(m) for m in module.modules())
    return found


def layer_activation_values(config: Any, width: int, eager: bool) -> int:
    """Values one decoder layer keeps for its backward per token (module docstring): ``6 h + 2 h_kv + 4 i``,
    plus ``a x width`` attention probabilities when the attention is eager.

    Args:
        config: a transformers model config (``hidden_size``, ``num_attention_heads``, optional
            ``num_key_value_heads``, ``head_dim``, ``intermediate_size``; ``4 h`` when it has none).
        width: the row's width in tokens (only for the eager score term).
        eager: whether the attention materialises its ``heads x width x width`` probabilities.
    """
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    inter = getattr(config, "intermediate_size", None) or 4 * h
    values = 6 * h + 2 * kv + 4 * inter
    return values + (heads * width if eager else 0)


def activation_bytes(model: torch.nn.Module, rows: int, width: int, tokens: int | None = None, *,
                     bf16: bool = False) -> int:
    """Estimated activation memory in bytes of one training forward of ``model`` over a micro-batch of ``rows``
    rows of ``width`` tokens (``tokens`` real tokens, default ``rows x width``): the layers' kept activations
    (:func:`layer_activation_values`), summed over every transformers model inside ``model``. Not counted: the
    logits (``ops/lm_head.py`` does not make them), the weights, gradients and optimizer state.

    Args:
        bf16: bf16 autocast (2 bytes per value); otherwise the parameters' element size.
    """
    tokens = rows * width if tokens is None else tokens
    total = 0
    for inner in trained_models(model) or [model]:
        config = inner.config
        config = getattr(config, "get_text_config", lambda: config)()
        eager = getattr(inner.config, "_attn_implementation", "eager") == "eager"
        size = 2 if bf16 else next(inner.parameters()).element_size()
        total += config.num_hidden_layers * tokens * layer_activation_values(config, width, eager) * size
    return total


def available_bytes(device: torch.device) -> int:
    """Memory a training step may use: the CUDA device's free memory, or the host's available RAM (psutil)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def largest_micro_batch(config: Any, dataset, collate_fn, *, online: bool) -> tuple[int, int, int]:
    """``(rows, width, tokens)`` of the largest training micro-batch.

    Offline: each example is collated alone to count its tokens (``attention_mask``), then the
    ``per_device_train_batch_size`` longest are collated together (padded or packed as in training). Online: every
    completion of a micro-batch is the longest prompt (``prompt_ids``) plus the completion cap
    (:data:`COMPLETION_CAPS`); a config's ``TRAIN_ROWS_PER_PROMPT`` (Online DPO: the chosen and rejected rows)
    multiplies the rows.
    """
    batch = config.per_device_train_batch_size
    if online:
        prompt = max(len(dataset[i].get("prompt_ids", ())) for i in range(len(dataset)))
        cap = next((getattr(config, name) for name in COMPLETION_CAPS if getattr(config, name, None)), 0)
        rows = batch * getattr(config, "TRAIN_ROWS_PER_PROMPT", 1)
        return rows, prompt + cap, rows * (prompt + cap)
    lengths = [int(collate_fn([dataset[i]])["attention_mask"].sum()) for i in range(len(dataset))]
    longest = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)[:batch]
    collated = collate_fn([dataset[i] for i in longest])
    rows, width = collated["input_ids"].shape[:2]
    return int(rows), int(width), int(collated["attention_mask"].sum())


def decide(model: torch.nn.Module, rows: int, width: int, tokens: int, *, bf16: bool, device: torch.device,
           available: int | None = None) -> bool:
    """Whether ``--gradient_checkpointing auto`` turns checkpointing on for this micro-batch: the estimated
    activations (:func:`activation_bytes`) exceed :data:`SHARE` of ``available`` (default
    :func:`available_bytes`). Logs the decision and its numbers in one line."""
    estimate = activation_bytes(model, rows, width, tokens, bf16=bf16)
    available = available_bytes(device) if available is None else available
    on = estimate > SHARE * available
    where = "free on the GPU" if device.type == "cuda" else "host RAM available"
    logger.info("gradient_checkpointing auto: %s (activations of the largest micro-batch, %d rows x %d tokens: "
                "%.2f GiB estimated, %.0f%% of %.2f GiB %s; on above %.0f%%)", "on" if on else "off", rows, width,
                estimate / 2**30, 100 * estimate / max(available, 1), available / 2**30, where, 100 * SHARE)
    return on


def enable(model: torch.nn.Module, config: Any) -> None:
    """Turn on gradient checkpointing in ``model`` (a transformers or peft model; or else every transformers model
    inside it) with the config's
    ``gradient_checkpointing_kwargs`` (default ``use_reentrant=False``)."""
    kwargs = getattr(config, "gradient_checkpointing_kwargs", None) or {"use_reentrant": False}
    targets = [model] if hasattr(model, "gradient_checkpointing_enable") else trained_models(model)
    for inner in targets:  # a peft model's own method readies the adapters' inputs for reentrant checkpointing
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def resolve_auto(runtime, model: torch.nn.Module, dataset, collate_fn, *, online: bool) -> bool:
    """``--gradient_checkpointing auto`` before training starts: decide (:func:`decide`, the smallest
    memory over the processes) and turn it on in ``model`` when the decision is on. Returns the decision; does
    nothing (returns the setting) when the config's value is not auto or ``activation_checkpointing`` is set."""
    config = runtime.config
    if getattr(config, "gradient_checkpointing", False) is not None or getattr(config, "activation_checkpointing", None):
        return bool(getattr(config, "gradient_checkpointing", False))
    rows, width, tokens = largest_micro_batch(config, dataset, collate_fn, online=online)
    available = available_bytes(runtime.device)
    if runtime.num_processes > 1:  # every process decides the same way
        available = int(runtime.gather(torch.tensor([available], device=runtime.device)).min())
    on = decide(model, rows, width, tokens, bf16=bool(runtime.bf16), device=runtime.device, available=available)
    if on:
        enable(model, config)
    return on

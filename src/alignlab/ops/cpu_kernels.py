"""The CPU speed layer behind one switch, ``--cpu_kernels auto|reuse_memory|off``.

Three measures made CPU training and sampling faster on the machines measured (benchmarks/README.md); this
module owns all three, and nothing outside it (and the runtime, :mod:`alignlab.train.runtime`, which enters
:func:`training` for the training loop and calls the step hooks) knows about them:

* oneDNN linear layers (:mod:`alignlab.ops.linear`): float32 training and scoring forwards on oneDNN's matmul,
  and decoding from weights reordered once per ``generate`` call;
* host-memory reuse (:mod:`alignlab.ops.memory`): glibc keeps freed memory mapped for the next step instead of
  faulting it in again;
* transparent huge pages for large tensors (PyTorch's ``THP_MEM_ALLOC_ENABLE``), which must be requested
  before PyTorch's first allocation: the ``alignlab`` command calls :func:`prepare_process` first thing.

``auto`` (the default) turns on the oneDNN layers where they apply (float32 CPU layers), bounds oneDNN's caches,
and leaves memory to glibc, with ``malloc_trim`` after the backward, after each optimizer step and after each
``generate`` call. ``reuse_memory`` adds heap reuse and huge pages: a few
percent faster per online step on the machines measured, but the heap fragments when tensor sizes change
from batch to batch, and a long DPO run's resident memory grows (soak table in benchmarks/README.md); huge
pages without reuse were slower, so they come only with it. ``off`` runs plain PyTorch and glibc's memory
policy. Every piece is feature-detected and falls back to plain PyTorch. The setting is process-wide: the last
:func:`configure` wins.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch

from alignlab.ops import memory
from alignlab.ops.linear import onednn_float32_linear, reordered_linear_weights

CHOICES = ("auto", "reuse_memory", "off")
"""Values of ``--cpu_kernels``."""

PRIMITIVE_CACHE_ENVS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
"""The sizes of oneDNN's primitive cache and of ideep's (PyTorch's oneDNN layer) computation cache."""
PRIMITIVE_CACHE_CAPACITY = 16
"""Entries kept in each of those caches per process (their default: 1024). A training forward's matrix products
get new entries whenever the number of tokens changes, which is every step, and are never used again after
it; with 1024 kept, a DPO run's resident memory rose for hundreds of steps (soak table in
benchmarks/README.md), with 16 it did not. A step or a ``generate`` call uses about ten shapes, which stay
cached while it runs."""

_enabled = True


def configure(setting: str) -> bool:
    """Turn the speed layer on (``"auto"``, or ``"reuse_memory"`` with heap reuse) or off (``"off"``) for this
    process; returns whether it is on.

    Raises:
        ValueError: a setting other than :data:`CHOICES`.
    """
    global _enabled
    if setting not in CHOICES:
        raise ValueError(f"cpu_kernels must be one of {', '.join(CHOICES)}, got {setting!r}")
    _enabled = setting != "off"
    memory.configure_host_memory(setting == "reuse_memory")
    return _enabled


def enabled() -> bool:
    """Whether the speed layer is on in this process."""
    return _enabled


def prepare_process(argv: Sequence[str]) -> None:
    """First thing in the ``alignlab`` command, before PyTorch allocates: unless ``--cpu_kernels off`` is on the
    command line, bound oneDNN's caches (:data:`PRIMITIVE_CACHE_CAPACITY`, unless the variables are already
    set); with ``reuse_memory``, ask for huge pages (unless ``THP_MEM_ALLOC_ENABLE`` is already set) and keep
    freed memory for reuse from the start. Then apply the setting given (default ``auto``)."""
    args = list(argv)
    setting = "auto"
    for i, a in enumerate(args):
        if a.startswith("--cpu_kernels="):
            setting = a.split("=", 1)[1]
        elif a == "--cpu_kernels" and i + 1 < len(args):
            setting = args[i + 1]
    if setting not in CHOICES:
        return  # the command's own parsing reports it
    if setting != "off":
        for name in PRIMITIVE_CACHE_ENVS:  # read at oneDNN's first use
            os.environ.setdefault(name, str(PRIMITIVE_CACHE_CAPACITY))
    if setting == "reuse_memory":
        memory.request_huge_pages()
    configure(setting)


@contextlib.contextmanager
def training(setting: str) -> Iterator[bool]:
    """The speed layer for one training run: :func:`configure` with ``setting``, and float32 CPU linear layers
    on oneDNN for the length of the block. Yields whether the layer is on."""
    on = configure(setting)
    with onednn_float32_linear() if on else contextlib.nullcontext():
        yield on


@contextlib.contextmanager
def decoding(model: torch.nn.Module, rows: int) -> Iterator[None]:
    """A context for a ``generate`` call of ``model`` over about ``rows`` sequences: its CPU linear layers
    decode from oneDNN-reordered weights when the layer is on, unchanged otherwise, and unchanged for a model
    sharded with FSDP2 (its gathered weights plus a reordered copy would hold two full copies of the policy on
    every process while sampling, which sharding exists to avoid). On exit the reordered copies (one more copy
    of the policy's linear weights, held in glibc's heap) are handed back to the OS unless memory is kept for
    reuse, so the training pass that follows does not run on top of them."""
    from alignlab.train.distributed import is_sharded

    if not _enabled or is_sharded(model):
        yield
        return
    try:
        with reordered_linear_weights(model, rows):
            yield
    finally:
        memory.release_free_memory()


def after_backward(device: torch.device) -> None:
    """After the last backward of an optimizer step, before the step: hand the activations' freed memory back
    to the OS unless the layer keeps it for reuse, so the step's peak is not the activations plus the
    optimizer's work on top of a fragmented heap (under FSDP2 the gathered layers' and unsharded gradients'
    blocks too)."""
    if device.type == "cpu":
        memory.release_free_memory()


def after_optimizer_step(device: torch.device) -> None:
    """End of an optimizer step: hand freed memory back to the OS unless the layer keeps it for reuse."""
    if device.type == "cpu":
        memory.release_free_memory()

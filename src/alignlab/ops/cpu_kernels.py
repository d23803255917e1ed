"""The CPU speed layer behind one switch, ``--cpu_kernels auto|off``.

Three measures made CPU training and sampling faster on the machines measured (benchmarks/README.md); this
module owns all three, and nothing outside it (and the training loop, which enters :func:`training`) knows
about them:

* oneDNN linear layers (:mod:`alignlab.ops.linear`): float32 training and scoring forwards on oneDNN's matmul,
  and decoding from weights reordered once per ``generate`` call;
* host-memory reuse (:mod:`alignlab.ops.memory`): glibc keeps freed memory mapped for the next step instead of
  faulting it in again;
* transparent huge pages for large tensors (PyTorch's ``THP_MEM_ALLOC_ENABLE``), which must be requested
  before PyTorch's first allocation: the ``alignlab`` command calls :func:`prepare_process` first thing.

``auto`` (the default) turns them on, each where it applies (float32 CPU layers, glibc on Linux); every
piece is feature-detected and falls back to plain PyTorch. ``off`` runs plain PyTorch and glibc's own memory
policy. The setting is process-wide: the last :func:`configure` wins.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from alignlab.ops import memory
from alignlab.ops.linear import onednn_float32_linear, reordered_linear_weights

CHOICES = ("auto", "off")
"""Values of ``--cpu_kernels``."""

_enabled = True


def configure(setting: str) -> bool:
    """Turn the speed layer on (``"auto"``) or off (``"off"``) for this process; returns whether it is on.

    Raises:
        ValueError: a setting other than :data:`CHOICES`.
    """
    global _enabled
    if setting not in CHOICES:
        raise ValueError(f"cpu_kernels must be one of {', '.join(CHOICES)}, got {setting!r}")
    _enabled = setting == "auto"
    memory.configure_host_memory(_enabled)
    return _enabled


def enabled() -> bool:
    """Whether the speed layer is on in this process."""
    return _enabled


def prepare_process(argv: Sequence[str]) -> None:
    """First thing in the ``alignlab`` command, before PyTorch allocates: ask for huge pages unless
    ``--cpu_kernels off`` is on the command line (or ``THP_MEM_ALLOC_ENABLE`` is already set), and keep freed
    memory for reuse until a command applies its own setting."""
    args = list(argv)
    off = any(a == "--cpu_kernels=off" or (a == "--cpu_kernels" and args[i + 1:i + 2] == ["off"])
              for i, a in enumerate(args))
    if not off:
        memory.request_huge_pages()
    configure("off" if off else "auto")


@contextlib.contextmanager
def training(setting: str) -> Iterator[bool]:
    """The speed layer for one training run: :func:`configure` with ``setting``, and float32 CPU linear layers
    on oneDNN for the length of the block. Yields whether the layer is on."""
    on = configure(setting)
    with onednn_float32_linear() if on else contextlib.nullcontext():
        yield on


def decoding(model: torch.nn.Module, rows: int):
    """A context for a ``generate`` call of ``model`` over about ``rows`` sequences: its CPU linear layers
    decode from oneDNN-reordered weights when the layer is on, unchanged otherwise."""
    return reordered_linear_weights(model, rows) if _enabled else contextlib.nullcontext()


def after_optimizer_step(device: torch.device) -> None:
    """End of an optimizer step: hand freed memory back to the OS unless the layer keeps it for reuse."""
    if device.type == "cpu":
        memory.release_free_memory()

"""Host (CPU) memory settings of a training process: huge pages for large tensors, and whether freed memory is
kept for reuse or handed back to the operating system.

Why it matters: a training step allocates and frees gigabytes of large tensors (activations, logits, their
gradients). glibc ``malloc`` maps every block over its mmap threshold (at most 32 MB) anew and unmaps it on
``free``, so each step touches fresh pages, and every first touch of a 4 KB page is a page fault. On the
2-core VM these were measured on, a fault cost about 6 us: a 270 MB float32 copy of the logits took 400 ms
instead of 10 ms, and an Online DPO step spent seconds in faults (benchmarks/README.md, "Host memory").

Two settings, both from the libraries underneath, not an allocator of alignlab's own:

* huge pages: PyTorch's CPU allocator marks blocks of 2 MB or more ``MADV_HUGEPAGE`` when the environment
  variable ``THP_MEM_ALLOC_ENABLE`` is set (PyTorch PR #115990, torch >= 2.2); the kernel then maps them
  2 MB at a time where transparent huge pages are ``always`` or ``madvise``. PyTorch reads the variable at
  its first allocation, so :func:`request_huge_pages` must run before that: the ``alignlab`` command calls
  it first thing under ``--cpu_kernels reuse_memory`` (through :func:`alignlab.ops.cpu_kernels.prepare_process`,
  which owns both settings). Huge pages without reuse measured slower than neither setting;
  with reuse, their share of the gain is not settled (benchmarks/README.md).
* reuse (:func:`configure_host_memory`): glibc's ``mallopt`` with ``M_MMAP_MAX = 0`` (no block is mapped on
  its own; large ones come from the heap) and a trim threshold of 2 GB (the largest ``mallopt`` takes), so
  freed memory stays mapped and the next step reuses it without faults. The process then holds about its
  peak heap until it exits; the measured peak RSS was at most 0.7 GiB higher, and when tensor sizes vary from
  batch to batch the heap fragments and grows over a long run (benchmarks/README.md, soak table), so it is
  opt-in (``--cpu_kernels reuse_memory``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"
"""PyTorch's switch for 2 MB-aligned, ``MADV_HUGEPAGE`` CPU allocations of 2 MB or more."""

# glibc mallopt parameters (malloc.h) and values
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_MMAP_MAX = 65536
_ADAPTED_MMAP_THRESHOLD = 32 * 2**20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where the adaptive threshold stops
_LARGEST_TRIM_THRESHOLD = 2**31 - 1


def _load_glibc():
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only (musl has neither malloc_trim nor mallopt's parameters)
        libc.mallopt  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_glibc()
_reuse = False


def request_huge_pages() -> None:
    """Ask PyTorch for huge-page-backed CPU tensors (sets ``THP_MEM_ALLOC_ENABLE=1`` unless the variable is
    already set, e.g. to ``0`` by a user who wants it off). Effective only before PyTorch's first CPU
    allocation in this process; child processes inherit it."""
    os.environ.setdefault(HUGE_PAGES_ENV, "1")


def configure_host_memory(reuse: bool) -> bool:
    """Keep freed heap memory for reuse (``reuse=True``) or return it to the OS (glibc's own policy, plus
    :func:`release_free_memory` after each optimizer step). Process-wide; the last call wins.

    ``reuse=False`` changes nothing unless reuse was on. It then lets glibc map large blocks again, with the
    mmap and trim thresholds where glibc's adaptive rule ends up once large blocks have been freed (32 MB and
    64 MB). Setting any threshold turns that rule off for good, and leaving the mmap threshold at its 128 KB
    start would map, and fault in, every block over 128 KB: 4.6x the page faults of glibc's own policy in an
    Online DPO run (measured).

    Returns:
        True if the setting took effect (glibc on Linux), False elsewhere (nothing is changed).
    """
    global _reuse
    if _LIBC is None:
        return False
    if reuse:
        _LIBC.mallopt(_M_MMAP_MAX, 0)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, _LARGEST_TRIM_THRESHOLD)
    elif _reuse:
        _LIBC.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _ADAPTED_MMAP_THRESHOLD)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 * _ADAPTED_MMAP_THRESHOLD)
    _reuse = reuse
    return True


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), unless :func:`configure_host_memory`
    chose reuse; a no-op without glibc.

    Without reuse, glibc keeps freed small blocks in its arenas, so the resident size creeps up step after
    step; trimming after the optimizer step keeps the steady-state footprint at weights + optimizer state, at
    the price of faulting the pages in again on the next step.
    """
    if _LIBC is not None and not _reuse:
        _LIBC.malloc_trim(0)

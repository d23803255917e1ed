"""Host-memory policy: freed large blocks are reused without page faults, or handed back to the OS."""

import os
import resource

import pytest
import torch

from alignlab.train import memory

pytestmark = pytest.mark.skipif(memory._LIBC is None, reason="glibc only")


def _faults_of_second_allocation() -> int:
    """Minor page faults taken by writing a 64 MB tensor right after an identical one was freed."""
    torch.ones(16 * 2**20)  # allocated, written and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_reuse_keeps_freed_blocks_mapped():
    pages = 64 * 2**20 // 4096
    try:
        assert memory.configure_host_memory(False)
        # glibc maps a 64 MB block on its own (above the 32 MB largest mmap threshold) and unmaps it on free:
        # every page of the second block faults again (fewer with huge pages)
        released = _faults_of_second_allocation()
        assert memory.configure_host_memory(True)
        kept = _faults_of_second_allocation()
    finally:
        memory.configure_host_memory(True)
    assert kept < pages // 20
    assert released > kept


def test_release_free_memory_is_a_no_op_under_reuse(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_LIBC", type("Libc", (), {"malloc_trim": lambda self, pad: calls.append(pad),
                                                          "mallopt": lambda self, *a: 1})())
    memory.configure_host_memory(True)
    memory.release_free_memory()
    assert calls == []
    memory.configure_host_memory(False)
    memory.release_free_memory()
    assert calls == [0]
    memory.configure_host_memory(True)


def test_request_huge_pages_keeps_a_users_choice(monkeypatch):
    monkeypatch.setenv(memory.HUGE_PAGES_ENV, "0")
    memory.request_huge_pages()
    assert os.environ[memory.HUGE_PAGES_ENV] == "0"
    monkeypatch.delenv(memory.HUGE_PAGES_ENV)
    memory.request_huge_pages()
    assert os.environ[memory.HUGE_PAGES_ENV] == "1"

"""Host-memory policy: freed large blocks are reused without page faults, or handed back to the OS."""

import os
import resource
import subprocess
import sys

import pytest
import torch

from alignlab.ops import memory

pytestmark = pytest.mark.skipif(memory._LIBC is None, reason="glibc only")


def _faults_after_a_freed_block() -> int:
    """Minor page faults taken by writing a 64 MB tensor after a 96 MB one was freed and the loop's
    end-of-step :func:`~alignlab.ops.memory.release_free_memory` ran."""
    torch.ones(24 * 2**20)  # 96 MB allocated, written and freed
    memory.release_free_memory()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_reuse_keeps_freed_blocks_mapped():
    pages = 64 * 2**20 // 4096
    try:
        assert memory.configure_host_memory(False)
        # the freed block went back to the OS (unmapped, or trimmed from the heap): every page of the new
        # block faults (fewer faults with huge pages)
        released = _faults_after_a_freed_block()
        assert memory.configure_host_memory(True)
        _faults_after_a_freed_block()  # the first 96 MB block under reuse grows the heap
        kept = _faults_after_a_freed_block()  # the 64 MB block fits in the freed 96 MB: no new pages
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


def test_release_after_reuse_keeps_mid_size_blocks_on_the_heap():
    # back from reuse, a 4 MB block comes from the heap again (mmap threshold 32 MB, as glibc's adaptive rule
    # ends up), not mapped and faulted in on every allocation (the 128 KB threshold glibc starts from).
    # A fresh process, so that no free heap space left by other tests hides the difference.
    code = (
        "import resource, torch\n"
        "from alignlab.ops import memory\n"
        "memory.configure_host_memory(True)\n"
        "memory.configure_host_memory(False)\n"
        "torch.ones(2**21)\n"  # 8 MB allocated, written and freed: the 4 MB block below fits in it
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "torch.ones(2**20)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != memory.HUGE_PAGES_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert int(out.stdout.split()[-1]) < (4 * 2**20 // 4096) // 10


def test_optimizer_step_drops_gradients_after_the_backward_hook():
    # the next backward's gradients become .grad as they are (no zero fill, no add), whatever the memory policy;
    # the runtime's after-backward hook runs first (the speed layer's trim before the optimizer's work)
    from types import SimpleNamespace

    from alignlab.train.steps import guarded_optimizer_step

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    # d/dW sum(W x + b) with x = [1, 1, 1]: every weight gradient 1, bias gradients 1: norm sqrt(8)
    hooks = []
    runtime = SimpleNamespace(accelerator=SimpleNamespace(clip_grad_norm_=torch.nn.utils.clip_grad_norm_),
                              after_backward=lambda: hooks.append([p.grad is not None for p in model.parameters()]))
    before = model.weight.detach().clone()
    grad_norm, stepped = guarded_optimizer_step(runtime, model, optimizer, max_grad_norm=1.0)
    assert stepped and float(grad_norm) == pytest.approx(8 ** 0.5) and not torch.equal(model.weight, before)
    assert all(p.grad is None for p in model.parameters())
    assert hooks == [[True, True]]  # once, while the gradients were there


def test_cpu_kernels_switch(monkeypatch):
    # one switch: auto enters the oneDNN linear layers and leaves memory to glibc; reuse_memory also keeps freed
    # memory for reuse (with huge pages); off does none of it
    from alignlab.ops import cpu_kernels
    from alignlab.ops.linear import _LINEAR_FORWARD

    try:
        with cpu_kernels.training("off") as on:
            assert not on and not cpu_kernels.enabled() and not memory._reuse
            assert torch.nn.Linear.forward is _LINEAR_FORWARD
        with cpu_kernels.training("auto") as on:
            assert on and cpu_kernels.enabled() and not memory._reuse
            assert torch.nn.Linear.forward is not _LINEAR_FORWARD
        with cpu_kernels.training("reuse_memory") as on:
            assert on and cpu_kernels.enabled() and memory._reuse
        with pytest.raises(ValueError, match="cpu_kernels"):
            cpu_kernels.configure("fast")
        monkeypatch.delenv(memory.HUGE_PAGES_ENV, raising=False)
        for name in cpu_kernels.PRIMITIVE_CACHE_ENVS:
            monkeypatch.delenv(name, raising=False)
        cpu_kernels.prepare_process(["--cpu_kernels", "off"])
        assert memory.HUGE_PAGES_ENV not in os.environ and not cpu_kernels.enabled()
        assert not any(name in os.environ for name in cpu_kernels.PRIMITIVE_CACHE_ENVS)
        cpu_kernels.prepare_process(["--beta", "0.1"])
        assert memory.HUGE_PAGES_ENV not in os.environ and cpu_kernels.enabled() and not memory._reuse
        assert all(os.environ[name] == "16" for name in cpu_kernels.PRIMITIVE_CACHE_ENVS)
        cpu_kernels.prepare_process(["--cpu_kernels=reuse_memory"])
        assert os.environ[memory.HUGE_PAGES_ENV] == "1" and memory._reuse
    finally:
        cpu_kernels.configure("auto")

"""Matrix-product throughput of this CPU in float32 and bf16, at the shapes of the embedded model's training
passes (1,600 tokens x hidden 576 x MLP width 1,536, both orientations) and a square 2,048 product: the
ceiling that compute-bound training steps run against. Prints GFLOP/s (2 M K N per product), median of 20
products after 3 warm-up ones, with torch's default thread count. Then the memory bandwidth that
memory-bound work (decoding's one-token products, element-wise passes) runs against: a 1 GiB float32
``copy_``, median of 5, in GB/s read plus written.

    .venv/bin/python benchmarks/matmul.py
"""

from __future__ import annotations

import statistics
import time

import torch

SHAPES = [(1600, 576, 1536), (1600, 1536, 576), (2048, 2048, 2048)]


def product_seconds(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 20) -> float:
    """Median seconds of an ``(m, k) @ (k, n)`` product in ``dtype`` over ``repeats`` products, after 3 warm-up
    ones (its throughput is ``2 m k n`` FLOPs over that)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for m, k, n in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            median = product_seconds(m, k, n, dtype)
            print(f"{m}x{k} @ {k}x{n} {str(dtype).removeprefix('torch.'):9s} {1e3 * median:7.2f} ms "
                  f"{2 * m * k * n / median / 1e9:6.1f} GFLOP/s")
    source, target = torch.randn(2**28), torch.empty(2**28)  # 1 GiB each
    target.copy_(source)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"1 GiB float32 copy {1e3 * median:7.1f} ms {2 * source.nbytes / median / 1e9:6.1f} GB/s (read + written)")


if __name__ == "__main__":
    main()

"""Linear layers on the CPU: ``F.linear`` against oneDNN with the weight reordered (and cast) once.

Float32 (default): ``F.linear`` is MKL's ``sgemm``. ``--bf16``: ``F.linear`` on float32 weights under bf16
autocast (which casts the weight every call), against a reordered bf16 copy.

The weight shapes are the embedded SmolLM2-135M's (hidden 576, MLP 1536, key/value 192, vocabulary 49,152);
the row counts are decoding 16 sequences (16), a short prefill (64) and a packed scoring or training
forward (640). Each case cycles through enough distinct weight matrices (about 200 MB) that none stays in
cache between its calls, as when decoding walks through 30 layers. Reported: microseconds per call, the
float32 weight's bytes per second (reading the weight is the bound when few rows share it) and GFLOP/s,
and the largest difference between the two results. The reordered form is what
:func:`alignlab.ops.linear.reordered_linear_weights` switches decoding to; reordering itself is timed once
per weight (``reorder``), as :func:`~alignlab.rollout.generation.sample_completions` pays it per ``generate``.

    .venv/bin/python benchmarks/linear.py [--rows 16 64 640] [--repeats 3] [--bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in): q/o, k/v, gate/up, down, head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 640])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast against a reordered bf16 copy")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} passes, "
          f"{'bf16 (autocast / reordered bf16 copy)' if args.bf16 else 'float32'}")
    for rows in args.rows:
        for out_features, in_features in SHAPES:
            torch.manual_seed(0)
            count = max(2, 200_000_000 // (out_features * in_features * 4))
            weights = [torch.randn(out_features, in_features) for _ in range(count)]
            x = torch.randn(rows, in_features)
            start = time.perf_counter()
            reordered = [torch.ops.mkldnn._reorder_linear_weight(w.to(dtype), rows) for w in weights]
            reorder = (time.perf_counter() - start) / count

            def per_call(fn, operands) -> float:
                fn(operands[0])  # warm-up
                passes = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    for operand in operands:
                        fn(operand)
                    passes.append((time.perf_counter() - start) / len(operands))
                return statistics.median(passes)

            x_in = x.to(dtype)
            with precision():
                mkl = per_call(lambda w: F.linear(x, w), weights)
                expected = F.linear(x, weights[0]).float()
            onednn = per_call(lambda w: torch.ops.mkldnn._linear_pointwise(x_in, w, None, "none", [None], ""),
                              reordered)
            diff = (expected - torch.ops.mkldnn._linear_pointwise(
                x_in, reordered[0], None, "none", [None], "").float()).abs().max().item()
            size = out_features * in_features * 4 / 1e9
            flop = 2 * rows * out_features * in_features / 1e9
            print(f"rows {rows:4d}  {out_features:5d}x{in_features:<4d}  "
                  f"F.linear {mkl * 1e6:8.0f} us {size / mkl:5.1f} GB/s {flop / mkl:6.1f} GFLOP/s  |  "
                  f"oneDNN {onednn * 1e6:8.0f} us {size / onednn:5.1f} GB/s {flop / onednn:6.1f} GFLOP/s  "
                  f"{mkl / onednn:4.2f}x  |  reorder {reorder * 1e6:6.0f} us  max diff {diff:.1e}", flush=True)
            del weights, reordered


if __name__ == "__main__":
    main()

"""Padding-free layouts for one policy forward and backward: one row with attention per sequence, against
first-fit rows with a block mask, against plain padded rows.

Job: the embedded SmolLM2-135M-Instruct in float32, a PPO-like batch of 16 sequences (prompts of 38-42
tokens, completions of 64 tokens for ten rows and 12-58 for six), ``completion_logps`` at temperature 0.7
and the backward of the summed log-probs, as alignlab's PPO update does. Each layout runs ``--repeats``
times, interleaved; the table gives the median seconds and the largest log-prob difference to the padded
layout.

    .venv/bin/python benchmarks/packing.py [--repeats 5]

Layouts: ``segments`` (the default under sdpa: ``ops/attention.py``), ``rows`` (first-fit decreasing rows
as wide as the longest sequence, transformers' block-diagonal mask from ``position_ids``; what other
attention implementations get) and ``padded`` (``--padding_free false``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from alignlab.models import embedded_model_path, load_causal_lm  # noqa: E402
from alignlab.ops import attention  # noqa: E402
from alignlab.ops.logprobs import completion_logps  # noqa: E402
from alignlab.ops.memory import configure_host_memory  # noqa: E402


def ppo_like_job() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The embedded model (float32, host memory reused as the alignlab command runs) and the job's 16
    sequences: ``(model, input_ids, attention_mask, completion_mask)``, the tensors ``(16, 106)``."""
    configure_host_memory(True)
    model = load_causal_lm(str(embedded_model_path()))
    completions = [64] * 10 + [12, 25, 33, 47, 51, 58]
    prompts = [38 + i % 5 for i in range(16)]
    width = max(p + c for p, c in zip(prompts, completions))
    input_ids = torch.randint(100, 40000, (16, width), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.zeros(16, width, dtype=torch.long)
    completion_mask = torch.zeros_like(attention_mask)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        attention_mask[i, : p + c] = 1
        completion_mask[i, p : p + c] = 1
    return model, input_ids, attention_mask, completion_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, input_ids, attention_mask, completion_mask = ppo_like_job()
    width = input_ids.shape[1]
    supports = attention.supports_segments

    def run(layout: str) -> tuple[float, float, torch.Tensor]:
        attention.supports_segments = supports if layout == "segments" else (lambda config, longest: False)
        try:
            start = time.perf_counter()
            per_token, total = completion_logps(model, input_ids, attention_mask, completion_mask,
                                                padding_free=layout != "padded", temperature=0.7)
            middle = time.perf_counter()
            total.sum().backward()
            end = time.perf_counter()
        finally:
            attention.supports_segments = supports
        model.zero_grad(set_to_none=False)
        return middle - start, end - middle, per_token.detach()

    layouts = ("segments", "rows", "padded")
    run("segments")  # warm-up
    times: dict[str, list[tuple[float, float]]] = {layout: [] for layout in layouts}
    logps = {}
    for _ in range(args.repeats):
        for layout in layouts:
            forward, backward, logps[layout] = run(layout)
            times[layout].append((forward, backward))
    print(f"{int(attention_mask.sum())} real tokens in 16 rows of {width}; median of {args.repeats} runs, float32")
    print(f"{'layout':9s} {'forward':>8s} {'backward':>9s} {'total':>7s} {'max |logp - padded|':>20s}")
    for layout in layouts:
        forward = statistics.median(t[0] for t in times[layout])
        backward = statistics.median(t[1] for t in times[layout])
        total = statistics.median(t[0] + t[1] for t in times[layout])
        diff = (logps[layout] - logps["padded"]).abs().max().item()
        print(f"{layout:9s} {forward:7.2f}s {backward:8.2f}s {total:6.2f}s {diff:20.2e}")


if __name__ == "__main__":
    main()

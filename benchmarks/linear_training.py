"""Float32 training and scoring forwards with the linear layers on MKL (``F.linear``) or oneDNN
(``alignlab.ops.linear.onednn_float32_linear``, what alignlab's training loop runs under).

Job: the batch of ``benchmarks/packing.py`` (embedded SmolLM2-135M-Instruct in float32, 16 sequences of
50-106 tokens, packed into one row with attention per sequence), ``completion_logps`` at temperature 0.7:
the policy's forward and backward (one PPO epoch's policy half), and a forward without gradients (a
reference or reward model scoring). The two variants alternate ``--repeats`` times, so a slow patch of a
shared VM hits both; the table gives medians, the median of the per-pair ratios, and the largest
log-prob and gradient differences between the variants.

    .venv/bin/python benchmarks/linear_training.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from alignlab.ops.linear import onednn_float32_linear  # noqa: E402
from alignlab.ops.logprobs import completion_logps  # noqa: E402
from packing import ppo_like_job  # noqa: E402  (benchmarks/packing.py: the same model and batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    model, input_ids, attention_mask, completion_mask = ppo_like_job()

    def switch(variant: str):
        return onednn_float32_linear(model) if variant == "oneDNN" else contextlib.nullcontext()

    def train_pass(variant: str) -> tuple[float, torch.Tensor, torch.Tensor]:
        with switch(variant):
            start = time.perf_counter()
            per_token, total = completion_logps(model, input_ids, attention_mask, completion_mask,
                                                padding_free=True, temperature=0.7)
            total.sum().backward()
            seconds = time.perf_counter() - start
        grad = model.model.layers[0].mlp.gate_proj.weight.grad.clone()
        model.zero_grad(set_to_none=True)
        return seconds, per_token.detach(), grad

    def score_pass(variant: str) -> float:
        with switch(variant), torch.no_grad():
            start = time.perf_counter()
            completion_logps(model, input_ids, attention_mask, completion_mask, padding_free=True, temperature=0.7)
            return time.perf_counter() - start

    variants = ("F.linear", "oneDNN")
    for variant in variants:  # warm-up
        train_pass(variant)
    train = {v: [] for v in variants}
    score = {v: [] for v in variants}
    out = {}
    for _ in range(args.repeats):
        for variant in variants:
            seconds, logps, grad = train_pass(variant)
            train[variant].append(seconds)
            out[variant] = (logps, grad)
            score[variant].append(score_pass(variant))
    print(f"{int(attention_mask.sum())} real tokens, float32, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} alternating runs")
    for name, times in (("forward + backward", train), ("forward, no grad", score)):
        ratios = [a / b for a, b in zip(times["F.linear"], times["oneDNN"])]
        print(f"{name:19s}  F.linear {statistics.median(times['F.linear']):6.2f}s  "
              f"oneDNN {statistics.median(times['oneDNN']):6.2f}s  "
              f"speed-up {statistics.median(ratios):.2f}x (per pair {min(ratios):.2f}-{max(ratios):.2f})")
    logp_diff = (out["F.linear"][0] - out["oneDNN"][0]).abs().max().item()
    grad_diff = (out["F.linear"][1] - out["oneDNN"][1]).abs().max().item()
    grad_size = out["F.linear"][1].abs().max().item()
    print(f"max |logp difference| {logp_diff:.1e}; layer-0 gate_proj gradient: max difference {grad_diff:.1e} "
          f"(largest entry {grad_size:.1e})")


if __name__ == "__main__":
    main()

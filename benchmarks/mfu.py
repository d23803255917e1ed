"""How far alignlab's DPO training step is from this machine's limit: achieved model FLOP/s against the measured
matrix-product peak (model FLOPs utilisation, MFU), in the precision alignlab picks here.

Job: ``alignlab dpo`` on the embedded SmolLM2-135M-Instruct, the first ``--pairs`` pairs of the shared HH-RLHF
data, batch ``--batch``, ``max_length`` ``--max_length``, ``--steps`` optimizer steps, everything else at
alignlab's defaults. Achieved FLOP/s per step is ``tokens_per_second`` (the trained tokens, chosen and rejected,
from ``metrics.jsonl``) times the model FLOPs per token, counted as PaLM's appendix B does (Chowdhery et al.
2022): ``6 N + 12 L d S`` for the policy's forward and backward (``N`` parameters, the output head included;
``L`` layers, width ``d``, ``S`` the mean sequence length of the step, attention counted over the whole
sequence) plus ``2 N + 4 L d S`` for the reference model's forward. alignlab projects hidden states onto the
vocabulary only at completion positions, so the output head's share of ``N`` is spent on part of the tokens:
the script prints the figure with the head counted at every token (PaLM's count, an upper bound) and without
it (a lower bound). The step's median over the steps after the first is reported. The peak is the median bf16
(or float32) throughput of ``benchmarks/matmul.py``'s square 2048 product, measured in the same run before
training.

    .venv/bin/python benchmarks/mfu.py [--pairs 64] [--batch 8] [--max_length 512] [--steps 6]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from matmul import product_seconds  # noqa: E402

SHARED_PAIRS = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs-2000.jsonl.gz"


def parameter_count(config, *, head: bool = True) -> int:
    """The model's parameters ``N`` (built on the meta device); ``head=False`` leaves the output head's ``vocab x
    d`` matrix out (tied or not)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return n if head else n - config.vocab_size * config.hidden_size


def flops_per_token(n: int, config, mean_length: float, *, train: bool) -> float:
    """PaLM's model FLOPs per token of a model of ``n`` parameters: ``6 N + 12 L d S`` (forward and backward) or
    ``2 N + 4 L d S`` (forward), ``S`` = ``mean_length``."""
    attention = config.num_hidden_layers * config.hidden_size * mean_length
    return (6 * n + 12 * attention) if train else (2 * n + 4 * attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from transformers import AutoConfig

    from alignlab.models import embedded_model_path
    from alignlab.train.config import fast_bf16_available

    model_path = str(embedded_model_path())
    bf16 = fast_bf16_available()
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = 2 * 2048**3 / product_seconds(2048, 2048, 2048, dtype)
    print(f"matrix-product peak ({str(dtype).removeprefix('torch.')}, 2048^3): {peak / 1e9:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        with gzip.open(SHARED_PAIRS, "rt") as src:
            data.write_text("".join(next(src) for _ in range(args.pairs)))
        out = Path(tmp) / "dpo"
        cmd = [str(ROOT / ".venv" / "bin" / "alignlab"), "dpo", "--model_name_or_path", model_path,
               "--dataset_name", str(data), "--output_dir", str(out), "--per_device_train_batch_size",
               str(args.batch), "--max_length", str(args.max_length), "--max_steps", str(args.steps),
               "--logging_steps", "1", "--save_steps", "0", "--bf16", str(bf16).lower()]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_second" in r]
    config = AutoConfig.from_pretrained(model_path)
    n = {head: parameter_count(config, head=head) for head in (True, False)}
    achieved: dict[bool, list[float]] = {True: [], False: []}
    previous = 0
    for row in rows:
        tokens, previous = row["num_tokens"] - previous, row["num_tokens"]
        mean_length = tokens / (2 * args.batch)  # chosen and rejected sequences of the step
        for head in (True, False):
            per_token = (flops_per_token(n[head], config, mean_length, train=True)  # the policy
                         + flops_per_token(n[head], config, mean_length, train=False))  # the reference
            achieved[head].append(row["tokens_per_second"] * per_token)
    steady = {head: statistics.median(values[1:] or values) for head, values in achieved.items()}
    print(f"DPO step, batch {args.batch}, max_length {args.max_length}, {'bf16' if bf16 else 'float32'}: "
          f"{statistics.median(r['tokens_per_second'] for r in rows[1:] or rows):.0f} tokens/s; "
          f"output head counted at every token: {steady[True] / 1e9:.1f} GFLOP/s, MFU {steady[True] / peak:.1%}; "
          f"output head not counted: {steady[False] / 1e9:.1f} GFLOP/s, MFU {steady[False] / peak:.1%}")


if __name__ == "__main__":
    main()

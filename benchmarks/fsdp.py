"""One process, DDP on two and FSDP2 on two: the same DPO and GRPO jobs, per-process peak memory, step time and
the loss trajectory of each.

The model is a random-weight model of SmolLM2-360M's shape (hidden 960, 32 layers, 15 heads, 5 key-value
heads, intermediate 2560, the embedded tokenizer's vocabulary; tied embeddings), float32, built once into a
temporary folder. Every run has the same global batch: one process accumulates two micro-batches where two
processes take one each. DPO: HH-RLHF pairs (``/work/shared``, else ``builtin:concise``), 2 pairs per micro-batch,
``--max_length 128``, the reference a frozen copy of the policy on every process. GRPO: 2 prompts x 2
generations per process, 16-token completions, ``beta 0.04`` (a reference), the reward ``target_length`` from
examples/reward_funcs.py. Each run is launched alone (``torchrun --nproc_per_node 2`` for the two-process
runs, ``OMP_NUM_THREADS=1`` per process there) and measured by ``_measure.run_measured``: peak RSS is the
largest process's (``wait4``'s ``ru_maxrss`` covers the launcher's children), step time the mean gap between
``metrics.jsonl`` rows after the first.

    .venv/bin/python benchmarks/fsdp.py --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _measure import run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HH = next((p / "data" / "hh-rlhf-harmless" / "pairs-2000.jsonl.gz" for p in (ROOT.parent / "shared", Path("/work/shared"))
           if (p / "data" / "hh-rlhf-harmless" / "pairs-2000.jsonl.gz").exists()), Path("missing"))


def build_model(path: Path) -> None:
    """A random SmolLM2-360M-shaped Llama (float32) with the embedded tokenizer, saved to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignlab.models import load_tokenizer

    tok = load_tokenizer(None)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
        num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


def job_args(job: str, model: Path, out: Path, steps: int, processes: int) -> list[str]:
    accumulate = "2" if processes == 1 else "1"
    common = ["--model_name_or_path", str(model), "--output_dir", str(out), "--max_steps", str(steps),
              "--logging_steps", "1", "--save_steps", "0", "--bf16", "false", "--learning_rate", "1e-5",
              "--gradient_accumulation_steps", accumulate]
    if job == "dpo":
        data = str(HH) if HH.exists() else "builtin:concise"
        return ["dpo", *common, "--dataset_name", data, "--per_device_train_batch_size", "2", "--max_length", "128"]
    return ["grpo", *common, "--dataset_name", "builtin:concise", "--per_device_train_batch_size", "4",
            "--num_generations", "2", "--max_completion_length", "16", "--beta", "0.04",
            "--reward_funcs", f"{ROOT / 'examples' / 'reward_funcs.py'}:target_length"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--jobs", default="dpo,grpo")
    parser.add_argument("--modes", default="one,ddp,fsdp", help="of one, ddp, fsdp")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="alignlab-fsdp-bench-"))
    model = work / "smollm2-360m-shape"
    if not (model / "config.json").exists():
        build_model(model)
    env_py = os.environ.get("PYTHON", sys.executable)
    rows = []
    for job in args.jobs.split(","):
        for mode in args.modes.split(","):
            out = work / f"{job}-{mode}"
            shutil.rmtree(out, ignore_errors=True)  # a previous run's metrics.jsonl would read as this run's rows
            argv = job_args(job, model, out, args.steps, 1 if mode == "one" else 2)
            if mode == "one":
                cmd = [env_py, "-m", "alignlab.cli", *argv]
            else:
                cmd = [env_py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29701",
                       "-m", "alignlab.cli", *argv]
                if mode == "fsdp":
                    cmd += ["--fsdp", "full_shard auto_wrap"]
            os.environ["OMP_NUM_THREADS"] = "2" if mode == "one" else "1"
            measured = run_measured(cmd, str(work / f"{job}-{mode}"), f"{job} {mode}", out / "metrics.jsonl")
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            times = measured["row_times"]
            gaps = [b - a for a, b in zip(times, times[1:])]
            rows.append({
                "job": job, "mode": mode, "peak_rss_gib": measured["peak_rss_bytes"] / 2**30,
                "step_seconds": statistics.mean(gaps) if gaps else float("nan"),
                "wall_seconds": measured["wall_seconds"], "loss": [round(r["loss"], 5) for r in metrics],
            })
            print(json.dumps(rows[-1]), flush=True)
    print()
    print("| job | processes | peak RSS per process | s / step (steps 2+) | whole run | loss by step |")
    print("|---|---|---|---|---|---|")
    names = {"one": "1", "ddp": "2, DDP", "fsdp": "2, FSDP2"}
    for r in rows:
        print(f"| {r['job'].upper()} | {names[r['mode']]} | {r['peak_rss_gib']:.2f} GiB | {r['step_seconds']:.2f} | "
              f"{r['wall_seconds']:.1f} s | {', '.join(f'{x:.4f}' for x in r['loss'])} |")
    for job in args.jobs.split(","):
        by = {r["mode"]: r for r in rows if r["job"] == job}
        if "fsdp" in by and "ddp" in by:
            print(f"{job}: FSDP2 / DDP peak RSS = {by['fsdp']['peak_rss_gib'] / by['ddp']['peak_rss_gib']:.2f}")


if __name__ == "__main__":
    main()

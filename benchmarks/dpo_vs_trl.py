"""alignlab DPO against TRL's DPOTrainer on the same job, each at its default settings, in one run.

Job: the embedded SmolLM2-135M-Instruct, the first 32 pairs of the shared HH-RLHF data (implicit-prompt
transcripts, each library extracting the prompt its own way), batch 4, max_length 256, 8 optimizer steps,
final model saved. Everything else is each library's default (TRL 1.16: bf16 autocast, gradient
checkpointing, lr 1e-6; alignlab: bf16 autocast, no gradient checkpointing, lr 1e-6).

Each side runs in its own process; the numbers are that whole process's wall time (start-up, model and data
loading, training and saving included) and its peak resident memory (``ru_maxrss`` of the child, from
``os.wait4``). The two run one after the other, never at the same time.

    .venv/bin/python benchmarks/dpo_vs_trl.py [--pairs 32] [--steps 8] [--only alignlab|trl]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_PAIRS = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs-2000.jsonl.gz"

TRL_SCRIPT = r"""
import json, sys, time
import datasets
from trl import DPOConfig, DPOTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer
model_path, data_path, out, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = [json.loads(l) for l in open(data_path)]
ds = datasets.Dataset.from_list(rows)
tok = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path)
args = DPOConfig(output_dir=out, per_device_train_batch_size=4, max_steps=steps, max_length=256,
                 report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                 use_cpu=True)
trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
t = time.perf_counter()
trainer.train()
train_s = time.perf_counter() - t
trainer.save_model(out)
logs = [r for r in trainer.state.log_history if "loss" in r]
print(json.dumps({"train_seconds": train_s, "last_loss": logs[-1]["loss"]}))
"""


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; return its wall seconds, peak RSS bytes and stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    # communicate() reaped the child; its rusage is folded into RUSAGE_CHILDREN, so measure the child
    # exclusively by running each side in a fresh interpreter of this script (see main()).
    if proc.returncode != 0:
        sys.stderr.write(err[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return {"wall_seconds": wall, "stdout": out}


def child(side: str, model_path: str, data: str, out: str, steps: int) -> None:
    """Run one side as a direct child and print its wall time and peak RSS as JSON (used by main)."""
    if side == "alignlab":
        cmd = [
            str(ROOT / ".venv" / "bin" / "alignlab"), "dpo",
            "--model_name_or_path", model_path, "--dataset_name", data, "--output_dir", out,
            "--per_device_train_batch_size", "4", "--max_steps", str(steps), "--max_length", "256",
            "--logging_steps", "1", "--save_steps", "0",
        ]
    else:
        cmd = [sys.executable, "-c", TRL_SCRIPT, model_path, data, out, str(steps)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout = proc.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{side} failed with status {status}")
    print(json.dumps({"side": side, "wall_seconds": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "stdout": stdout[-2000:]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", choices=["alignlab", "trl"])
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, model_path, data, out, steps = args.child
        child(side, model_path, data, out, int(steps))
        return

    sys.path.insert(0, str(ROOT / "src"))
    from alignlab.models import embedded_model_path

    model_path = str(embedded_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        with gzip.open(SHARED_PAIRS, "rt") as src:
            rows = [next(src) for _ in range(args.pairs)]
        data.write_text("".join(rows))
        results = {}
        for side in ("alignlab", "trl"):
            if args.only and side != args.only:
                continue
            res = subprocess.run(
                [sys.executable, __file__, "--child", side, model_path, str(data), str(Path(tmp) / side), str(args.steps)],
                capture_output=True, text=True, check=True,
            )
            results[side] = json.loads(res.stdout.strip().splitlines()[-1])
            r = results[side]
            print(f"{side:9s} wall {r['wall_seconds']:7.1f} s   peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB", flush=True)
        if len(results) == 2:
            a, t = results["alignlab"], results["trl"]
            print(f"speed-up (TRL wall / alignlab wall): {t['wall_seconds'] / a['wall_seconds']:.2f}x")
            print(f"memory ratio (alignlab peak / TRL peak): {a['peak_rss_bytes'] / t['peak_rss_bytes']:.2f}")


if __name__ == "__main__":
    main()

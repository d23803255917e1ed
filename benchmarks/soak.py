"""Soak: does the training process's resident memory creep over a long run?

Two jobs on a tiny random model (2-layer Llama, hidden 64, the embedded model's tokenizer and its 49k vocabulary),
each an ``alignlab`` process of its own, run through the ``alignlab`` command's own entry point so the host-memory
setting is the command's (``--cpu_kernels auto``, the default: oneDNN linear layers with bounded caches, glibc's
memory policy plus ``malloc_trim`` after each step; ``reuse_memory``: freed memory kept for reuse,
``mallopt(M_MMAP_MAX, 0)``, and huge pages; ``off``: plain PyTorch and glibc's policy plus the trim):

* DPO: ``builtin:concise`` pairs, 4 pairs per step, ``--max_length 128``, 2,000 optimizer steps by default;
* GRPO: ``builtin:concise`` prompts, 8 completions per step (1 prompt x 8 generations, TRL's default group),
  up to 32 tokens each, ``examples/reward_funcs.py:target_length``, 300 steps by default.

The resident set size (``psutil``, the training process itself) is read from inside the process at the end of
every optimizer step, before the step's memory release and after it: the child wraps
:func:`alignlab.ops.cpu_kernels.after_optimizer_step`, which the loop calls once per optimizer step. Every 10
steps it writes the highest of those 10 readings of each kind. Before the release, a reading includes what
the step itself allocated (so it varies with the batch); after it, what the process keeps between steps. Printed per job: that
value at step 100 and at the last step, their ratio, the peak, the process's peak RSS over the whole
run (``ru_maxrss``, which sees the inside of a step too), the wall time, the curve, and the work per step
near step 100 and at the end (GRPO's mean completion length; DPO's tokens per logged interval), since a
job whose steps grow legitimately needs more memory.

    python benchmarks/soak.py                       # both jobs, --cpu_kernels auto and off
    python benchmarks/soak.py --jobs dpo --dpo_steps 500 --settings auto

``--allocations N`` runs instead N rounds of a training step's allocation pattern without a model (three
``(8, T, 49152 / 4)`` float32 tensors, 20 of ``(T, 4096)`` and 200 small ones, ``T`` drawn from 40-128 per
round, all written then freed, :func:`alignlab.ops.memory.release_free_memory` after each round), one
process per host-memory variant (run at the same time), and prints the highest RSS of every 100 rounds:

    python benchmarks/soak.py --allocations 1500
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVERY = 10


def make_tiny_model(path: Path) -> None:
    """The test suite's tiny model (tests/conftest.py): random 2-layer Llama, hidden 64, embedded tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignlab.models import load_tokenizer

    tokenizer = load_tokenizer(None)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def job_argv(job: str, model: Path, out: Path, steps: int, setting: str) -> list[str]:
    common = ["--model_name_or_path", str(model), "--output_dir", str(out), "--max_steps", str(steps),
              "--save_steps", "0", "--bf16", "false", "--cpu_kernels", setting, "--seed", "42"]
    if job == "dpo":
        return ["dpo", *common, "--dataset_name", "builtin:concise", "--per_device_train_batch_size", "4",
                "--max_length", "128", "--logging_steps", "50", "--learning_rate", "1e-5"]
    return ["grpo", *common, "--dataset_name", "builtin:concise", "--per_device_train_batch_size", "8",
            "--num_generations", "8", "--max_completion_length", "32", "--logging_steps", "10",
            "--sample_steps", "0", "--reward_funcs", f"{ROOT / 'examples' / 'reward_funcs.py'}:target_length"]


def child(rss_path: str, argv: list[str]) -> int:
    """In the training process: at each optimizer step's end read the RSS, and every ``EVERY`` steps write
    ``{"step", "rss" (the highest of those readings), "seconds"}``."""
    import psutil

    from alignlab import cli
    from alignlab.ops import cpu_kernels

    proc = psutil.Process()
    original = cpu_kernels.after_optimizer_step
    state = {"step": 0, "peak": 0, "retained": 0, "start": time.perf_counter()}
    handle = open(rss_path, "w", encoding="utf-8")

    def after_optimizer_step(device):
        state["peak"] = max(state["peak"], proc.memory_info().rss)
        original(device)
        state["retained"] = max(state["retained"], proc.memory_info().rss)  # after the release
        state["step"] += 1
        if state["step"] % EVERY == 0:
            handle.write(json.dumps({"step": state["step"], "rss": state["peak"], "retained": state["retained"],
                                     "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                     "seconds": time.perf_counter() - state["start"]}) + "\n")
            handle.flush()
            state["peak"] = state["retained"] = 0

    cpu_kernels.after_optimizer_step = after_optimizer_step
    try:
        return cli.main(argv)
    finally:
        handle.close()


ALLOCATION_VARIANTS = {  # name: (THP_MEM_ALLOC_ENABLE, reuse)
    "huge pages + reuse (the default)": ("1", True),
    "reuse, no huge pages": ("0", True),
    "huge pages, glibc's policy": ("1", False),
}


def allocation_child(thp: str, reuse: bool, rounds: int) -> list[float]:
    """The allocation rounds in this process (``THP_MEM_ALLOC_ENABLE`` set before torch is imported)."""
    import random

    os.environ["THP_MEM_ALLOC_ENABLE"] = thp
    from alignlab.ops import memory

    memory.configure_host_memory(reuse)
    import psutil
    import torch

    proc, rng, peak, out = psutil.Process(), random.Random(0), 0, []
    for i in range(rounds):
        t = rng.randint(40, 128)
        big = [torch.ones(8 * t * 49152 // 4) for _ in range(3)]
        small = [torch.ones(rng.randint(1000, 300000)) for _ in range(200)]
        mid = [torch.ones(t * 4096) for _ in range(20)]
        rss = proc.memory_info().rss  # the round's working set, before the release
        del big, small, mid
        memory.release_free_memory()
        peak = max(peak, rss, proc.memory_info().rss)
        if i % 100 == 99:
            out.append(round(peak / 2**20))
            peak = 0
    return out


def run_allocations(rounds: int) -> None:
    """Each variant in a process of its own, all at once (RSS does not depend on the others)."""
    pythonpath = os.pathsep.join([str(ROOT / "src"), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    procs = {}
    for name, (thp, reuse) in ALLOCATION_VARIANTS.items():
        code = (f"import json; from soak import allocation_child; "
                f"print(json.dumps(allocation_child({thp!r}, {reuse}, {rounds})))")
        procs[name] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                       env={**os.environ, "PYTHONPATH": pythonpath}, cwd=tempfile.gettempdir())
    for name, proc in procs.items():
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{name} failed with status {proc.returncode}")
        curve = json.loads(stdout.strip().splitlines()[-1])
        print(f"{name:<36} highest RSS per 100 rounds (MiB): {curve}; first {curve[0]}, last {curve[-1]}, "
              f"max {max(curve)}", flush=True)


def run_job(job: str, model: Path, work: Path, steps: int, setting: str) -> dict:
    out = work / f"{job}-{setting}"
    rss_path = work / f"{job}-{setting}.rss.jsonl"
    cmd = [sys.executable, __file__, "--_child", str(rss_path), "--",
           *job_argv(job, model, out, steps, setting)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{job} ({setting}) failed with status {proc.returncode}")
    rows = [json.loads(line) for line in rss_path.read_text().splitlines()]
    at = {r["step"]: r["rss"] for r in rows}
    # the work per step: tokens per row of metrics.jsonl near step 100 and at the end (GRPO's completions grow
    # as it learns the length reward, which legitimately needs more memory)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "loss" in r]
    key = "completions/mean_length" if job == "grpo" else "num_tokens"
    values = [r.get(key) for r in logged]
    if key == "num_tokens":  # cumulative: tokens per logged interval
        values = [b - a for a, b in zip([0] + values[:-1], values)]
    near_100 = min(range(len(logged)), key=lambda i: abs(logged[i]["step"] - 100))
    first = at.get(100, rows[0]["rss"])
    last = rows[-1]["rss"]
    # less noisy (one reading is the largest batch of its 10 steps): the mean reading over steps 101-200 against
    # the mean over the last 100 steps
    early = [r["rss"] for r in rows if 100 < r["step"] <= 200] or [first]
    late = [r["rss"] for r in rows[-10:]]
    window_growth = 100 * (sum(late) / len(late) / (sum(early) / len(early)) - 1)
    # what the process keeps between steps (read after the step's release): the footprint a creep would grow
    kept = {r["step"]: r["retained"] for r in rows}
    kept_first, kept_last = kept.get(100, rows[0]["retained"]), rows[-1]["retained"]
    return {"job": job, "setting": setting, "steps": rows[-1]["step"], "rss_100_mib": first / 2**20,
            "rss_end_mib": last / 2**20, "growth_pct": 100 * (last / first - 1), "window_growth_pct": window_growth,
            "retained_100_mib": kept_first / 2**20, "retained_end_mib": kept_last / 2**20,
            "retained_growth_pct": 100 * (kept_last / kept_first - 1),
            "peak_mib": max(r["rss"] for r in rows) / 2**20, "max_rss_mib": rows[-1]["max_rss"] / 2**20,
            "wall_s": wall, "length_key": key, "length_100": round(values[near_100], 1),
            "length_end": round(values[-1], 1),
            "curve_mib": [round(r["rss"] / 2**20, 1) for r in rows[:: max(1, len(rows) // 10)]]}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--_child":
        sep = sys.argv.index("--")
        raise SystemExit(child(sys.argv[2], sys.argv[sep + 1 :]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", default=["dpo", "grpo"], choices=["dpo", "grpo"])
    parser.add_argument("--settings", nargs="+", default=["auto", "off"], choices=["auto", "reuse_memory", "off"])
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder, removed)")
    parser.add_argument("--dpo_steps", type=int, default=2000)
    parser.add_argument("--grpo_steps", type=int, default=300)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--allocations", type=int, help="run this many allocation rounds per host-memory "
                        "variant instead of the training jobs")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    if args.allocations:
        run_allocations(args.allocations)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        make_tiny_model(work / "tiny")
        for job in args.jobs:
            for setting in args.settings:
                steps = args.dpo_steps if job == "dpo" else args.grpo_steps
                result = run_job(job, work / "tiny", work, steps, setting)
                results.append(result)
                print(f"{job:<5} cpu_kernels={setting:<12} steps {result['steps']:>5}  RSS at step 100 "
                      f"{result['rss_100_mib']:7.1f} MiB  at the end {result['rss_end_mib']:7.1f} MiB  "
                      f"({result['growth_pct']:+.1f}%; means of steps 101-200 and the last 100: "
                      f"{result['window_growth_pct']:+.1f}%)  after the release: {result['retained_100_mib']:.1f} -> "
                      f"{result['retained_end_mib']:.1f} MiB ({result['retained_growth_pct']:+.1f}%)  peak {result['peak_mib']:7.1f} MiB  ru_maxrss {result['max_rss_mib']:7.1f} MiB  "
                      f"wall {result['wall_s']:6.0f} s  curve {result['curve_mib']}  "
                      f"{result['length_key']} {result['length_100']} -> {result['length_end']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

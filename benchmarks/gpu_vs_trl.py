"""alignlab against TRL 1.16 on one GPU: DPO on a 1.7B SmolLM2-shaped model, GRPO and Online DPO on the 135M shape.

Jobs (``--jobs``, each side in its own process, one after the other, never at the same time):

* ``dpo``: a random model of SmolLM2-1.7B's shape (hidden 2048, intermediate 8192, 24 layers, 32 heads), batch 16
  pairs, ``max_length`` 512, ``--steps`` optimizer steps (default 30), learning rate 5e-7, the pairs of
  ``--pairs`` (default: the shared HH-RLHF pairs when they are next to the checkout, else the built-in
  ``concise`` set). Each library at its own defaults otherwise (TRL: gradient checkpointing on; alignlab:
  ``--gradient_checkpointing auto``).
* ``grpo``: a random model of SmolLM2-135M's shape, 8 prompts x 8 completions of at most 128 tokens per step,
  and ``online-dpo``: 32 prompts x 2 completions of at most 128 tokens; the jobs, flags and TRL script of
  ``benchmarks/grpo_vs_trl.py`` (its docstring lists every setting), with these batch sizes.

Both sides in bf16 (``--bf16 true`` / ``bf16=True``), seed 42, the same data files, the same random weights
(built once into ``--work``, from the config and tokenizer of ``--base``: default the embedded model's cache).
Random weights do the work of real ones per step, except that sampling never stops early at EOS.

Measured per side: the process's wall time, its peak resident memory (``ru_maxrss``), its peak GPU memory
(``nvidia-smi``'s used memory polled every 0.25 s: the whole device, so nothing else should run on it), and the
median wall time of the optimizer steps after the first (alignlab: between ``metrics.jsonl`` rows; TRL: between
``on_step_end`` callbacks). One JSON line per run goes to ``--work``/results.jsonl, and a table to stdout.

``--smoke`` runs every job with tiny shapes (hidden 64, 2 layers), 2 steps and short sequences, on whatever
device is there (the CPU in CI), to prove that the script, both libraries and the flags work together.

    python benchmarks/gpu_vs_trl.py                      # on a GPU: every job, both sides
    python benchmarks/gpu_vs_trl.py --smoke --work /tmp/gvt
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _measure import run_measured  # noqa: E402
from grpo_vs_trl import TRL_SCRIPT as TRL_ONLINE_SCRIPT  # noqa: E402
from grpo_vs_trl import alignlab_command as online_command  # noqa: E402

CONCISE = ROOT / "src" / "alignlab" / "data" / "builtin" / "concise.jsonl"
SHARED_PAIRS = [p / "shared" / "data" / "hh-rlhf-harmless" / "pairs-2000.jsonl.gz" for p in (ROOT, ROOT.parent)]
REWARD = ROOT / "examples" / "reward_funcs.py"
SHAPES = {
    "135m": {},  # the embedded model's own config
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, head_dim=64),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}
FULL = {"dpo": dict(shape="1.7b", steps=30, batch=16, length=512),
        "grpo": dict(shape="135m", steps=6, prompts=8, generations=8, length=128),
        "online-dpo": dict(shape="135m", steps=6, prompts=32, length=128)}
SMOKE = {"dpo": dict(shape="tiny", steps=2, batch=2, length=64),
         "grpo": dict(shape="tiny", steps=2, prompts=2, generations=2, length=8),
         "online-dpo": dict(shape="tiny", steps=2, prompts=2, length=8)}

TRL_DPO_SCRIPT = r"""
import json, sys, time
import datasets, torch, trl
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer
model_path, data_path, out, result_path, steps, batch, length = sys.argv[1:]
rows = [json.loads(l) for l in open(data_path, encoding="utf-8")]
tok = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
args = DPOConfig(output_dir=out, per_device_train_batch_size=int(batch), max_steps=int(steps), max_length=int(length),
                 learning_rate=5e-7, bf16=True, use_cpu=not torch.cuda.is_available(), report_to="none",
                 save_strategy="no", logging_steps=1, disable_tqdm=True, seed=42)
times = []

class StepTimer(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter())

trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                     callbacks=[StepTimer()])
start = time.perf_counter()
trainer.train()
logs = [r for r in trainer.state.log_history if "loss" in r]
json.dump({"versions": {"trl": trl.__version__, "torch": torch.__version__}, "train_seconds": time.perf_counter() - start,
           "step_ends": times, "gradient_checkpointing": args.gradient_checkpointing, "last_log": logs[-1] if logs else None,
           "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None},
          open(result_path, "w"), default=str)
"""


class GpuPeak:
    """Polls ``nvidia-smi``'s used memory (MiB) every 0.25 s while running; ``peak`` is the largest seen (None
    without ``nvidia-smi``)."""

    def __init__(self):
        self.peak = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=5).stdout.split()
            except (OSError, subprocess.SubprocessError):
                return
            if used:
                self.peak = max(self.peak or 0, int(used[0]))
            self._stop.wait(0.25)

    def __enter__(self) -> "GpuPeak":
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def build_model(base: Path, shape: str, work: Path) -> str:
    """A random model of ``shape`` (:data:`SHAPES`) from ``base``'s config, with ``base``'s tokenizer files, saved
    once under ``work``; returns its folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    target = work / f"model-{shape}"
    if (target / "config.json").is_file():
        return str(target)
    config = AutoConfig.from_pretrained(base)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = work / f".model-{shape}"
    model.save_pretrained(tmp)
    for item in base.iterdir():
        if item.is_file() and (item.name.startswith("tokenizer") or item.name in ("special_tokens_map.json",
                                                                                     "chat_template.jinja")):
            shutil.copy(item, tmp / item.name)
    tmp.rename(target)
    return str(target)


def write_data(work: Path, pairs: Path | None) -> tuple[str, str]:
    """``(pairs.jsonl, prompts.jsonl)`` under ``work``: the DPO pairs (``pairs``: a JSONL file, gzipped or not; the
    built-in ``concise`` pairs when None) and the online jobs' prompts (the ``prompt`` column of ``concise``)."""
    opener = gzip.open if pairs is not None and pairs.suffix == ".gz" else open
    with opener(pairs or CONCISE, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    keep = ("prompt", "chosen", "rejected")
    pairs_out, prompts_out = work / "pairs.jsonl", work / "prompts.jsonl"
    pairs_out.write_text("".join(json.dumps({k: r[k] for k in keep if k in r}) + "\n" for r in rows))
    with open(CONCISE, encoding="utf-8") as handle:
        prompts = [json.loads(line)["prompt"] for line in handle if line.strip()]
    prompts_out.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(pairs_out), str(prompts_out)


def _set_flag(cmd: list[str], flag: str, value) -> list[str]:
    cmd = list(cmd)
    cmd[cmd.index(flag) + 1] = str(value)
    return cmd


def command(job: str, side: str, spec: dict, model: str, data: tuple[str, str], out: str) -> list[str]:
    """The command line of one side of one job (module docstring)."""
    pairs, prompts = data
    alignlab = [sys.executable, "-m", "alignlab.cli"]
    if job == "dpo" and side == "alignlab":
        return alignlab + ["dpo", "--model_name_or_path", model, "--dataset_name", pairs, "--output_dir", out,
                           "--per_device_train_batch_size", str(spec["batch"]), "--max_steps", str(spec["steps"]),
                           "--max_length", str(spec["length"]), "--learning_rate", "5e-7", "--bf16", "true",
                           "--logging_steps", "1", "--save_steps", "0", "--seed", "42"]
    if job == "dpo":
        return [sys.executable, "-c", TRL_DPO_SCRIPT, model, pairs, out, out + ".json", str(spec["steps"]),
                str(spec["batch"]), str(spec["length"])]
    generations = spec.get("generations", 2)
    batch = spec["prompts"] * generations if job == "grpo" else spec["prompts"]
    if side == "alignlab":
        cmd = online_command(job, model, prompts, out, spec["steps"], spec["length"], True)
        cmd = alignlab + cmd[1:]
        cmd = _set_flag(cmd, "--per_device_train_batch_size", batch)
        return _set_flag(cmd, "--num_generations", generations) if job == "grpo" else cmd
    from grpo_vs_trl import GRPO_TEMPERATURE, LEARNING_RATE, ODPO_BETA, ODPO_TEMPERATURE, REWARD_NAME, SEED

    return [sys.executable, "-c", TRL_ONLINE_SCRIPT, job, model, prompts, out, out + ".json", str(spec["steps"]),
            str(spec["length"]), "true", str(REWARD), REWARD_NAME, str(LEARNING_RATE), str(SEED),
            str(batch), str(generations), str(GRPO_TEMPERATURE), str(batch),
            str(ODPO_TEMPERATURE), str(ODPO_BETA)]


def step_seconds(side: str, out: str, row_times: list[float]) -> list[float]:
    """Wall seconds of each optimizer step after the first."""
    if side == "alignlab":
        return [b - a for a, b in zip(row_times, row_times[1:])]
    result = json.loads(Path(out + ".json").read_text())
    if "step_ends" in result:
        ends = result["step_ends"]
        return [b - a for a, b in zip(ends, ends[1:])]
    return [s["total"] for s in result.get("steps", [])[1:]]


def run_one(job: str, side: str, spec: dict, model: str, data: tuple[str, str], work: Path) -> dict:
    """Run one side of one job as a child process; returns its measurements."""
    out = str(work / f"{job}-{side}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = command(job, side, spec, model, data, out)
    with GpuPeak() as gpu:
        run = run_measured(cmd, out, f"{side} {job}", Path(out) / "metrics.jsonl" if side == "alignlab" else None)
    steps = step_seconds(side, out, run["row_times"])
    row = {"job": job, "side": side, **{k: v for k, v in spec.items()}, "wall_seconds": round(run["wall_seconds"], 2),
           "peak_rss_mib": round(run["peak_rss_bytes"] / 2**20), "gpu_peak_mib": gpu.peak,
           "median_step_seconds": round(statistics.median(steps), 3) if steps else None, "steps_timed": len(steps)}
    if side == "alignlab":  # the decision of --gradient_checkpointing auto, or the flag the job gave
        log = Path(out + ".stderr").read_text(errors="replace")
        auto = [line.split("gradient_checkpointing auto: ", 1)[1].split()[0] for line in log.splitlines()
                if "gradient_checkpointing auto: " in line]
        given = cmd[cmd.index("--gradient_checkpointing") + 1] == "true" if "--gradient_checkpointing" in cmd else None
        row["gradient_checkpointing"] = f"{auto[0]} (auto)" if auto else ("on" if given else "off")
    else:
        result = json.loads(Path(out + ".json").read_text())
        on = result.get("gradient_checkpointing", result.get("settings", {}).get("gradient_checkpointing"))
        row["gradient_checkpointing"] = "on" if on in (True, "True", "true") else "off"
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", choices=list(FULL), default=list(FULL))
    parser.add_argument("--sides", nargs="+", choices=["alignlab", "trl"], default=["alignlab", "trl"])
    parser.add_argument("--steps", type=int, help="optimizer steps of every job (default: the job's)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps, short sequences (CI, CPU)")
    parser.add_argument("--base", type=Path, help="folder with the config and tokenizer the random models copy "
                        "(default: the embedded model's cache, alignlab prepare-model)")
    parser.add_argument("--pairs", type=Path, help="DPO pairs (JSONL, .gz too; default: the shared HH-RLHF "
                        "pairs when present, else the built-in concise pairs; --smoke: concise)")
    parser.add_argument("--work", type=Path, help="models, data, runs and results.jsonl (default: a new "
                        "temporary folder)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_vs_trl-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.base is None:
        from alignlab.models import embedded_model_path

        args.base = embedded_model_path()
    pairs = args.pairs if args.pairs or args.smoke else next((p for p in SHARED_PAIRS if p.is_file()), None)
    data = write_data(work, pairs)
    specs = SMOKE if args.smoke else FULL
    rows = []
    for job in args.jobs:
        spec = dict(specs[job], **({"steps": args.steps} if args.steps else {}))
        model = build_model(args.base, spec["shape"], work)
        for side in args.sides:
            row = run_one(job, side, spec, model, data, work)
            rows.append(row)
            with open(work / "results.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
    print(f"{'job':<11} {'side':<9} {'wall s':>8} {'step s':>8} {'GPU MiB':>8} {'RSS MiB':>8}  checkpointing")
    for r in rows:
        print(f"{r['job']:<11} {r['side']:<9} {r['wall_seconds']:>8.1f} {r['median_step_seconds'] or 0:>8.3f} "
              f"{r['gpu_peak_mib'] or 0:>8} {r['peak_rss_mib']:>8}  {r['gradient_checkpointing']}")
    print(f"results: {work / 'results.jsonl'}")
    return rows


if __name__ == "__main__":
    main()

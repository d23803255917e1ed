"""alignlab GRPO and Online DPO against TRL 1.16's GRPOTrainer and experimental OnlineDPOTrainer on the same job.

Job (the issue's "TRL 1.16 GRPO, 4 prompts x 4 generations, 64-token completions, learning rate 1e-5"):
policy = the embedded SmolLM2-135M-Instruct, from the float32 safetensors cache that ``alignlab prepare-model``
prints (both sides load that directory, in float32). Prompts: the first rows of the built-in ``concise`` set,
only its ``prompt`` column (chat messages; each side renders them with the model's chat template and the
generation prompt), written to a temporary JSONL that both sides read. Reward: the Python function
``examples/reward_funcs.py:target_length`` (TRL signature; 1 at 20 words, falling linearly), loaded by
alignlab via ``--reward_funcs`` and by TRL from the same file with ``importlib``. No reward model, no
reference model for GRPO (``beta`` 0), AdamW with a linear decay, seed 42, no checkpoints, no sample or
completion logging, no evaluation, no gradient checkpointing, no gradient accumulation, no vLLM.

* GRPO (``--algo grpo``): one optimizer step = 4 prompts x 4 generations = 16 completions of at most
  ``--max-completion-length`` (64) tokens sampled at temperature 1.0 (stop at EOS), rewards, group-normalised
  advantages (``scale_rewards="group"``), then ONE AdamW step (lr 1e-5) on the clipped surrogate (epsilon 0.2,
  ``loss_type="dapo"``, both sides' default) over the 16 completions in one micro-batch; ``num_iterations`` 1,
  so neither side computes old log-probs (the ratio is 1 at the step). Prompts per run: ``4 * steps``.
* Online DPO (``--algo online-dpo``): one optimizer step = 16 prompts x 2 completions (temperature 0.9, at most
  ``--max-completion-length`` tokens), the better-rewarded one chosen, reference log-probs from a frozen copy
  of the initial policy, then ONE AdamW step (lr 1e-5) on the sigmoid DPO loss (beta 0.1) of the 16 pairs.
  Prompts per run: ``16 * steps``.

alignlab runs as ``.venv/bin/alignlab grpo|online-dpo ...`` (the flags are in :func:`alignlab_command`); TRL
runs a small script (``TRL_SCRIPT``) under the same interpreter that runs this file (``.venv``: trl 1.16.0,
torch 2.13 CPU, transformers 5.2x; the TRL side prints the versions it ran with), which never imports alignlab.

TRL 1.16 settings that differ from its defaults, and why:

* GRPO: ``per_device_train_batch_size=16`` counts completions (as alignlab's does), so with
  ``num_generations=4`` a step holds 4 prompts. ``steps_per_generation=1`` (and ``generation_batch_size`` left
  unset, so it becomes 16 * 1): TRL 1.16 defaults ``steps_per_generation`` to ``gradient_accumulation_steps``
  (1 here), so this only pins the default; with a larger value TRL would generate once for several optimizer
  steps and compute old log-probs. ``gradient_accumulation_steps=1`` explicitly. The RepeatSampler then
  yields 4 distinct prompts x 4 per optimizer step, one generation per step (checked by the script: it
  fails unless TRL's ``generation_batch_size`` is 16 and ``steps_per_generation`` 1).
  ``disable_dropout=True`` (TRL's GRPO default is False, alignlab's True; SmolLM2 has no dropout, so this
  changes nothing but states the same job). ``log_completions`` stays False.
* Both: ``gradient_checkpointing=False`` (and ``activation_checkpointing=False``, its new name in recent
  transformers 5.x, so the deprecated alias does not warn). TRL's configs default it to True; alignlab has it
  off. It is not needed (a 135M model fits easily), and on Online DPO it would cost more than ~30% extra
  backward compute: with it on, TRL's OnlineDPOTrainer also generates with ``use_cache=False`` (no KV cache).
* Both: ``bf16`` set from ``--bf16`` (TRL's configs default it to True). With ``--bf16 true`` TRL gets
  ``bf16=True`` (accelerate bf16 autocast over float32 weights, like alignlab's ``--bf16 true``); ``auto`` is
  :func:`alignlab.train.config.fast_bf16_available` (True only with a CUDA GPU with bf16, or a CPU with AMX or
  AVX512-BF16; elsewhere bf16 is emulated, tens of times slower than float32). TRL also gets
  ``use_cpu=True`` when there is no CUDA device: transformers refuses ``bf16=True`` on a CPU without it.
* Both: ``use_vllm=False`` (the default), ``save_strategy="no"``, ``report_to="none"``, ``logging_steps=1``,
  ``seed=42``.
* Online DPO: TRL 1.16's ``OnlineDPOTrainer`` (``trl.experimental.online_dpo``) accepts Python reward
  functions through ``reward_funcs`` (called as ``fn(prompts=, completions=, completion_ids=, **columns)``), so
  the same ``target_length`` is used on both sides. Its ``max_length`` (prompt + completion kept for the
  log-prob passes, default 512) is left as is; the prompts are far shorter. TRL does its policy forward over
  all 32 sequences with gradients and the reference forward over all 32 without; alignlab does the reference
  pass in "scoring", then the gradient pass (which also gives its KL metric) in "training".

What is measured, for each side in its own process, the two one after the other:

* peak resident memory of that process (``ru_maxrss`` from ``os.wait4``) and its whole wall time (start-up,
  model loading, training, saving the final model on alignlab's side);
* per optimizer step, the wall time from the end of the previous step to the end of this one (TRL: a
  ``TrainerCallback`` taking ``time.perf_counter()`` at ``on_train_begin`` and each ``on_step_end``, written to
  a JSON file; alignlab: the moments each step's row appears in ``metrics.jsonl``, polled every 0.1 s, so its
  first step is not timed that way), split into

  - generation: sampling. TRL: ``GRPOTrainer._generate`` (prompt tokenisation, ``generate``, decoding) or
    ``OnlineDPOTrainer._generate``. alignlab: its logged ``time/generation``.
  - scoring: rewards and the no-grad passes. TRL GRPO: the rest of ``_generate_and_score_completions``
    (the reward call, reported also as "reward", advantages, metrics; no extra forward with beta 0 and one
    iteration). TRL Online DPO: ``_calculate_rewards_from_functions`` plus the reference model's ``_forward``.
    alignlab: its logged ``time/scoring``.
  - training: the rest of the step (policy forward with gradients, backward, clipping, AdamW, scheduler,
    logging). alignlab: its logged ``time/training``.

  For alignlab both the polled step time and the sum of its three logged times are shown (the difference is
  loop overhead: metrics, logging, freeing memory). Both sides' step timings are wall-clock inside the
  training process, so start-up, model loading and saving are only in the wall time. The table reports the
  mean over the steps after the first (a warm-up) when ``--steps`` > 1. The 1-minute load average before and
  after each side is printed too: on a shared 2-core machine anything else running at the same time shows up
  there, and in the timings. Completion lengths differ run to run (sampling), and step time grows with them,
  so the mean completion length of the last step is printed next to each side's reward.

    .venv/bin/python benchmarks/grpo_vs_trl.py [--steps 6] [--algo grpo|online-dpo|both] [--only alignlab|trl]
        [--bf16 auto|true|false] [--max-completion-length 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _measure import run_measured

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "src" / "alignlab" / "data" / "builtin" / "concise.jsonl"
ALIGNLAB = ROOT / ".venv" / "bin" / "alignlab"
REWARD_FILE = ROOT / "examples" / "reward_funcs.py"
REWARD_NAME = "target_length"
LEARNING_RATE = 1e-5
SEED = 42
GRPO_PROMPTS = 4          # prompts per GRPO step
NUM_GENERATIONS = 4       # completions per prompt
GRPO_BATCH = GRPO_PROMPTS * NUM_GENERATIONS  # completions per step = per_device_train_batch_size
GRPO_TEMPERATURE = 1.0
ODPO_BATCH = 16           # prompts per Online DPO step (2 completions each)
ODPO_TEMPERATURE = 0.9
ODPO_BETA = 0.1
ALGOS = {"grpo": GRPO_PROMPTS, "online-dpo": ODPO_BATCH}  # algo -> prompts per step

TRL_SCRIPT = r"""
import importlib.util, json, os, sys, time
from collections import defaultdict
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
setup_start = time.perf_counter()
import torch
import datasets
import transformers
import trl
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

(algo, model_path, train_path, out, result_path, steps, max_len, bf16, reward_file, reward_name, lr, seed,
 grpo_batch, num_generations, grpo_temperature, odpo_batch, odpo_temperature, odpo_beta) = sys.argv[1:]
steps, max_len, bf16, lr, seed = int(steps), int(max_len), bf16 == "true", float(lr), int(seed)

spec = importlib.util.spec_from_file_location("reward_funcs", reward_file)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
reward_func = getattr(module, reward_name)

rows = [{"prompt": json.loads(line)["prompt"]} for line in open(train_path, encoding="utf-8")]
train_ds = datasets.Dataset.from_list(rows)
tok = AutoTokenizer.from_pretrained(model_path)
policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

spent = defaultdict(float)   # seconds per bucket since the last step boundary
roles = {}                   # id(model) -> "ref", filled once the trainer exists

def wrap(cls, name, bucket_of):
    fn = getattr(cls, name)
    def wrapper(self, *a, **k):
        start = time.perf_counter()
        try:
            return fn(self, *a, **k)
        finally:
            spent[bucket_of(self, a, k)] += time.perf_counter() - start
    setattr(cls, name, wrapper)

common = dict(
    output_dir=out, learning_rate=lr, max_steps=steps, gradient_accumulation_steps=1, lr_scheduler_type="linear",
    bf16=bf16, fp16=False, use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, activation_checkpointing=False, use_vllm=False,
    save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True, seed=seed, dataloader_num_workers=0,
)
if algo == "grpo":
    from trl import GRPOConfig, GRPOTrainer
    Trainer = GRPOTrainer
    wrap(Trainer, "_generate", lambda s, a, k: "generation")
    wrap(Trainer, "_calculate_rewards", lambda s, a, k: "reward")
    wrap(Trainer, "_generate_and_score_completions", lambda s, a, k: "rollout")
    args = GRPOConfig(
        per_device_train_batch_size=int(grpo_batch), num_generations=int(num_generations), steps_per_generation=1,
        num_iterations=1, max_completion_length=max_len, temperature=float(grpo_temperature), top_p=1.0, beta=0.0,
        epsilon=0.2, loss_type="dapo", scale_rewards="group", disable_dropout=True, log_completions=False,
        **common,
    )
    if args.generation_batch_size != int(grpo_batch) or args.steps_per_generation != 1:
        raise SystemExit(f"TRL would generate {args.generation_batch_size} completions every "
                         f"{args.steps_per_generation} steps, not {grpo_batch} every step")
    kwargs = dict(model=policy, reward_funcs=[reward_func], args=args, train_dataset=train_ds, processing_class=tok)
else:
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    Trainer = OnlineDPOTrainer
    wrap(Trainer, "_generate", lambda s, a, k: "generation")
    wrap(Trainer, "_calculate_rewards_from_functions", lambda s, a, k: "reward")
    wrap(Trainer, "_forward", lambda s, a, k: "ref" if roles.get(id(a[0])) == "ref" else "train_forward")
    args = OnlineDPOConfig(
        per_device_train_batch_size=int(odpo_batch), max_new_tokens=max_len, temperature=float(odpo_temperature),
        top_p=1.0, beta=float(odpo_beta), loss_type="sigmoid", disable_dropout=True, **common,
    )
    kwargs = dict(model=policy, reward_funcs=[reward_func], args=args, train_dataset=train_ds, processing_class=tok)

steps_out = []

class StepTimer(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        self.last = time.perf_counter()
        spent.clear()

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        row = {"total": now - self.last, "generation": spent["generation"], "reward": spent["reward"]}
        if algo == "grpo":
            row["scoring"] = spent["rollout"] - spent["generation"]
        else:
            row["ref"] = spent["ref"]
            row["train_forward"] = spent["train_forward"]
            row["scoring"] = spent["reward"] + spent["ref"]
        row["training"] = row["total"] - row["generation"] - row["scoring"]
        steps_out.append(row)
        print(f"step {state.global_step}: " + " ".join(f"{k} {v:.2f}" for k, v in row.items()),
              file=sys.stderr, flush=True)
        spent.clear()
        self.last = time.perf_counter()

trainer = Trainer(callbacks=[StepTimer()], **kwargs)
if getattr(trainer, "ref_model", None) is not None:
    roles[id(trainer.ref_model)] = "ref"
    roles[id(getattr(trainer.ref_model, "module", trainer.ref_model))] = "ref"
setup_seconds = time.perf_counter() - setup_start
start = time.perf_counter()
trainer.train()
train_seconds = time.perf_counter() - start
logs = [r for r in trainer.state.log_history if "loss" in r]
settings = {k: getattr(args, k, None) for k in (
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_generations", "generation_batch_size",
    "steps_per_generation", "num_iterations", "max_completion_length", "max_new_tokens", "temperature", "beta",
    "loss_type", "scale_rewards", "learning_rate", "bf16", "gradient_checkpointing", "activation_checkpointing",
    "use_vllm", "disable_dropout")}
with open(result_path, "w", encoding="utf-8") as handle:
    json.dump({
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {k: v for k, v in settings.items() if v is not None}, "device": str(trainer.accelerator.device),
        "steps": steps_out, "setup_seconds": setup_seconds, "train_seconds": train_seconds,
        "last_log": logs[-1] if logs else None,
    }, handle, default=str)
"""


def alignlab_command(algo: str, model_path: str, train: str, out: str, steps: int, max_len: int,
                     bf16: bool) -> list[str]:
    """The ``alignlab grpo|online-dpo`` command line of the job."""
    cmd = [
        str(ALIGNLAB), algo, "--model_name_or_path", model_path, "--dataset_name", train, "--output_dir", out,
        "--reward_funcs", f"{REWARD_FILE}:{REWARD_NAME}", "--max_steps", str(steps), "--learning_rate",
        str(LEARNING_RATE), "--gradient_accumulation_steps", "1", "--bf16", "true" if bf16 else "false",
        "--gradient_checkpointing", "false", "--save_steps", "0", "--logging_steps", "1", "--sample_steps", "0",
        "--seed", str(SEED), "--top_p", "1.0",
    ]
    if algo == "grpo":
        cmd += ["--num_generations", str(NUM_GENERATIONS), "--per_device_train_batch_size", str(GRPO_BATCH),
                "--max_completion_length", str(max_len), "--temperature", str(GRPO_TEMPERATURE), "--beta", "0.0",
                "--num_iterations", "1", "--loss_type", "dapo", "--scale_rewards", "group"]
    else:
        cmd += ["--per_device_train_batch_size", str(ODPO_BATCH), "--max_new_tokens", str(max_len),
                "--temperature", str(ODPO_TEMPERATURE), "--beta", str(ODPO_BETA), "--loss_type", "sigmoid"]
    return cmd


def child(side: str, algo: str, model_path: str, train: str, out: str, steps: int, max_len: int, bf16: bool) -> None:
    """Run one side as a direct child and print its timings and peak RSS as JSON (used by main)."""
    result_path = Path(out + ".json")
    if side == "alignlab":
        cmd = alignlab_command(algo, model_path, train, out, steps, max_len, bf16)
    else:
        cmd = [sys.executable, "-c", TRL_SCRIPT, algo, model_path, train, out, str(result_path), str(steps),
               str(max_len), "true" if bf16 else "false", str(REWARD_FILE), REWARD_NAME, str(LEARNING_RATE),
               str(SEED), str(GRPO_BATCH), str(NUM_GENERATIONS), str(GRPO_TEMPERATURE), str(ODPO_BATCH),
               str(ODPO_TEMPERATURE), str(ODPO_BETA)]
    metrics = Path(out) / "metrics.jsonl"
    run = run_measured(cmd, out, f"{side} {algo}", metrics if side == "alignlab" else None)
    row_times, wall = run["row_times"], run["wall_seconds"]
    result = {"side": side, "algo": algo, "wall_seconds": wall, "peak_rss_bytes": run["peak_rss_bytes"],
              "load_before_after": run["load_before_after"], "command": cmd[:2] if side == "trl" else cmd}
    if side == "trl":
        result.update(json.loads(result_path.read_text()))
    else:
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "time/generation" in r]  # training rows (an eval row would lack it)
        result["last_log"] = rows[-1] if rows else None
        result["steps"] = []
        for i, row in enumerate(rows):
            step = {"total": row_times[i] - row_times[i - 1] if 0 < i < len(row_times) else None,
                    "generation": row.get("time/generation"), "scoring": row.get("time/scoring"),
                    "training": row.get("time/training")}
            parts = (step["generation"], step["scoring"], step["training"])
            step["logged_sum"] = sum(parts) if None not in parts else None
            if step["training"] is None and None not in (step["total"], step["generation"], step["scoring"]):
                step["training"] = step["total"] - step["generation"] - step["scoring"]
            result["steps"].append(step)
        if len(rows) != steps:
            result["note"] = f"{len(rows)} metrics rows for {steps} steps"
    print(json.dumps(result))


KEYS = ("total", "logged_sum", "generation", "scoring", "reward", "ref", "training", "train_forward")


def step_means(steps: list[dict], wall: float) -> dict:
    """Mean of each bucket over the steps after the first (warm-up) when there are several."""
    use = steps[1:] if len(steps) > 1 else steps
    means: dict = {}
    for key in KEYS:
        values = [s[key] for s in use if s.get(key) is not None]
        means[key] = sum(values) / len(values) if values else None
    if means["total"] is None and means["logged_sum"] is not None:  # one alignlab step: nothing polled
        means["total"] = means["logged_sum"]
        means["total_is_logged_sum"] = True
    if means["total"] is None and steps:
        means["total"] = wall / len(steps)
        means["total_is_wall"] = True
    return means


def fmt(value: float | None, width: int = 9, digits: int = 2) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def reward_and_length(log: dict | None) -> str:
    """The last logged mean reward and mean completion length, where the side logs them."""
    if not log:
        return ""
    reward = next((log[k] for k in ("reward", "objective/scores", f"rewards/{REWARD_NAME}/mean") if k in log), None)
    length = log.get("completions/mean_length")
    parts = [f"reward {reward:.3f}" if isinstance(reward, (int, float)) else "",
             f"mean completion length {length:.1f} tokens" if isinstance(length, (int, float)) else ""]
    return ", ".join(p for p in parts if p)


def prepare_model() -> str:
    """Path of the embedded model's safetensors cache, as ``alignlab prepare-model`` prints it."""
    res = subprocess.run([str(ALIGNLAB), "prepare-model"], capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit("alignlab prepare-model failed")
    return res.stdout.strip().splitlines()[-1]


def resolve_bf16(value: str) -> bool:
    if value != "auto":
        return value == "true"
    sys.path.insert(0, str(ROOT / "src"))
    from alignlab.train.config import fast_bf16_available

    return fast_bf16_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per side (default 6)")
    parser.add_argument("--only", choices=["alignlab", "trl"], help="run one side only")
    parser.add_argument("--algo", choices=["grpo", "online-dpo", "both"], default="grpo")
    parser.add_argument("--bf16", choices=["auto", "true", "false"], default="auto",
                        help="bf16 autocast on both sides; auto: only where bf16 matmuls are fast (default auto)")
    parser.add_argument("--max-completion-length", type=int, default=64,
                        help="most tokens per completion, both algos (default 64; small values for a quick check)")
    parser.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, algo, model_path, train, out, steps, max_len, bf16 = args.child
        child(side, algo, model_path, train, out, int(steps), int(max_len), bf16 == "true")
        return
    if args.steps < 1 or args.max_completion_length < 1:
        raise SystemExit("--steps and --max-completion-length must be >= 1")

    bf16 = resolve_bf16(args.bf16)
    print(f"precision: {'bf16 autocast (float32 weights)' if bf16 else 'float32'} on both sides "
          f"(--bf16 {args.bf16}{', resolved by fast_bf16_available()' if args.bf16 == 'auto' else ''})")
    model_path = prepare_model()
    print(f"model: {model_path}")
    rows = PROMPTS.read_text().splitlines()
    algos = ["grpo", "online-dpo"] if args.algo == "both" else [args.algo]
    results: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for algo in algos:
            n_prompts = ALGOS[algo] * args.steps
            if len(rows) < n_prompts:
                raise SystemExit(f"{PROMPTS} has {len(rows)} rows; {n_prompts} needed")
            train = Path(tmp) / f"{algo}-prompts.jsonl"
            train.write_text("".join(json.dumps({"prompt": json.loads(r)["prompt"]}) + "\n" for r in rows[:n_prompts]))
            per_step = (f"{GRPO_PROMPTS} prompts x {NUM_GENERATIONS} generations" if algo == "grpo"
                        else f"{ODPO_BATCH} prompts x 2 completions")
            print(f"\n== {algo}: {args.steps} steps of {per_step}, <= {args.max_completion_length} tokens each, "
                  f"lr {LEARNING_RATE:g}, {n_prompts} prompts ==", flush=True)
            for side in ("alignlab", "trl"):
                if args.only and side != args.only:
                    continue
                out = Path(tmp) / f"{algo}-{side}"
                res = subprocess.run(
                    [sys.executable, __file__, "--child", side, algo, model_path, str(train), str(out),
                     str(args.steps), str(args.max_completion_length), "true" if bf16 else "false"],
                    capture_output=True, text=True,
                )
                if res.returncode != 0:
                    sys.stderr.write(res.stderr[-6000:])
                    raise SystemExit(f"{side} {algo} failed")
                r = results[(algo, side)] = json.loads(res.stdout.strip().splitlines()[-1])
                r["means"] = step_means(r["steps"], r["wall_seconds"])
                for i, s in enumerate(r["steps"], 1):
                    extra = "".join(f" {k} {s[k]:.2f}" for k in ("reward", "ref") if s.get(k) is not None)
                    logged = f"  (logged sum {s['logged_sum']:.2f})" if s.get("logged_sum") is not None else ""
                    print(f"{side:9s} step {i}: total {fmt(s['total'], 6)}{logged}  generation "
                          f"{fmt(s['generation'], 6)}  scoring {fmt(s['scoring'], 6)}"
                          f"{' (' + extra.strip() + ')' if extra else ''}  training {fmt(s['training'], 6)}  seconds",
                          flush=True)
                before, after = r["load_before_after"]
                print(f"{side:9s} 1-min load average before {before:.2f}, at the end {after:.2f} "
                      f"(this side alone keeps it near {os.cpu_count()}; more means something else ran too)")
                summary = reward_and_length(r.get("last_log"))
                if summary:
                    print(f"{side:9s} last step: {summary}")
                if side == "trl":
                    print(f"{side:9s} versions {r['versions']}, device {r['device']}, settings {r['settings']}")
                if r.get("note"):
                    print(f"{side:9s} note: {r['note']}")

    window = "steps 2.." if args.steps > 1 else "step 1"
    print(f"\nper optimizer step, mean over {window} of {args.steps} (seconds); peak RSS and wall time of the "
          f"whole process; {'bf16' if bf16 else 'float32'}, completions <= {args.max_completion_length} tokens")
    print(f"{'algo':10s} {'side':9s} {'step':>7s} {'logged':>7s} {'generation':>10s} {'scoring':>8s} "
          f"{'training':>8s} {'peak RSS':>10s} {'wall':>8s}")
    for (algo, side), r in results.items():
        m = r["means"]
        note = ("  (step = logged sum)" if m.get("total_is_logged_sum")
                else "  (step = process wall / steps)" if m.get("total_is_wall") else "")
        print(f"{algo:10s} {side:9s} {fmt(m['total'], 7)} {fmt(m['logged_sum'], 7)} {fmt(m['generation'], 10)} "
              f"{fmt(m['scoring'], 8)} {fmt(m['training'], 8)} {r['peak_rss_bytes'] / 2**30:6.2f} GiB "
              f"{r['wall_seconds']:7.1f}s{note}")
    print("(logged: alignlab's time/generation + time/scoring + time/training; step: polled between metrics rows)")
    for algo in algos:
        a, t = results.get((algo, "alignlab")), results.get((algo, "trl"))
        if a and t:
            print(f"{algo}: speed-up per step (TRL / alignlab) {t['means']['total'] / a['means']['total']:.2f}x; "
                  f"wall {t['wall_seconds'] / a['wall_seconds']:.2f}x; "
                  f"memory ratio (alignlab peak / TRL peak) {a['peak_rss_bytes'] / t['peak_rss_bytes']:.2f}")


if __name__ == "__main__":
    main()

"""alignlab PPO against TRL 0.24's PPOTrainer on the same job, with the time of each PPO step split up.

Job: the embedded SmolLM2-135M-Instruct as policy and reference; reward model and value model both a
sequence classifier (``num_labels=1``) built from the same checkpoint with a freshly initialised scalar
head (``torch.manual_seed(0)``), saved once to a temporary directory and loaded by both sides, so both
score with identical weights. Prompts: the first ``16 * steps`` rows of the built-in ``concise`` set
(chat messages, rendered with the model's chat template and the generation prompt). One PPO step = one
rollout of 16 prompts, 64-token responses (temperature 0.7, stop at EOS), then 4 PPO epochs of one
mini-batch of 16 (one AdamW step each), lr 1e-5 with a linear decay, kl_coef 0.05, float32 on the CPU
(no bf16; ``--bf16 true``: bf16 autocast on both sides), no checkpoints, no sample generations.

TRL 0.24.0 (the last release with ``PPOTrainer`` in its main package) runs in its own virtual env,
``/work/venvs/trl024`` (torch 2.13.0 CPU, transformers 5.23.0; see ``--trl-python``); it never imports
alignlab. alignlab runs as ``.venv/bin/alignlab ppo ...`` with the same settings.

What is measured, for each side in its own process, the two one after the other:

* peak resident memory of that process (``ru_maxrss`` from ``os.wait4``) and its whole wall time;
* per PPO step, from the step's start to its end (TRL: between consecutive ``on_step_end`` callbacks,
  the first from ``on_train_begin``; alignlab: between the moments each step's row appears in
  ``metrics.jsonl``, polled every 0.1 s, so its first step is not timed), split into

  - generation: sampling the 16 responses. TRL: its ``batch_generation`` (``generate`` with the
    per-token logits kept, which TRL reuses as the old log-probs). alignlab: ``time/generation``.
  - scoring: the no-grad forwards of the rollout. TRL: the reference policy's forward (``forward`` on the
    ref model) plus the value model's and the reward model's forwards (``get_reward``), reported also
    one by one. alignlab: ``time/scoring``. Since 2026-12-02 alignlab, like TRL, takes the policy's old
    log-probs from ``generate``'s scores (top_p 1); before, "scoring" also held one more policy forward.
  - training: the rest of the step. TRL: old log-probs from the generation logits, KL penalty, GAE and
    whitening, the 4 PPO epochs (policy+value forward, backward, AdamW step), metrics, logging and
    TRL's ``gc.collect``/``empty_cache``. alignlab: ``time/training`` when it logs one, else the step's
    time less generation and scoring.

  Both sides' step timings are wall-clock inside the training process, so start-up, model loading and
  saving are not in them (they are in the wall time). The table reports the mean over the steps after
  the first (a warm-up) when ``--steps`` > 1. The 1-minute load average before and after each side is
  printed too: on a shared 2-core machine anything else running at the same time shows up there, and in
  the timings.

The TRL side's timing comes from monkeypatching ``trl.trainer.ppo_trainer.batch_generation``,
``.get_reward`` and ``.forward`` (module-level functions that ``PPOTrainer.train`` calls) with timing
wrappers, and a ``TrainerCallback``. Notes on TRL 0.24 with transformers 5.23: ``PPOTrainer`` is given an
``eval_dataset`` (8 more prompts; never used, since ``num_sample_generations=0``) because it builds an
eval DataLoader from it unconditionally (without one it fails after the first step); ``bf16=False`` is passed explicitly because TRL's on-policy config turns
bf16 on by default; its ``gradient_checkpointing=True`` default is never applied by ``PPOTrainer``
(it does not run ``Trainer.__init__``), so both sides train without it. With pad == EOS (id 2, as in this
model), TRL treats the prompt's own ``<|im_end|>`` tokens as padding in its attention masks.

    .venv/bin/python benchmarks/ppo_vs_trl.py [--steps 3] [--only alignlab|trl] [--trl-python PATH]
        [--bf16 false|true]

``--bf16 true`` runs both sides in bf16 autocast over float32 weights (TRL: ``bf16=True``); the default is
float32, as in the issue. ``ALIGNLAB_BF16=true|false`` in the environment overrides the alignlab side alone.
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
TRL_PYTHON = Path("/work/venvs/trl024/bin/python")
BATCH = 16
EVAL_ROWS = 8
RESPONSE_LENGTH = 64
PPO_EPOCHS = 4
LEARNING_RATE = 1e-5

REWARD_MODEL_SCRIPT = r"""
import sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model_path, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(model_path)
rm = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
rm.config.pad_token_id = tok.pad_token_id
rm.save_pretrained(out)
tok.save_pretrained(out)
"""

TRL_SCRIPT = r"""
import json, os, sys, time
from collections import defaultdict
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
setup_start = time.perf_counter()
import torch
import datasets
import trl
import trl.trainer.ppo_trainer as ppo_module
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          TrainerCallback)
from trl import PPOConfig, PPOTrainer

(model_path, rm_path, train_path, eval_path, out, steps, batch, response_length, ppo_epochs,
 lr) = sys.argv[1:]
steps, batch, response_length, ppo_epochs, lr = int(steps), int(batch), int(response_length), int(ppo_epochs), float(lr)

tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")

def encode(path):
    ids = []
    for line in open(path):
        messages = json.loads(line)["prompt"]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids.append(tok(text, add_special_tokens=False)["input_ids"])
    return datasets.Dataset.from_dict({"input_ids": ids})

train_ds, eval_ds = encode(train_path), encode(eval_path)
policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
ref_policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
reward_model = AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1, dtype=torch.float32)
value_model = AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1, dtype=torch.float32)
for m in (reward_model, value_model):
    m.config.pad_token_id = tok.pad_token_id

args = PPOConfig(
    output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_mini_batches=1,
    num_ppo_epochs=ppo_epochs, response_length=response_length, temperature=0.7, stop_token="eos",
    learning_rate=lr, kl_coef=0.05, local_rollout_forward_batch_size=batch, total_episodes=batch * steps,
    num_sample_generations=0, per_device_eval_batch_size=len(eval_ds), report_to="none", save_strategy="no",
    logging_steps=1, disable_tqdm=True, bf16=os.environ.get("TRL_BF16") == "true", fp16=False,
    gradient_checkpointing=False, use_cpu=True,
    seed=42,
)

spent = defaultdict(float)   # seconds per bucket since the last step boundary
roles = {}                   # id(model) -> bucket, filled once the trainer exists

def timed(fn, bucket_of):
    def wrapper(*a, **k):
        start = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[bucket_of(a)] += time.perf_counter() - start
    return wrapper

ppo_module.batch_generation = timed(ppo_module.batch_generation, lambda a: "generation")
ppo_module.get_reward = timed(ppo_module.get_reward, lambda a: roles.get(id(a[0]), "value"))
ppo_module.forward = timed(ppo_module.forward, lambda a: roles.get(id(a[0]), "train_forward"))

steps_out = []

class StepTimer(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        self.last = time.perf_counter()
        spent.clear()

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        row = {"total": now - self.last, "generation": spent["generation"], "reward": spent["reward"],
               "value": spent["value"], "ref": spent["ref"], "train_forward": spent["train_forward"]}
        row["scoring"] = row["reward"] + row["value"] + row["ref"]
        row["training"] = row["total"] - row["generation"] - row["scoring"]
        steps_out.append(row)
        print(f"step {state.global_step}: " + " ".join(f"{k} {v:.1f}" for k, v in row.items()),
              file=sys.stderr, flush=True)
        spent.clear()
        self.last = time.perf_counter()

trainer = PPOTrainer(
    args=args, processing_class=tok, model=policy, ref_model=ref_policy, reward_model=reward_model,
    value_model=value_model, train_dataset=train_ds, eval_dataset=eval_ds, callbacks=[StepTimer()],
)
roles[id(trainer.reward_model)] = "reward"
roles[id(trainer.ref_model)] = "ref"
setup_seconds = time.perf_counter() - setup_start
start = time.perf_counter()
trainer.train()
train_seconds = time.perf_counter() - start
start = time.perf_counter()
save_error = None
try:  # the policy, as TRL's example script does; alignlab saves its final model too
    trainer.save_model(out)
except Exception as exc:  # noqa: BLE001 - report, keep the timings
    save_error = repr(exc)
save_seconds = time.perf_counter() - start
logs = [r for r in trainer.state.log_history if "objective/scores" in r]
print(json.dumps({
    "versions": {"trl": trl.__version__, "torch": torch.__version__,
                 "transformers": __import__("transformers").__version__},
    "steps": steps_out, "setup_seconds": setup_seconds, "train_seconds": train_seconds,
    "save_seconds": save_seconds, "save_error": save_error, "last_log": logs[-1] if logs else None,
}))
"""


def child(side: str, model_path: str, rm_dir: str, train: str, evalset: str, out: str, steps: int,
          trl_python: str) -> None:
    """Run one side as a direct child and print its timings and peak RSS as JSON (used by main)."""
    if side == "alignlab":
        cmd = [
            str(ROOT / ".venv" / "bin" / "alignlab"), "ppo",
            "--model_name_or_path", model_path, "--dataset_name", train, "--output_dir", out,
            "--reward_model_path", rm_dir, "--max_steps", str(steps),
            "--per_device_train_batch_size", str(BATCH), "--num_mini_batches", "1",
            "--num_ppo_epochs", str(PPO_EPOCHS), "--response_length", str(RESPONSE_LENGTH),
            "--learning_rate", str(LEARNING_RATE), "--bf16", os.environ.get("ALIGNLAB_BF16", "false"), "--save_steps", "0",
            "--logging_steps", "1", "--sample_steps", "0",
        ]
    else:
        cmd = [trl_python, "-c", TRL_SCRIPT, model_path, rm_dir, train, evalset, out, str(steps), str(BATCH),
               str(RESPONSE_LENGTH), str(PPO_EPOCHS), str(LEARNING_RATE)]
    metrics = Path(out) / "metrics.jsonl"
    run = run_measured(cmd, out, side, metrics if side == "alignlab" else None)
    row_times, wall = run["row_times"], run["wall_seconds"]
    result = {"side": side, "wall_seconds": wall, "peak_rss_bytes": run["peak_rss_bytes"],
              "load_before_after": run["load_before_after"]}
    if side == "trl":
        result.update(json.loads(Path(out + ".stdout").read_text().strip().splitlines()[-1]))
    else:
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        result["last_log"] = rows[-1] if rows else None
        result["steps"] = []
        for i, row in enumerate(rows):
            total = row_times[i] - row_times[i - 1] if 0 < i < len(row_times) else None
            step = {"total": total, "generation": row.get("time/generation"), "scoring": row.get("time/scoring"),
                    "training": row.get("time/training")}
            if step["training"] is None and None not in (total, step["generation"], step["scoring"]):
                step["training"] = total - step["generation"] - step["scoring"]
            if step["total"] is None and None not in (step["generation"], step["scoring"], step["training"]):
                step["total"] = step["generation"] + step["scoring"] + step["training"]
            result["steps"].append(step)
        if len(rows) != steps:
            result["note"] = f"{len(rows)} metrics rows for {steps} steps"
    print(json.dumps(result))


def step_means(steps: list[dict], wall: float) -> dict:
    """Mean of each bucket over the timed steps after the first (warm-up) when there are several."""
    use = steps[1:] if len(steps) > 1 else steps
    means = {}
    for key in ("total", "generation", "scoring", "training", "reward", "value", "ref", "train_forward"):
        values = [s[key] for s in use if s.get(key) is not None]
        means[key] = sum(values) / len(values) if values else None
    if means["total"] is None and steps:  # nothing timed per step: the whole process over the steps
        means["total"] = wall / len(steps)
        means["total_is_wall"] = True
    return means


def fmt(value: float | None, width: int = 9) -> str:
    return f"{value:{width}.1f}" if value is not None else f"{'-':>{width}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", choices=["alignlab", "trl"])
    parser.add_argument("--trl-python", default=str(TRL_PYTHON), help="python of a venv with trl==0.24.0")
    parser.add_argument("--bf16", choices=["false", "true"], default="false",
                        help="bf16 autocast on both sides (default false: float32, the issue's setting)")
    parser.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, model_path, rm_dir, train, evalset, out, steps, trl_python = args.child
        child(side, model_path, rm_dir, train, evalset, out, int(steps), trl_python)
        return

    os.environ["TRL_BF16"] = args.bf16  # read by the TRL script
    os.environ.setdefault("ALIGNLAB_BF16", args.bf16)  # an explicit ALIGNLAB_BF16 still wins
    print(f"precision: TRL {'bf16 autocast' if args.bf16 == 'true' else 'float32'}, alignlab "
          f"{'bf16 autocast' if os.environ['ALIGNLAB_BF16'] == 'true' else 'float32'}")
    sys.path.insert(0, str(ROOT / "src"))
    from alignlab.models import embedded_model_path

    model_path = str(embedded_model_path())
    rows = PROMPTS.read_text().splitlines()
    n_train = BATCH * args.steps
    if len(rows) < n_train + EVAL_ROWS:
        raise SystemExit(f"{PROMPTS} has {len(rows)} rows; {n_train + EVAL_ROWS} needed")
    with tempfile.TemporaryDirectory() as tmp:
        train, evalset = Path(tmp) / "prompts.jsonl", Path(tmp) / "eval.jsonl"
        train.write_text("".join(json.dumps({"prompt": json.loads(r)["prompt"]}) + "\n" for r in rows[:n_train]))
        evalset.write_text(
            "".join(json.dumps({"prompt": json.loads(r)["prompt"]}) + "\n" for r in rows[n_train : n_train + EVAL_ROWS])
        )
        rm_dir = Path(tmp) / "reward-model"
        made = subprocess.run([sys.executable, "-c", REWARD_MODEL_SCRIPT, model_path, str(rm_dir)],
                              capture_output=True, text=True)
        if made.returncode != 0:
            sys.stderr.write(made.stderr[-4000:])
            raise SystemExit("building the reward model failed")
        results = {}
        for side in ("alignlab", "trl"):
            if args.only and side != args.only:
                continue
            res = subprocess.run(
                [sys.executable, __file__, "--child", side, model_path, str(rm_dir), str(train), str(evalset),
                 str(Path(tmp) / side), str(args.steps), args.trl_python],
                capture_output=True, text=True,
            )
            if res.returncode != 0:
                sys.stderr.write(res.stderr[-6000:])
                raise SystemExit(f"{side} failed")
            r = results[side] = json.loads(res.stdout.strip().splitlines()[-1])
            r["means"] = step_means(r["steps"], r["wall_seconds"])
            for i, s in enumerate(r["steps"], 1):
                parts = "".join(f" {k} {s[k]:.1f}" for k in ("ref", "value", "reward") if s.get(k) is not None)
                fwd = f" (of it policy+value forwards {s['train_forward']:.1f})" if s.get("train_forward") else ""
                print(f"{side:9s} step {i}: total {fmt(s['total'], 6)}  generation {fmt(s['generation'], 6)}  "
                      f"scoring {fmt(s['scoring'], 6)}{' (' + parts.strip() + ')' if parts else ''}  "
                      f"training {fmt(s['training'], 6)}{fwd}  seconds", flush=True)
            before, after = r["load_before_after"]
            print(f"{side:9s} 1-min load average before {before:.2f}, at the end {after:.2f} "
                  f"(this side alone keeps it near {os.cpu_count()}; more means something else ran too)")
            if r.get("note"):
                print(f"{side:9s} note: {r['note']}")
            if r.get("save_error"):
                print(f"{side:9s} saving the final model failed: {r['save_error']}")

        window = "steps 2.." if args.steps > 1 else "step 1"
        print(f"\nper PPO step, mean over {window} of {args.steps} (seconds); peak RSS of the whole process")
        print(f"{'side':9s} {'step':>9s} {'generation':>11s} {'scoring':>9s} {'training':>9s} {'peak RSS':>10s} {'wall':>8s}")
        for side, r in results.items():
            m = r["means"]
            note = "  (step = process wall / steps)" if m.get("total_is_wall") else ""
            print(f"{side:9s} {fmt(m['total'])} {fmt(m['generation'], 11)} {fmt(m['scoring'])} {fmt(m['training'])} "
                  f"{r['peak_rss_bytes'] / 2**30:6.2f} GiB {r['wall_seconds']:7.1f}s{note}")
        if "trl" in results and results["trl"]["means"].get("ref") is not None:
            m = results["trl"]["means"]
            print(f"TRL scoring = ref {m['ref']:.1f} + value {m['value']:.1f} + reward {m['reward']:.1f} s; "
                  f"its training includes {m['train_forward']:.1f} s of policy+value forwards")
        if len(results) == 2:
            a, t = results["alignlab"], results["trl"]
            print(f"speed-up per step (TRL / alignlab): {t['means']['total'] / a['means']['total']:.2f}x")
            print(f"memory ratio (alignlab peak / TRL peak): {a['peak_rss_bytes'] / t['peak_rss_bytes']:.2f}")


if __name__ == "__main__":
    main()

"""alignlab reward modelling against TRL's RewardTrainer on the same job: held-out accuracy side by side.

Job: the embedded SmolLM2-135M-Instruct as a sequence classifier (``num_labels=1``) trained with the
Bradley-Terry loss on the shared HH-RLHF harmless pairs (``../shared/data/hh-rlhf-harmless/pairs-2000.jsonl.gz``,
implicit-prompt transcripts). A seeded shuffle (seed 42) holds out 200 rows for evaluation; the other 1800
are the training rows. Both sides get the same two files (``train.jsonl``, ``eval.jsonl``) and the same
budget: 50 optimizer steps of 8 pairs, ``max_length`` 512 (pairs with a longer chosen or rejected sequence
are dropped by both: alignlab's ``truncation_mode`` "drop", TRL's max_length filter), seed 42, bf16
autocast with float32 weights, linear decay from each library's default learning rate (1e-4 for both), no
warm-up, no weight decay, gradient clipping at 1.0, dropout off, eval batch 8, final model saved.
Gradient checkpointing is each library's default: on in TRL 1.16, off in alignlab.

Held-out accuracy is the fraction of evaluated pairs whose chosen answer scores strictly above the
rejected one, after the final step. alignlab's number is ``eval_accuracy`` from the last eval row of its
``metrics.jsonl`` (a mean over pairs). TRL's ``eval_accuracy`` from ``trainer.evaluate()`` is a mean of
per-batch accuracies, which weighs a short last batch like a full one; the TRL side therefore also counts
the pairs itself during that same evaluation (a subclass that only records the rewards TRL computes) and
the table shows that pair-weighted figure too. Known differences the data cannot remove: the order in which
training pairs are drawn, alignlab dropping pairs whose chosen and rejected answers are identical, and
where the score is read (alignlab: the last real token, the appended EOS; transformers' sequence
classifier, used by TRL: the last token that is not the pad token, which for SmolLM2, whose pad token is
its EOS, is the token before the EOS).

Each side runs in its own process (alignlab through its CLI, TRL through a small script); the wall time
is that whole process's (start-up, model and data loading, training, evaluation and saving included) and
the peak memory is its ``ru_maxrss`` from ``os.wait4``. The two run one after the other, never at the
same time.

    .venv/bin/python benchmarks/reward_vs_trl.py [--steps 50] [--batch 8] [--max_length 512]
        [--eval_rows 200] [--train_rows N] [--only alignlab|trl]

A quick check: ``--steps 2 --eval_rows 16 --train_rows 64``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_PAIRS = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs-2000.jsonl.gz"
SEED = 42

TRL_SCRIPT = r"""
import json, sys, time
import datasets, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
from trl import RewardConfig, RewardTrainer

spec = json.loads(sys.argv[1])


class CountingRewardTrainer(RewardTrainer):
    # TRL's RewardTrainer unchanged; records chosen > rejected per pair while evaluating.
    hits = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if not self.model.training:
            chosen, rejected = outputs.logits.squeeze(-1).float().chunk(2)
            self.hits.extend((chosen > rejected).tolist())
        return (loss, outputs) if return_outputs else loss


def load(path):
    with open(path) as handle:
        return datasets.Dataset.from_list([json.loads(line) for line in handle])


train_ds, eval_ds = load(spec["train"]), load(spec["eval"])
tok = AutoTokenizer.from_pretrained(spec["model"])
set_seed(spec["seed"])  # RewardTrainer seeds before loading a model it loads itself; the score head is random
model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
model.config.pad_token_id = tok.pad_token_id
args = RewardConfig(
    output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
    per_device_eval_batch_size=spec["batch"], max_length=spec["max_length"], seed=spec["seed"],
    bf16=True, use_cpu=True, logging_steps=10, eval_strategy="no", save_strategy="no",
    report_to="none", disable_tqdm=True,
)
trainer = CountingRewardTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                processing_class=tok)
t = time.perf_counter()
trainer.train()
train_s = time.perf_counter() - t
metrics = trainer.evaluate()
trainer.save_model(spec["out"])
hits = CountingRewardTrainer.hits
assert len(hits) == len(trainer.eval_dataset), (len(hits), len(trainer.eval_dataset))
print(json.dumps({
    "accuracy": metrics["eval_accuracy"],
    "pair_accuracy": sum(hits) / len(hits),
    "eval_loss": metrics["eval_loss"],
    "eval_pairs": len(trainer.eval_dataset),
    "train_pairs": len(trainer.train_dataset),
    "train_seconds": train_s,
    "learning_rate": args.learning_rate,
    "gradient_checkpointing": args.gradient_checkpointing,
    "bf16": args.bf16,
}))
"""

PAIRS_LINE = re.compile(r"(train|eval) data.*?: (\d+) rows -> (\d+) pairs \((\d+) dropped with chosen == rejected, "
                        r"\d+ truncated, (\d+) dropped as too long")


def alignlab_result(out: Path, stdout: str, stderr: str) -> dict:
    """The alignlab side's numbers: last eval row of ``metrics.jsonl``, pair counts from its log."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval_accuracy" in r]
    if not evals:
        raise SystemExit(f"alignlab wrote no eval row to {out / 'metrics.jsonl'}")
    counts = {m[1]: m for m in PAIRS_LINE.finditer(stderr)}
    config = (out / "config.yaml").read_text()
    train_time = re.search(r"train time: ([\d.]+) s", stdout)

    def setting(name: str) -> str:
        found = re.search(rf"^{name}: (.*)$", config, re.M)
        return found[1] if found else "?"

    return {
        "accuracy": evals[-1]["eval_accuracy"],
        "pair_accuracy": evals[-1]["eval_accuracy"],
        "eval_loss": evals[-1]["eval_loss"],
        "eval_pairs": int(counts["eval"][3]) if "eval" in counts else None,
        "train_pairs": int(counts["train"][3]) if "train" in counts else None,
        "dropped_identical": {k: int(m[4]) for k, m in counts.items()},
        "train_seconds": float(train_time[1]) if train_time else None,
        "learning_rate": setting("learning_rate"),
        "gradient_checkpointing": setting("gradient_checkpointing"),
        "bf16": setting("bf16"),
    }


def child(side: str, spec: dict) -> None:
    """Run one side as a direct child; print its wall time, peak RSS and results as one JSON line."""
    tmp, out = Path(spec["tmp"]), Path(spec["out"])
    if side == "alignlab":
        cmd = [
            str(ROOT / ".venv" / "bin" / "alignlab"), "reward",
            "--model_name_or_path", spec["model"],
            "--dataset_name", spec["train"], "--eval_dataset_name", spec["eval"], "--output_dir", str(out),
            "--max_steps", str(spec["steps"]), "--per_device_train_batch_size", str(spec["batch"]),
            "--per_device_eval_batch_size", str(spec["batch"]), "--max_length", str(spec["max_length"]),
            "--seed", str(spec["seed"]), "--save_steps", "0", "--logging_steps", "10",
        ]
    else:
        cmd = [sys.executable, "-c", TRL_SCRIPT, json.dumps(spec)]
    # Output goes to files, not pipes: a pipe nobody reads until the child exits could fill and block it.
    stdout_path, stderr_path = tmp / f"{side}.stdout", tmp / f"{side}.stderr"
    with open(stdout_path, "w") as so, open(stderr_path, "w") as se:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    stdout, stderr = stdout_path.read_text(), stderr_path.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"{side} failed with exit code {os.waitstatus_to_exitcode(status)}")
    if side == "alignlab":
        result = alignlab_result(out, stdout, stderr)
    else:
        result = json.loads(stdout.strip().splitlines()[-1])
    result.update(side=side, wall_seconds=wall, peak_rss_bytes=usage.ru_maxrss * 1024)
    print(json.dumps(result))


def split_rows(eval_rows: int, train_rows: int | None) -> tuple[list[str], list[str]]:
    """Seeded shuffle of the shared pairs; the first ``eval_rows`` are held out, the rest (or the first
    ``train_rows`` of them) are for training."""
    with gzip.open(SHARED_PAIRS, "rt", encoding="utf-8") as src:
        lines = [line if line.endswith("\n") else line + "\n" for line in src if line.strip()]
    order = list(range(len(lines)))
    random.Random(SEED).shuffle(order)
    held, rest = order[:eval_rows], order[eval_rows:]
    if train_rows is not None:
        rest = rest[:train_rows]
    return [lines[i] for i in rest], [lines[i] for i in held]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps (default 50)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step and per eval batch (default 8)")
    parser.add_argument("--max_length", type=int, default=512, help="longer pairs are dropped (default 512)")
    parser.add_argument("--eval_rows", type=int, default=200, help="rows held out for evaluation (default 200)")
    parser.add_argument("--train_rows", type=int, help="train on only this many of the remaining rows")
    parser.add_argument("--only", choices=["alignlab", "trl"])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, spec = args.child
        child(side, json.loads(spec))
        return

    sys.path.insert(0, str(ROOT / "src"))
    from alignlab.models import embedded_model_path

    model_path = str(embedded_model_path())
    train_lines, eval_lines = split_rows(args.eval_rows, args.train_rows)
    print(f"data: {SHARED_PAIRS.name}, {len(train_lines)} train rows, {len(eval_lines)} held-out rows "
          f"(seeded shuffle, seed {SEED}); {args.steps} steps x {args.batch} pairs, max_length {args.max_length}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        train, held = Path(tmp) / "train.jsonl", Path(tmp) / "eval.jsonl"
        train.write_text("".join(train_lines), encoding="utf-8")
        held.write_text("".join(eval_lines), encoding="utf-8")
        results = {}
        for side in ("alignlab", "trl"):
            if args.only and side != args.only:
                continue
            spec = {
                "tmp": tmp, "out": str(Path(tmp) / side), "model": model_path, "train": str(train),
                "eval": str(held), "steps": args.steps, "batch": args.batch, "max_length": args.max_length,
                "seed": SEED,
            }
            res = subprocess.run([sys.executable, __file__, "--child", side, json.dumps(spec)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                sys.stderr.write(res.stderr[-4000:])
                raise SystemExit(f"{side} side failed")
            r = results[side] = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{side:9s} done: held-out accuracy {r['pair_accuracy']:.4f} on {r['eval_pairs']} pairs, "
                  f"wall {r['wall_seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)

    print()
    header = (f"{'side':9s} {'held-out acc':>12s} {'(TRL metric)':>12s} {'eval loss':>9s} {'eval pairs':>10s} "
              f"{'train pairs':>11s} {'train s':>8s} {'wall s':>8s} {'peak RSS':>9s}")
    print(header)
    print("-" * len(header))
    for side, r in results.items():
        trl_metric = f"{r['accuracy']:.4f}" if side == "trl" else "-"
        train_s = f"{r['train_seconds']:.1f}" if r.get("train_seconds") is not None else "?"
        print(f"{side:9s} {r['pair_accuracy']:12.4f} {trl_metric:>12s} {r['eval_loss']:9.4f} "
              f"{str(r['eval_pairs']) + '/' + str(len(eval_lines)):>10s} {r['train_pairs']!s:>11s} {train_s:>8s} "
              f"{r['wall_seconds']:8.1f} {r['peak_rss_bytes'] / 2**30:7.2f} GiB")
    print()
    for side, r in results.items():
        print(f"{side:9s} settings: learning_rate {r['learning_rate']}, gradient_checkpointing "
              f"{r['gradient_checkpointing']}, bf16 {r['bf16']}")
    if "alignlab" in results and any(results["alignlab"]["dropped_identical"].values()):
        print(f"alignlab dropped pairs with chosen == rejected: {results['alignlab']['dropped_identical']}")
    if len(results) == 2:
        a, t = results["alignlab"], results["trl"]
        if a["eval_pairs"] != t["eval_pairs"]:
            print(f"note: the two sides evaluated different numbers of pairs ({a['eval_pairs']} vs {t['eval_pairs']})")
        else:
            print(f"both sides evaluated the same {a['eval_pairs']} pairs")
        print(f"accuracy difference (alignlab - TRL, pair-weighted): {a['pair_accuracy'] - t['pair_accuracy']:+.4f}")
        print("held-out accuracy: fraction of evaluated pairs with score(chosen) > score(rejected); "
              "(TRL metric): TRL's own eval_accuracy, a mean of per-batch accuracies")


if __name__ == "__main__":
    main()

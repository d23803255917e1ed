"""Peak memory and step time of long-sequence DPO and SFT, alignlab against TRL 1.16, at two vocabulary sizes.

Jobs (``--method``): DPO or SFT, batch 2 (DPO: 2 pairs, 4 sequences). DPO pairs hold ~0.75 ``--max_length``
tokens (prompt 15% of it, chosen and rejected 30% each: pairs of ~1,536 tokens at 2,048); SFT rows are close
to ``--max_length`` (prompt 25%, completion 70%). The texts are English from the shared HH-RLHF transcripts,
cut to those token counts. ``--steps`` optimizer steps, learning rate 1e-6, no checkpoints, no evaluation.
Models (``--vocab``): ``49152``, the embedded SmolLM2-135M-Instruct; ``151936``, a random model of the same
shape (hidden 576, 30 layers, 9 heads, 3 key-value heads, intermediate 1536, tied embeddings) with Qwen2.5's
vocabulary size, created once into the temporary directory and reused (both use SmolLM2's tokenizer, so the
token ids and sequences are the same).

Sides (``--sides``, each its own process, one after the other):

* ``alignlab``: ``python -m alignlab.cli dpo|sft`` from this checkout's ``src`` at its defaults (precision:
  float32 on a CPU without native bf16, no gradient checkpointing, padding-free rows, shared prompts).
* ``alignlab-src=PATH``: the same from another checkout's ``src`` (e.g. an older version, for a before/after).
* ``trl``: TRL 1.16's DPOTrainer / SFTTrainer at its defaults (gradient checkpointing on, no padding-free)
  except for the job (batch, ``max_length``, steps, learning rate, no saving) and ``bf16``, set to what
  alignlab resolved (float32 here: TRL defaults to bf16 autocast, emulated and many times slower on such a
  CPU). ``trl-liger``: the same with ``use_liger_kernel=True``.

Measured per side: peak resident memory of the process (``ru_maxrss`` via ``os.wait4``, model loading
included); the seconds from the process's start to the end of step 1 (imports, model loading, the
reference copy and the first step: alike on both sides); and the wall time of each later optimizer step
(alignlab: between consecutive ``metrics.jsonl`` rows; TRL: between ``on_step_end`` callbacks).

    python benchmarks/long_context.py --method dpo --max_length 2048 --vocab 49152 151936 --steps 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_PAIRS = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs-2000.jsonl.gz"
QWEN_VOCAB = 151936

TRL_SCRIPT = r"""
import json, sys, time
import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
method, model_path, data_path, out, steps, max_length, bf16, liger, times_path = sys.argv[1:]
steps, max_length, bf16, liger = int(steps), int(max_length), bf16 == "true", liger == "true"
rows = [json.loads(l) for l in open(data_path)]
ds = datasets.Dataset.from_list(rows)
tok = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path)
common = dict(output_dir=out, per_device_train_batch_size=2, max_steps=steps, max_length=max_length,
              learning_rate=1e-6, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
              use_cpu=True, bf16=bf16, use_liger_kernel=liger)
times = []
class Steps(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        times.append(time.time())
if method == "dpo":
    from trl import DPOConfig, DPOTrainer
    trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=ds, processing_class=tok,
                         callbacks=[Steps()])
else:
    from trl import SFTConfig, SFTTrainer
    trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=ds, processing_class=tok,
                         callbacks=[Steps()])
trainer.train()
json.dump({"step_ends": times,
           "gradient_checkpointing": trainer.args.gradient_checkpointing}, open(times_path, "w"))
"""


def make_data(method: str, max_length: int, path: Path) -> dict:
    """Write ``2 * 2`` rows (two steps of batch 2) of text cut to token counts near ``max_length``."""
    from transformers import AutoTokenizer

    from alignlab.models import embedded_model_path

    tok = AutoTokenizer.from_pretrained(str(embedded_model_path()))
    with gzip.open(SHARED_PAIRS, "rt") as handle:
        text = " ".join(json.loads(line)["chosen"] for _, line in zip(range(400), handle))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cursor = 0

    def piece(n: int) -> str:
        nonlocal cursor
        chunk = ids[cursor : cursor + n]
        cursor += n
        return tok.decode(chunk)

    if method == "dpo":  # pairs of ~0.75 max_length tokens (1,536 at 2,048): prompt 15%, each answer 30%
        prompt_n, chosen_n, rejected_n = int(0.15 * max_length), int(0.3 * max_length), int(0.3 * max_length)
    else:
        prompt_n, chosen_n, rejected_n = int(0.25 * max_length), int(0.7 * max_length), 0
    rows = []
    for _ in range(4):
        if method == "dpo":
            rows.append({"prompt": piece(prompt_n), "chosen": piece(chosen_n), "rejected": piece(rejected_n)})
        else:
            rows.append({"prompt": piece(prompt_n), "completion": piece(chosen_n)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"prompt_tokens": prompt_n, "completion_tokens": [chosen_n, rejected_n] if method == "dpo" else [chosen_n]}


def model_path(vocab: int) -> str:
    """The embedded model (49,152) or a random model of its shape with ``vocab`` entries, made once."""
    from alignlab.models import embedded_model_path

    embedded = embedded_model_path()
    if vocab == 49152:
        return str(embedded)
    path = Path(tempfile.gettempdir()) / f"alignlab-random-smollm2-v{vocab}"
    if not (path / "config.json").exists():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(str(embedded))
        config.vocab_size = vocab
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float()
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(str(embedded)).save_pretrained(path)
    return str(path)


def run_side(side: str, method: str, model: str, data: Path, out: Path, steps: int, max_length: int,
             bf16: bool) -> dict:
    """One side in its own process: peak RSS, step times."""
    if side.startswith("alignlab"):
        src = side.split("=", 1)[1] if "=" in side else str(ROOT / "src")
        cmd = [sys.executable, "-m", "alignlab.cli", method, "--model_name_or_path", model, "--dataset_name",
               str(data), "--output_dir", str(out), "--per_device_train_batch_size", "2", "--max_steps", str(steps),
               "--max_length", str(max_length), "--learning_rate", "1e-6", "--logging_steps", "1",
               "--save_steps", "0", "--bf16", "true" if bf16 else "false"]
        previous = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = src  # run_measured passes this process's environment on
        start = time.perf_counter()
        try:
            result = run_measured(cmd, str(out), side, metrics=out / "metrics.jsonl")
        finally:
            os.environ.pop("PYTHONPATH") if previous is None else os.environ.update(PYTHONPATH=previous)
        ends = [t - start for t in result["row_times"]]  # one row per step
    else:
        times = out.parent / f"{out.name}-times.json"
        cmd = [sys.executable, "-c", TRL_SCRIPT, method, model, str(data), str(out), str(steps), str(max_length),
               "true" if bf16 else "false", "true" if side == "trl-liger" else "false", str(times)]
        start = time.time()
        result = run_measured(cmd, str(out), side)
        ends = [t - start for t in json.loads(times.read_text())["step_ends"]]
    result["step_ends"] = ends  # seconds from the process's start to the end of each step
    result["step_seconds"] = [b - a for a, b in zip(ends, ends[1:])]  # steps 2, 3, ...
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["dpo", "sft"], default="dpo")
    parser.add_argument("--max_length", type=int, nargs="+", default=[2048])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, QWEN_VOCAB])
    parser.add_argument("--sides", nargs="+", default=["alignlab", "trl"])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from alignlab.train.config import fast_bf16_available

    bf16 = fast_bf16_available()
    print("| method | max_length | vocab | side | peak RSS GiB | start to end of step 1, s | later steps, s | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for max_length in args.max_length:
            data = Path(tmp) / f"{args.method}-{max_length}.jsonl"
            make_data(args.method, max_length, data)
            for vocab in args.vocab:
                model = model_path(vocab)
                for side in args.sides:
                    out = Path(tmp) / f"{side.split('=')[0]}-{vocab}-{max_length}-{time.time_ns()}"
                    r = run_side(side, args.method, model, data, out, args.steps, max_length, bf16)
                    later = ", ".join(f"{s:.0f}" for s in r["step_seconds"]) or "-"
                    print(f"| {args.method} | {max_length} | {vocab} | {side} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                          f"{r['step_ends'][0]:.0f} | {later} | {r['wall_seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()

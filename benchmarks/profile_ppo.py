"""Where alignlab's PPO update spends its time: ``torch.profiler`` around the training part of one step.

Job: the alignlab side of ``ppo_vs_trl.py`` (embedded SmolLM2-135M-Instruct as policy and reference, a
reward model and a value model from the same checkpoint with a fresh scalar head, 16 ``builtin:concise``
prompts per step, 64-token responses, 4 PPO epochs of one mini-batch, lr 1e-5, float32 unless ``--bf16
true``), run in this process through the Python API for ``--step`` steps. Step ``--step`` (default 2, after
a warm-up) is profiled from its first backward to its end: the 4 epochs' forwards, backwards and optimizer
steps, not the rollout. Prints the step's training seconds, then the operators by self CPU time, then the
same grouped by input shapes.

    .venv/bin/python benchmarks/profile_ppo.py [--step 2] [--bf16 false|true] [--rows 30]

The profiler adds its own overhead (tens of microseconds an operator), so the profiled step is slower than
an unprofiled one; read the shares, not the total.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the alignlab command sets it, before torch loads

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from alignlab.algorithms.ppo import PPOConfig, PPOTrainer  # noqa: E402
from alignlab.models import embedded_model_path  # noqa: E402
from alignlab.train import loop, steps  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=int, default=2)
    parser.add_argument("--bf16", choices=["false", "true"], default="false")
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_path = str(embedded_model_path())
    tmp = Path(tempfile.mkdtemp())
    rows = (ROOT / "src/alignlab/data/builtin/concise.jsonl").read_text().splitlines()[: 16 * args.step]
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": json.loads(r)["prompt"]}) + "\n" for r in rows))
    torch.manual_seed(0)  # the reward/value head of ppo_vs_trl.py
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    reward_model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    reward_model.save_pretrained(tmp / "reward-model")
    tokenizer.save_pretrained(tmp / "reward-model")
    del reward_model

    state: dict = {"step": 0, "profiler": None, "done": False}
    online_step, backward_terms = loop.Trainer._online_step, steps.backward_terms

    def timed_online_step(self, model, optimizer, prompts, step, window):
        state["step"] = step
        before = window.train_seconds
        result = online_step(self, model, optimizer, prompts, step, window)
        print(f"step {step}: training {window.train_seconds - before:.1f} s", flush=True)
        profiler, state["profiler"] = state["profiler"], None
        if profiler is not None:
            profiler.__exit__(None, None, None)
            state["done"] = True
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
            print(profiler.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total",
                                                                         row_limit=args.rows))
        return result

    def profiled_backward_terms(*a, **k):
        if state["step"] == args.step and state["profiler"] is None and not state["done"]:
            state["profiler"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                       record_shapes=True)
            state["profiler"].__enter__()
        return backward_terms(*a, **k)

    loop.Trainer._online_step = timed_online_step
    steps.backward_terms = profiled_backward_terms
    config = PPOConfig(
        model_name_or_path=model_path, dataset_name=str(tmp / "prompts.jsonl"), output_dir=str(tmp / "out"),
        reward_model_path=str(tmp / "reward-model"), max_steps=args.step, per_device_train_batch_size=16,
        num_mini_batches=1, num_ppo_epochs=4, response_length=64, learning_rate=1e-5, bf16=args.bf16 == "true",
        save_steps=0, logging_steps=1, sample_steps=0,
    )
    PPOTrainer(config).train()


if __name__ == "__main__":
    main()

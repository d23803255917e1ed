"""How a reward model's input is rendered changes how well it ranks on-policy completions: read from the sampled
token ids (the score at the last sampled token, a bare EOS or, for a completion cut at the length limit, a word
in mid-sentence) or rendered as ``alignlab reward`` trains it (the prompt and the completion as a finished turn
of the chat template, :func:`alignlab.rollout.experience.reward_model_inputs`).

From a finished compare run (its ``output_dir``): the base model samples ``--samples`` completions for each of the
run's held-out prompts (the run's completion cap and temperature, its precision; seed ``--seed``), the task's
reward scores them, and each seed's reward model scores them both ways. Printed per reward model and rendering:
the share of pairs of completions of the same prompt (every pair whose task rewards differ) that the reward model
orders as the task reward does (0.5: chance), the correlation of its scores with the task reward over all
completions, and its mean score on completions that finished (EOS) and on those cut at the limit.

    .venv/bin/python benchmarks/reward_model_rendering.py runs/compare-kid-stories [--samples 4] [--seed 7]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]


def pair_agreement(rm: "torch.Tensor", task: "torch.Tensor", k: int) -> tuple[float, int]:
    """Share of within-prompt pairs (``k`` completions per prompt, prompt-major) with different task rewards that
    ``rm`` orders as ``task`` does, ties in ``rm`` counted half; and the number of such pairs."""
    agree, n = 0.0, 0
    for g in range(task.numel() // k):
        for i, j in itertools.combinations(range(g * k, g * k + k), 2):
            if task[i] == task[j]:
                continue
            n += 1
            product = float((rm[i] - rm[j]) * (task[i] - task[j]))
            agree += 1.0 if product > 0 else 0.5 if product == 0 else 0.0
    return (agree / n if n else float("nan")), n


def correlation(a: "torch.Tensor", b: "torch.Tensor") -> float:
    """Pearson correlation of two ``(N,)`` tensors."""
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished compare run's output_dir")
    parser.add_argument("--samples", type=int, default=4, help="completions per held-out prompt")
    parser.add_argument("--seed", type=int, default=7, help="seed of the base model's samples")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from alignlab.experiments.evaluate import EvaluateConfig, Evaluator
    from alignlab.models import load_causal_lm, load_reward_model, load_tokenizer
    from alignlab.rollout.experience import reward_model_inputs
    from alignlab.rollout.scoring import sequence_scores

    from alignlab.tasks import resolve_task

    results = json.loads((args.run / "results.json").read_text())
    config = results["config"]
    prompt_set = resolve_task(config["task"], "train", reward_funcs=config["reward_funcs"],
                              reward_weights=config["reward_weights"])
    evaluator = Evaluator(EvaluateConfig(  # the run's held-out prompts (eval.jsonl) and its task's reward
        model_name_or_path=[config["model_name_or_path"] or "embedded:smollm2-135m-instruct"],
        dataset_name=str(args.run / "eval.jsonl"), reward_funcs=prompt_set.reward_funcs,
        reward_weights=prompt_set.reward_weights,
        samples_per_prompt=args.samples, max_new_tokens=results["budget"]["max_new_tokens"],
        temperature=config["temperature"], seed=args.seed, bf16=config["bf16"]))
    base = load_causal_lm(config["model_name_or_path"]).eval()
    with torch.no_grad():
        parts = evaluator._sample(base, "base", args.samples)
    task = torch.cat([p.scores for p in parts]).float()
    finished = torch.cat([p.has_eos for p in parts])
    models = sorted((args.run / "reward-model").glob("seed-*/model")) or [args.run / "reward-model" / "model"]
    print(f"{task.numel()} completions of {task.numel() // args.samples} held-out prompts, "
          f"{float(finished.float().mean()):.3f} of them finished; task reward {float(task[finished].mean()):.3f} "
          f"finished, {float(task[~finished].mean()):.3f} cut at the limit")
    print("| reward model | input | pairs ordered as the task reward | correlation with the task reward "
          "| mean score, finished / cut |")
    print("|---|---|---|---|---|")
    for path in models:
        rtok = load_tokenizer(str(path))
        model = load_reward_model(str(path), pad_token_id=rtok.pad_token_id, require_score_head=True).eval()
        scores = {"sampled token ids": [], "rendered as trained": []}
        with torch.no_grad(), evaluator._precision():
            for p in parts:
                s = p.sequences
                scores["sampled token ids"].append(sequence_scores(model, s["input_ids"], s["attention_mask"]))
                rendered = reward_model_inputs(rtok, p.examples, p.texts)
                scores["rendered as trained"].append(
                    sequence_scores(model, rendered["input_ids"], rendered["attention_mask"]))
        for mode, values in scores.items():
            rm = torch.cat(values).float().cpu()
            share, n = pair_agreement(rm, task, args.samples)
            print(f"| {path.parent.name} | {mode} | {share:.3f} of {n} | {correlation(rm, task):.3f} | "
                  f"{float(rm[finished].mean()):.3f} / {float(rm[~finished].mean()):.3f} |")


if __name__ == "__main__":
    main()

"""How well the reward model that ``alignlab compare`` trains for PPO agrees with the task's own reward, on the
training pairs it learned from and on new pairs from the held-out prompts: a reward model that cannot rank
held-out completions as the task reward does gives PPO nothing to climb on that reward.

From a finished compare run (its ``output_dir``): the base model samples ``--samples`` completions for each
held-out prompt (the run's completion cap and temperature, its precision); the task reward keeps the best
against the worst of each prompt as a pair (prompts whose completions tie give none), as compare builds its
training pairs. Each seed's reward model then scores both pair sets (``alignlab score``); the accuracy is the
share of pairs where it prefers the completion the task reward prefers (0.5: chance).

    .venv/bin/python benchmarks/reward_model_agreement.py runs/compare-kid-stories [--samples 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def held_out_pairs(run: Path, samples: int, path: Path) -> int:
    """Sample and write the held-out prompts' best-vs-worst pairs of the base model, as compare samples its
    training pairs (:meth:`~alignlab.experiments.compare.Compare.sample_pairs`) but with other draws; returns
    their number."""
    from alignlab.data.io import read_rows
    from alignlab.experiments.compare import Compare, CompareConfig

    config = json.loads((run / "results.json").read_text())["config"]
    with tempfile.TemporaryDirectory() as scratch:  # Compare writes nothing but its output_dir
        compare = Compare(CompareConfig(**{**config, "output_dir": scratch, "resume": False}))
    rows = read_rows(str(run / "eval.jsonl"))  # (location, row)
    info = compare.sample_pairs(rows, path, samples_per_prompt=samples, seed=compare.config.seed + 1000,
                                progress="sampling held-out pairs")
    return info["pairs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished compare run's output_dir")
    parser.add_argument("--samples", type=int, default=4, help="completions per held-out prompt")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from alignlab.algorithms.reward import ScoreConfig, score_dataset
    from alignlab.data.io import read_rows

    models = sorted((args.run / "reward-model").glob("seed-*/model")) or [args.run / "reward-model" / "model"]
    with tempfile.TemporaryDirectory() as tmp:
        held_out = Path(tmp) / "held-out-pairs.jsonl"
        n_held = held_out_pairs(args.run, args.samples, held_out)
        print(f"| reward model | training pairs: number | accuracy | held-out pairs ({n_held}): accuracy |")
        print("|---|---|---|---|")
        for model in models:
            seeded = model.parent.name.startswith("seed-")
            # each seed's reward model learned from that seed's own pairs (pairs/seed-<seed>.jsonl)
            train = args.run / "pairs" / f"{model.parent.name}.jsonl" if seeded else args.run / "pairs.jsonl"
            if not train.exists():
                train = args.run / "pairs.jsonl"  # a run made when every seed shared one draw
            scores = [score_dataset(ScoreConfig(reward_model_path=str(model), dataset_name=str(data))).accuracy
                      for data in (train, held_out)]
            print(f"| {model.parent.name if seeded else 'reward-model'} | {len(read_rows(str(train)))} | "
                  f"{scores[0]:.3f} | {scores[1]:.3f} |")

if __name__ == "__main__":
    main()

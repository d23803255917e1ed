#!/usr/bin/env bash
# The main job: `alignlab compare` on the built-in kid-stories task with the default preset. From the embedded
# SmolLM2-135M-Instruct it builds offline preference pairs, trains DPO, PPO (with a reward model trained on the
# pairs), PPO on the rule-based reward, GRPO and Online DPO under one budget, evaluates them all on held-out
# prompts (mean reward with 95% CI, win rate and KL against the base model) and writes results.json and a
# self-contained report.html. Ends by printing the results table and where the report is.
# Extra flags are passed to `alignlab compare` (e.g. --resume, --methods dpo grpo, --task arithmetic).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh main
.venv/bin/alignlab compare \
  --task kid-stories \
  --preset default \
  --output_dir runs/compare-kid-stories \
  "$@"

#!/usr/bin/env bash
# The main job: DPO of the embedded SmolLM2-135M-Instruct on the built-in `concise` preference set
# (concise, correct answers preferred over rambling or wrong ones), with a held-out eval split.
# Ends by printing the paths of the trained model, metrics and plots. Extra flags are passed to `alignlab dpo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh main
.venv/bin/alignlab dpo \
  --dataset_name builtin:concise \
  --output_dir runs/dpo-concise \
  --eval_split_size 0.1 \
  --per_device_train_batch_size 8 \
  --learning_rate 5e-6 \
  --max_steps 50 \
  --logging_steps 5 \
  --eval_steps 25 \
  --save_steps 0 \
  "$@"

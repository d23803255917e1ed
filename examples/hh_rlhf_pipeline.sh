#!/usr/bin/env bash
# The classic RLHF pipeline on real human preferences: a reward model trained on the shared Anthropic HH-RLHF
# pairs, PPO of the embedded SmolLM2-135M-Instruct against it, then the reward model's score of the base and
# the PPO policy on 64 held-out prompts. Sized for a 2-core CPU (about 45 minutes in float32).
# Usage: bash examples/hh_rlhf_pipeline.sh [OUTPUT_DIR]   (from the repository root, after scripts/setup.sh)
set -euo pipefail
out="${1:-runs/hh-pipeline}"
data="${HH_DATA:-../shared/data/hh-rlhf-harmless/pairs-2000.jsonl.gz}"
bin=.venv/bin
mkdir -p "$out"

# Rows 1-1800 train the reward model and give PPO its prompts; rows 1801-2000 are held out.
"$bin/python" - "$data" "$out" <<'PY'
import gzip, sys
lines = gzip.open(sys.argv[1], "rt", encoding="utf-8").read().splitlines()
open(f"{sys.argv[2]}/train.jsonl", "w").write("\n".join(lines[:1800]) + "\n")
open(f"{sys.argv[2]}/heldout.jsonl", "w").write("\n".join(lines[1800:]) + "\n")
PY

"$bin/alignlab" reward --dataset_name "$out/train.jsonl" --eval_dataset_name "$out/heldout.jsonl" \
  --output_dir "$out/reward" --max_steps 60 --per_device_train_batch_size 8 --per_device_eval_batch_size 8 \
  --max_length 384 --logging_steps 10 --eval_steps 30 --save_steps 0

"$bin/alignlab" ppo --dataset_name "$out/train.jsonl" --reward_model_path "$out/reward" --output_dir "$out/ppo" \
  --max_prompt_length 256 --response_length 64 --learning_rate 1e-5 --per_device_train_batch_size 8 \
  --max_steps 10 --save_steps 0 --sample_steps 5

"$bin/alignlab" evaluate --model_name_or_path embedded "$out/ppo" --model_names base ppo \
  --dataset_name "$out/heldout.jsonl" --reward_model_path "$out/reward" --num_prompts 64 \
  --max_new_tokens 64 --max_prompt_length 256 --temperature 0.7 --output_file "$out/evaluate.json"

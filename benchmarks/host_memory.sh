#!/bin/bash
# Host-memory policy of the training process, measured on the Online DPO job of grpo_vs_trl.py (embedded
# model, 16 prompts x 2 completions of <= 64 tokens, temperature 0.9, beta 0.1, lr 1e-5, bf16 autocast,
# 6 steps). Variants, each an `alignlab online-dpo` process of its own, one after the other:
#   base   THP_MEM_ALLOC_ENABLE=0, --cpu_kernels off   (plain PyTorch and glibc: malloc_trim every step)
#   thp    THP_MEM_ALLOC_ENABLE=1, --cpu_kernels off   (PyTorch's huge pages only)
#   all    THP_MEM_ALLOC_ENABLE=1, --cpu_kernels auto  (the CPU speed layer: the alignlab command's default)
# Prints, per variant, /usr/bin/time's peak RSS, minor page faults and wall time, then the mean over steps
# 2-6 of the logged time/generation, time/scoring and time/training (seconds).
#   bash benchmarks/host_memory.sh [variant ...]    (default: base thp all base all)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
model=$(.venv/bin/alignlab prepare-model)
.venv/bin/python - "$out/prompts.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open("src/alignlab/data/builtin/concise.jsonl")]
with open(sys.argv[1], "w") as handle:
    handle.writelines(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[:96])
PY
run() {
  name=$1; kernels=$2; thp=$3
  dir="$out/$name-$RANDOM"
  THP_MEM_ALLOC_ENABLE=$thp /usr/bin/time -f "$name peak RSS %M KB, minor faults %R, wall %e s" \
    .venv/bin/alignlab online-dpo --model_name_or_path "$model" --dataset_name "$out/prompts.jsonl" \
    --output_dir "$dir" --reward_funcs examples/reward_funcs.py:target_length --max_steps 6 \
    --learning_rate 1e-5 --bf16 true --gradient_checkpointing false --save_steps 0 --sample_steps 0 --seed 42 \
    --per_device_train_batch_size 16 --max_new_tokens 64 --temperature 0.9 --beta 0.1 \
    --cpu_kernels "$kernels" 2>&1 | grep "peak RSS"
  .venv/bin/python - "$dir/metrics.jsonl" "$name" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])][1:]
mean = lambda key: sum(r[key] for r in rows) / len(rows)
parts = [mean(f"time/{k}") for k in ("generation", "scoring", "training")]
print(f"{sys.argv[2]} generation {parts[0]:.2f} scoring {parts[1]:.2f} training {parts[2]:.2f} "
      f"sum {sum(parts):.2f} (steps 2-6), completions {mean('completions/mean_length'):.1f} tokens")
PY
}
for variant in "${@:-base thp all base all}"; do
  for v in $variant; do
    case $v in
      base) run base off 0 ;;
      thp) run thp off 1 ;;
      all) run all auto 1 ;;
      *) echo "unknown variant $v" >&2; exit 2 ;;
    esac
  done
done
rm -rf "$out"

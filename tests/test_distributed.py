"""Two-process DDP on CPU (gloo) through torchrun: the same loop, sharded data, one set of outputs."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import read_metrics


@pytest.mark.integration
def test_torchrun_two_processes(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        "-m", "alignlab.cli", "dpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(pairs_file),
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1",
        "--eval_split_size", "4", "--learning_rate", "1e-3", "--save_steps", "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]  # one log, written once, not once per process
    assert all(math.isfinite(r["loss"]) for r in train_rows)
    assert any("eval_rewards/accuracies" in r for r in rows)
    assert (out / "model.safetensors").exists() and (out / "checkpoint-1" / "trainer_state.json").exists()
    assert proc.stdout.count("trained model:") == 1

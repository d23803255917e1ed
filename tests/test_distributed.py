"""Two-process DDP on CPU (gloo) through torchrun: the same loop, sharded data, one set of outputs."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, read_metrics


@pytest.mark.integration
def test_torchrun_two_processes(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
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


# ---------------------------------------------------------------------------------------------------------
# FSDP2 (--fsdp full_shard) on two CPU processes. Offline methods against one process with the same global
# batch (two micro-batches of 2 accumulated = two processes of 2); online methods against DDP on two processes
# (the same seeds and prompt shards, so the same completions). float32 throughout.

_TIME = ("time/", "tokens_per_second", "train_runtime")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src")
    return env


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "alignlab.cli", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _one_process(*argv: str) -> None:
    cmd = [sys.executable, "-m", "alignlab.cli", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]


def _assert_same_trajectory(a_dir, b_dir, rel=1e-4):
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 3
    compared = 0
    for row_a, row_b in zip(a, b):
        assert set(row_a) == set(row_b)
        for key, value in row_a.items():
            if key.startswith(_TIME) or not isinstance(value, (int, float)):
                continue
            assert row_b[key] == pytest.approx(value, rel=rel, abs=1e-6), (row_a["step"], key)
            compared += 1
    assert compared > 10


def _pairs(tmp_path) -> Path:
    import json

    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.", "rejected": f"Well, it might be {2 * i + 1}, maybe."}
            for i in range(16)]
    path = tmp_path / "pairs16.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.integration
@pytest.mark.parametrize("method", ["dpo", "sft", "reward"])
def test_fsdp_matches_one_process(method, tiny_model_dir, tmp_path):
    import json

    if method == "sft":
        rows = [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(16)]
        data = tmp_path / "sft.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        data = _pairs(tmp_path)
    common = ["--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--max_steps", "4",
              "--per_device_train_batch_size", "2", "--logging_steps", "1", "--learning_rate", "1e-3", "--bf16", "false"]
    if method == "sft":  # LoRA under FSDP2: trainable adapters on a frozen, sharded base
        common += ["--use_peft", "--lora_r", "4", "--lora_dropout", "0"]
    fsdp = tmp_path / "fsdp"
    proc = _torchrun(method, *common, "--output_dir", str(fsdp), "--fsdp", "full_shard auto_wrap",
                     "--save_steps", "2")
    one = tmp_path / "one"
    _one_process(method, *common, "--output_dir", str(one), "--gradient_accumulation_steps", "2", "--save_steps", "0")
    _assert_same_trajectory(one, fsdp)
    assert proc.stdout.count("trained model:") == 1
    assert (fsdp / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # sharded checkpoint (each process its part)

    # the saved folder is a plain Hugging Face model: the same weights as the one-process run's
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if method == "sft" else "model.safetensors"
    a, b = load_file(one / name), load_file(fsdp / name)
    assert sorted(a) == sorted(b)
    for key in a:
        torch_close = (a[key] - b[key]).abs().max().item() <= 1e-5 * max(1.0, a[key].abs().max().item())
        assert torch_close, key
    if method != "dpo":
        return

    # the saved model loads in one plain process and generates
    gen = subprocess.run([sys.executable, "-m", "alignlab.cli", "generate", "--model_name_or_path", str(fsdp),
                          "--prompt", "Hello", "--max_new_tokens", "4"],
                         capture_output=True, text=True, env=_env(), timeout=600, cwd=Path(__file__).parents[1])
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.strip()

    # resumed from checkpoint-2 (as after a crash there): the same steps 3-4 and the same final model
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(fsdp / "checkpoint-2", resumed / "checkpoint-2")
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in (fsdp / "metrics.jsonl").read_text().splitlines()[:2]))
    _torchrun(method, *common, "--output_dir", str(resumed), "--fsdp", "full_shard auto_wrap",
              "--save_steps", "2", "--resume_from_checkpoint", "true")
    _assert_same_trajectory(fsdp, resumed, rel=1e-6)
    c = load_file(resumed / "model.safetensors")
    assert all((b[key] - c[key]).abs().max().item() == 0 for key in b)


def _prompts(tmp_path) -> Path:
    import json

    rows = [{"prompt": [{"role": "user", "content": f"Say something about {i}."}]} for i in range(8)]
    path = tmp_path / "prompts8.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.integration
@pytest.mark.parametrize("method, extra", [
    ("grpo", ["--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "8"]),
    ("ppo", ["--per_device_train_batch_size", "2", "--response_length", "8"]),
    ("online-dpo", ["--per_device_train_batch_size", "2", "--max_new_tokens", "8"]),
])
def test_fsdp_online_matches_ddp(method, extra, tiny_model_dir, rewards_file, tmp_path):
    common = ["--model_name_or_path", tiny_model_dir, "--dataset_name", str(_prompts(tmp_path)), "--max_steps", "3",
              "--logging_steps", "1", "--learning_rate", "1e-3", "--bf16", "false", "--save_steps", "0",
              "--reward_funcs", f"{rewards_file}:short", "--sample_steps", "1", *extra]
    _torchrun(method, *common, "--output_dir", str(tmp_path / "ddp"))
    _torchrun(method, *common, "--output_dir", str(tmp_path / "fsdp"), "--fsdp", "full_shard")
    ddp_samples = (tmp_path / "ddp" / "samples.jsonl").read_text().splitlines()
    assert len(ddp_samples) >= 3 * 2  # every step, the main process's prompts
    assert (tmp_path / "fsdp" / "samples.jsonl").read_text().splitlines() == ddp_samples  # the same completions
    _assert_same_trajectory(tmp_path / "ddp", tmp_path / "fsdp")
    assert (tmp_path / "fsdp" / "model.safetensors").exists()


def test_a_broken_fsdp_config_file_is_one_line_with_its_line(tmp_path):
    from alignlab.errors import UserError
    from alignlab.train.distributed import load_fsdp_config

    bad = tmp_path / "fsdp.yaml"
    bad.write_text("reshard_after_forward: true\nmin_num_params: [1, 2\n")
    with pytest.raises(UserError) as info:
        load_fsdp_config(str(bad))
    message = str(info.value)
    assert "\n" not in message and f"{bad}:" in message and "not JSON or YAML" in message


_SHARDED_PRELUDE = """
import os
import sys

import torch
from transformers import AutoModelForCausalLM

from alignlab.train.config import TrainConfig
from alignlab.train.distributed import is_sharded, shutdown
from alignlab.train.runtime import build_runtime

path, out = sys.argv[1], sys.argv[2]
runtime = build_runtime(TrainConfig(model_name_or_path=path, dataset_name="builtin:concise", output_dir=out,
                                    fsdp="full_shard", bf16=False))
acc = runtime.accelerator
whole = AutoModelForCausalLM.from_pretrained(path).eval()
result = lambda line: os.write(1, f"RESULT {line}\\n".encode())  # one write: the processes' lines never mix
ref = runtime.frozen_model(AutoModelForCausalLM.from_pretrained(path))  # FSDP2 over the 2 processes, as a reference
"""
"""A two-process script's start: ``runtime`` and its ``acc`` (FSDP2), the tiny model whole (``whole``) and sharded
(``ref``)."""


def _run_sharded(script: str, tiny_model_dir: str, tmp_path: Path, timeout: int = 600) -> list[list[str]]:
    """Run :data:`_SHARDED_PRELUDE` + ``script`` on 2 processes; the words after ``RESULT`` of each printed
    result line."""
    path = tmp_path / "script.py"
    path.write_text(_SHARDED_PRELUDE + script + "\nshutdown(True)  # both processes leave together\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(path), tiny_model_dir, str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT")]


_FROZEN_SCRIPT = """
local = sum(p.to_local().numel() for p in ref.parameters())
total = sum(p.numel() for p in whole.parameters())
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

layers = sum(isinstance(m, LlamaDecoderLayer) and is_sharded(m) for m in ref.modules())
ids = torch.tensor([[1, 2, 3, 4, 5, 6]]) + 7 * acc.process_index  # other tokens on each process
with torch.no_grad():
    diff = (ref(input_ids=ids).logits - whole(input_ids=ids).logits).abs().max().item()
# sampling from a sharded model decodes from its gathered weights, without a reordered copy on top
from alignlab.ops import cpu_kernels

with cpu_kernels.decoding(ref, rows=2):
    copies = sum("forward" in m.__dict__ for m in ref.modules() if type(m) is torch.nn.Linear)
with cpu_kernels.decoding(whole, rows=2):
    whole_copies = sum("forward" in m.__dict__ for m in whole.modules() if type(m) is torch.nn.Linear)
assert copies == 0 and whole_copies > 0, (copies, whole_copies)
result(f"{acc.process_index} {local} {total} {layers} {diff} {any(p.requires_grad for p in ref.parameters())}")
"""


@pytest.mark.integration
def test_frozen_models_are_sharded_under_fsdp(tiny_model_dir, tmp_path):
    """The reference (and reward) model under --fsdp: each process holds half the weights, each decoder layer is
    a unit, and a forward (different inputs on each process) gives the whole model's logits."""
    results = _run_sharded(_FROZEN_SCRIPT, tiny_model_dir, tmp_path)
    assert sorted(r[0] for r in results) == ["0", "1"]
    for _, local, total, layers, diff, trainable in results:
        assert abs(int(local) - int(total) / 2) <= 64  # half the weights, up to the rounding of odd dimensions
        assert int(layers) == 2 and float(diff) < 1e-5 and trainable == "False"


_SAMPLING_SCRIPT = """
from alignlab.rollout.engines import GenerateEngine, SamplingParams
from alignlab.train.distributed import forwards_gather

prompts = [[1, 2, 3, 4, 5, 6]] if acc.process_index == 0 else [[20, 21, 22, 23], [30, 31]]
pad, no_eos = whole.config.pad_token_id, whole.config.vocab_size + 7
longest = GenerateEngine(whole).generate(prompts, SamplingParams(max_new_tokens=40, eos_token_id=no_eos,
                                                                 pad_token_id=pad, do_sample=False))
# process 0's only row ends by its third token, process 1's rows run to 40: process 0 must keep joining the
# other's forwards (each gathers the sharded weights) until both are done
eos = longest.ids[0][2] if acc.process_index == 0 else no_eos
params = SamplingParams(max_new_tokens=40, eos_token_id=eos, pad_token_id=pad, do_sample=False, return_logps=True)
expected = GenerateEngine(whole).generate(prompts, params)
assert forwards_gather(ref)
got = GenerateEngine(ref).generate(prompts, params)
assert got.ids == expected.ids, (got.ids, expected.ids)
assert all(len(g) == len(i) for g, i in zip(got.logps, got.ids))
with runtime.sampling(ref):  # as the online methods sample: no gathering per forward, rows leave as usual
    assert not forwards_gather(ref)
    assert GenerateEngine(ref).generate(prompts, params).ids == expected.ids
assert forwards_gather(ref)
result(f"{acc.process_index} {' '.join(str(len(ids)) for ids in got.ids)}")
"""


@pytest.mark.integration
def test_sampling_from_a_sharded_policy_keeps_processes_together(tiny_model_dir, tmp_path):
    """A policy sharded over two processes, one of which finishes its completions long before the other: the
    first keeps joining the other's forwards (a process that stopped early would leave the other waiting on
    the weights' all-gather), and both get the whole model's greedy completions."""
    lengths = {r[0]: r[1:] for r in _run_sharded(_SAMPLING_SCRIPT, tiny_model_dir, tmp_path, timeout=300)}
    assert int(lengths["0"][0]) <= 3 and lengths["1"] == ["40", "40"], lengths


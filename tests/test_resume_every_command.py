"""``kill -9`` then ``--resume_from_checkpoint true`` ends where the uninterrupted run ends, for every command that
trains: the same final weights, the same ``metrics.jsonl`` rows and, for the online methods, the same sampled
completions and rewards in ``samples.jsonl``.

Each case runs the command three times on the tiny random model (tests/conftest.py): once uninterrupted; once
killed with SIGKILL as soon as ``checkpoint-2`` is complete (mid-run: the run has more steps to go); once
resumed from the newest checkpoint. A few steps of tiny batches, a checkpoint every step. The online methods
sample from a variant of it that ends completions with EOS about one token in five: completions of different
lengths make the token-mean losses depend on which completions share a micro-batch, so a resumed run that
shuffled differently (RLOO's and REINFORCE++'s unsaved generator before) ends with other weights.
``tests/test_faults.py`` kills DPO, GRPO and PPO at random moments (mid-step and mid-checkpoint); this file covers
every command once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_faults import ROOT, _assert_same_rows, _env, _rows, _run

pytestmark = pytest.mark.integration

COMMANDS = ("sft", "reward", "dpo", "kto", "grpo", "rloo", "reinforce-pp", "remax", "ppo", "online-dpo",
            "iterative-dpo")
ONLINE = ("grpo", "rloo", "reinforce-pp", "remax", "ppo", "online-dpo")
STEPS = 5
KILL_AFTER = 2  # checkpoint-2 complete, steps 3..5 to go
RTOL, ATOL = 1e-5, 1e-6  # as tests/test_faults.py's comparison of metrics


@pytest.fixture(scope="module")
def eos_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model's architecture with an untied head whose EOS logit is about 9.6 above the others', so that
    about one sampled token in five is EOS (49,152 other tokens): the residual stream carries a constant 100
    in its first dimension, which the final norm turns into about sqrt(64) = 8, and only EOS's head row reads
    it (weight 1.2)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 100.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[config.eos_token_id, 0] = 1.2
    path = tmp_path_factory.mktemp("tiny-eos")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return str(path)


def _sft_file(tmp_path: Path) -> Path:
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(12)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _argv(command: str, model: str, out: Path, files: dict[str, Path]) -> list[str]:
    """The command's flags: ``STEPS`` steps of tiny batches, a checkpoint every step, float32."""
    common = ["--model_name_or_path", model, "--output_dir", str(out), "--save_steps", "1", "--logging_steps", "1",
              "--bf16", "false", "--learning_rate", "1e-3", "--seed", "7", "--max_steps", str(STEPS)]
    offline = ["--per_device_train_batch_size", "4", "--max_length", "64"]
    online = ["--dataset_name", str(files["prompts"]), "--reward_funcs", f"{files['rewards']}:short",
              "--sample_steps", "1"]
    # group methods: 2 prompts x 2 completions per step in 2 micro-batches, 2 passes (the shuffle counts)
    group = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_completion_length", "6"]
    args = {
        "sft": ["--dataset_name", str(files["sft"]), *offline],
        "reward": ["--dataset_name", str(files["pairs"]), *offline],
        "dpo": ["--dataset_name", str(files["pairs"]), *offline],
        "kto": ["--dataset_name", str(files["pairs"]), *offline],
        "grpo": [*online, *group, "--num_generations", "2", "--num_iterations", "2", "--beta", "0.1",
                 "--loss_type", "bnpo"],
        "rloo": [*online, *group, "--num_generations", "2", "--num_iterations", "2"],
        "reinforce-pp": [*online, *group, "--n_samples_per_prompt", "2", "--max_epochs", "2",
                         "--advantage_estimator", "reinforce_baseline"],
        "remax": [*online, *group, "--num_generations", "2", "--num_iterations", "2", "--beta", "0.1"],
        "ppo": [*online, "--per_device_train_batch_size", "2", "--num_mini_batches", "2", "--num_ppo_epochs", "2",
                "--response_length", "6"],
        "online-dpo": [*online, "--per_device_train_batch_size", "2", "--max_new_tokens", "6"],
        # per round: STEPS DPO steps on best-vs-worst pairs of 2 samples per prompt; no held-out prompts
        "iterative-dpo": ["--dataset_name", str(files["prompts"]), "--reward_funcs", f"{files['rewards']}:short",
                          "--rounds", "2", "--samples_per_prompt", "2", "--max_new_tokens", "6",
                          "--eval_split_size", "0", "--per_device_train_batch_size", "2", "--max_length", "64"],
    }[command]
    return [command, *common, *args]


def _checkpoints(command: str, out: Path) -> Path:
    """Where the command writes its ``checkpoint-N`` folders (iterative DPO: its first round's DPO run)."""
    return out / "round-1" / "model" if command == "iterative-dpo" else out


def _kill_after_checkpoint(argv: list[str], folder: Path, log: Path) -> None:
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "alignlab.cli", *argv], stdout=subprocess.DEVNULL,
                                stderr=err, env=_env(), cwd=ROOT)
    deadline = time.monotonic() + 600
    while not (folder / f"checkpoint-{KILL_AFTER}").is_dir():  # renamed into place once complete
        assert proc.poll() is None, f"the run ended before checkpoint-{KILL_AFTER}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"


def _samples(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return [(r["step"], r["completion"], r["score"]) for r in rows]


@pytest.mark.parametrize("command", COMMANDS)
def test_kill_9_after_a_checkpoint_then_resume_ends_like_the_uninterrupted_run(command, tiny_model_dir, eos_model_dir,
                                                                                pairs_file, prompts_file, rewards_file,
                                                                                tmp_path):
    files = {"pairs": pairs_file, "prompts": prompts_file, "rewards": rewards_file, "sft": _sft_file(tmp_path)}
    model = eos_model_dir if command in ONLINE else tiny_model_dir
    full, out = tmp_path / "full", tmp_path / "killed"
    _run(_argv(command, model, full, files))
    argv = _argv(command, model, out, files)
    _kill_after_checkpoint(argv, _checkpoints(command, out), tmp_path / "killed.log")
    assert not (out / "model.safetensors").exists()  # killed mid-run
    resumed = _run(argv + ["--resume_from_checkpoint", "true"])
    assert f"resumed from {_checkpoints(command, out) / 'checkpoint-'}" in resumed.stderr

    expected, got = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=RTOL, atol=ATOL, msg=lambda m: f"{command} {name}: {m}")
    _assert_same_rows(_rows(out), _rows(full))
    if command in ONLINE:  # each step's completions and rewards once, as the uninterrupted run's
        samples = _samples(out)
        assert samples == _samples(full) and samples
        assert len({len(completion) for _, completion, _ in samples}) > 1  # lengths differ: the shuffle counts

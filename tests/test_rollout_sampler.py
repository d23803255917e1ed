"""The bf16 rollout sampler: it follows the policy's weights, its sampled tokens carry their log-probs under
the sampling distribution, and GRPO / PPO / Online DPO train with it (importance weights logged)."""

import math

import pytest
import torch

from alignlab.models import load_causal_lm
from alignlab.rollout.generation import build_sequences, completion_token_logps, sample_completions
from alignlab.rollout.sampler import RolloutSampler
from tests.conftest import one_line, read_metrics, run_cli


def test_sampled_token_logps_match_a_forward_pass(tiny_model_dir, tiny_tokenizer):
    torch.manual_seed(0)
    policy = load_causal_lm(tiny_model_dir).eval()
    prompts = [[11, 12, 13], [21, 22]]
    with torch.no_grad():
        out = sample_completions(policy, prompts, max_new_tokens=5, eos_token_id=tiny_tokenizer.eos_token_id,
                                 pad_token_id=tiny_tokenizer.pad_token_id, temperature=0.7, num_generations=2,
                                 return_logps=True)
        per_completion = [prompts[i] for i in out.prompt_index]
        seq = build_sequences(per_completion, out.ids, tiny_tokenizer.pad_token_id)
        forward = completion_token_logps(policy, seq, temperature=0.7, pad_token_id=tiny_tokenizer.pad_token_id)
    assert [len(row) for row in out.logps] == out.lengths
    for i, row in enumerate(out.logps):
        assert row == pytest.approx(forward[i, : len(row)].tolist(), abs=1e-4)


def test_bf16_copy_follows_the_policy(tiny_model_dir):
    torch.manual_seed(0)
    policy = load_causal_lm(tiny_model_dir).eval()
    sampler = RolloutSampler(policy, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in sampler.model.parameters())
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        def gap():
            exact = torch.log_softmax(policy(ids).logits.float(), -1)
            approx = torch.log_softmax(sampler.model(ids).logits.float(), -1)
            return float((exact.exp() * (exact - approx)).sum(-1).max())  # KL(policy || copy) per position

        assert gap() < 1e-2
        for p in policy.parameters():  # a training step's worth of change, then a sync
            p.add_(torch.randn_like(p) * 0.05)
        stale = gap()
        sampler.sync(policy)
        assert gap() < 1e-2 < stale


def _grpo_args(model, data, rewards, out):
    return ["grpo", "--model_name_or_path", model, "--dataset_name", str(data), "--output_dir", str(out),
            "--reward_funcs", f"{rewards}:short", "--per_device_train_batch_size", "4", "--num_generations", "4",
            "--max_completion_length", "6", "--max_steps", "2", "--learning_rate", "1e-3", "--save_steps", "0",
            "--bf16", "false", "--rollout_weights", "bfloat16"]


def test_grpo_with_a_bf16_sampler_logs_importance_weights(capsys, tiny_model_dir, prompts_file, rewards_file, tmp_path):
    out = tmp_path / "grpo"
    code, _, err = run_cli(capsys, *_grpo_args(tiny_model_dir, prompts_file, rewards_file, out),
                           "--importance_sampling_clip_max", "1.5")
    assert code == 0, err
    rows = read_metrics(out)
    assert len(rows) == 2
    for row in rows:
        assert 0 < row["sampling/importance_sampling_ratio/mean"] <= 1.5
        assert row["sampling/importance_sampling_ratio/max"] <= 1.5
        assert 0 <= row["sampling/sampling_logp_difference/mean"] < 0.1
        assert math.isfinite(row["loss"])


def test_sampler_choice(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    from alignlab.algorithms.grpo import GRPOConfig, GRPOTrainer

    def sampler(**kw):
        cfg = GRPOConfig(model_name_or_path=tiny_model_dir, dataset_name=str(prompts_file), output_dir=str(tmp_path),
                         reward_funcs=[f"{rewards_file}:short"], per_device_train_batch_size=4, num_generations=4, **kw)
        return GRPOTrainer(cfg).setup.sampler

    assert sampler(bf16=True) is None  # default: the policy samples, whatever the precision
    assert sampler(bf16=False, rollout_weights="bfloat16").dtype == torch.bfloat16


def test_ppo_and_online_dpo_with_a_bf16_sampler(capsys, tiny_model_dir, prompts_file, rewards_file, tmp_path):
    common = ["--model_name_or_path", tiny_model_dir, "--dataset_name", str(prompts_file),
              "--reward_funcs", f"{rewards_file}:short", "--per_device_train_batch_size", "2", "--max_steps", "1",
              "--save_steps", "0", "--bf16", "false", "--rollout_weights", "bfloat16"]
    code, _, err = run_cli(capsys, "ppo", *common, "--output_dir", str(tmp_path / "ppo"), "--response_length", "5",
                           "--num_ppo_epochs", "1")
    assert code == 0, err
    (row,) = read_metrics(tmp_path / "ppo")
    assert 0 < row["sampling/importance_sampling_ratio/mean"] <= 2.0 and math.isfinite(row["loss/policy"])
    code, _, err = run_cli(capsys, "online-dpo", *common, "--output_dir", str(tmp_path / "odpo"),
                           "--max_new_tokens", "5")
    assert code == 0, err
    assert math.isfinite(read_metrics(tmp_path / "odpo")[0]["loss"])


@pytest.mark.parametrize("extra, message", [
    (["--use_peft"], "--rollout_weights bfloat16 does not support --use_peft"),
    (["--importance_sampling_clip_min", "3"], "--importance_sampling_clip_min 3.0 > --importance_sampling_clip_max"),
])
def test_sampler_errors_are_one_line(capsys, tiny_model_dir, prompts_file, rewards_file, tmp_path, extra, message):
    code, _, err = run_cli(capsys, *_grpo_args(tiny_model_dir, prompts_file, rewards_file, tmp_path / "x"), *extra)
    assert code != 0 and message in one_line(err)

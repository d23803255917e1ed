"""RLOO end to end on the tiny model: TRL's metric names, leave-one-out advantages from the logged scores, the
sequence-ratio loss against a hand computation, the KL folded into the reward, a loss that falls when a batch is
trained on, and one-line errors."""

import json
import math

import pytest
import torch

from alignlab.algorithms.rloo import RLOOConfig, RLOOTrainer, rloo_policy_loss
from tests.conftest import one_line, read_metrics, run_cli


def _config(model, data, rewards, out, **kw):
    """2 prompts x 4 completions of at most 6 tokens per step, in 2 micro-batches of 4."""
    return RLOOConfig(**{"model_name_or_path": model, "dataset_name": str(data), "output_dir": str(out),
                         "reward_funcs": [f"{rewards}:short"], "num_generations": 4, "max_completion_length": 6,
                         "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 2,
                         "learning_rate": 1e-3, "save_steps": 0, "bf16": False, "logging_steps": 1, **kw})


def test_rloo_trains_with_trl_metric_names_and_leave_one_out_advantages(tiny_model_dir, prompts_file, rewards_file,
                                                                        tmp_path):
    out = tmp_path / "run"
    trainer = RLOOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, out, beta=0.0, sample_steps=1))
    assert trainer.setup.ref_model is None  # beta 0: no reference
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    trainer.train()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for name in ("loss", "reward", "reward_std", "frac_reward_zero_std", "clip_ratio/region_mean", "clip_ratio/low_mean",
                 "clip_ratio/high_mean", "completions/mean_length", "rewards/short/mean", "rewards/short/std"):
        assert all(math.isfinite(r[name]) for r in rows), name
    assert "kl" not in rows[0]
    assert rows[0]["clip_ratio/region_mean"] == 0.0  # one iteration: ratio 1, nothing clipped
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 8
    for g in range(0, len(samples), 4):  # A_i = R_i - mean of the other three of its prompt
        scores = [s["score"] for s in samples[g : g + 4]]
        for i, s in enumerate(samples[g : g + 4]):
            assert s["prompt"] == samples[g]["prompt"]
            assert s["advantage"] == pytest.approx(scores[i] - (sum(scores) - scores[i]) / 3, abs=1e-5)
    assert (out / "plots" / "reward.png").exists() and (out / "model.safetensors").exists()


def test_loss_is_the_clipped_sequence_surrogate_and_falls_when_trained_on(tiny_model_dir, prompts_file, rewards_file,
                                                                         tmp_path):
    trainer = RLOOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "r", beta=0.0))
    policy = trainer.policy
    with torch.no_grad():
        rollout = trainer.rollout(policy, trainer.prompts[:2], 1)
    batch = rollout.updates[0][0]
    ((loss, metrics),) = trainer.compute_loss(policy, batch)
    assert float(loss.detach()) == pytest.approx(float(-batch["advantages"].mean()), abs=1e-6)  # ratio 1: mean(-A)

    # hand-worked clipped values: ratios e^0.5 (A=1: clipped at 1.2), e^-0.5 (A=-2: clipped at 0.8), 1 (A=3)
    logps, old = torch.tensor([0.5, -0.5, 0.0]), torch.zeros(3)
    ((value, m),) = rloo_policy_loss(logps, old, torch.tensor([1.0, -2.0, 3.0]), epsilon=0.2)
    assert float(value) == pytest.approx((-1.2 + 2 * 0.8 - 3.0) / 3, abs=1e-6)
    assert float(m["clip_ratio/region_mean"]) == pytest.approx(2 / 3)
    assert float(m["clip_ratio/low_mean"]) == pytest.approx(1 / 3)
    assert float(m["clip_ratio/high_mean"]) == pytest.approx(1 / 3)

    # trained on one micro-batch with its old log-probs fixed, the surrogate falls
    fixed = dict(batch, old_logps=trainer.setup.logps(policy, batch).detach())
    if float(fixed["advantages"].abs().sum()) == 0:
        pytest.skip("all rewards of the batch are equal")
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        ((value, _),) = trainer.compute_loss(policy, fixed)
        losses.append(float(value.detach()))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert losses[2] < losses[0]


def test_kl_enters_the_reward(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    from alignlab.advantages.rloo import rloo_advantages

    trainer = RLOOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "r", beta=0.5,
                                  sample_steps=1))
    assert trainer.setup.ref_model is not None
    with torch.no_grad():  # perturb the policy so that the KL is not 0
        for p in trainer.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:2], 1)
    assert float(rollout.metrics["kl"]) != 0.0 and math.isfinite(float(rollout.metrics["kl"]))
    scores = torch.tensor([row["score"] for row in rollout.samples])
    without_kl, _ = rloo_advantages(scores, 4)
    with_kl = torch.tensor([row["advantage"] for row in rollout.samples])
    assert (with_kl - without_kl).abs().max() > 1e-4  # beta * summed k1 moved the rewards
    assert float(rollout.metrics["reward"]) == pytest.approx(float(scores.mean()), abs=1e-6)  # raw scores logged


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num_generations", "1"], "--num_generations must be >= 2"),
        (["--per_device_train_batch_size", "3"], "3 completions per step is not a multiple"),
        (["--reward_clip_range", "1", "0"], "--reward_clip_range takes two numbers low < high"),
    ],
)
def test_cli_errors_are_one_line(capsys, tiny_model_dir, prompts_file, rewards_file, tmp_path, extra, message):
    code, _, err = run_cli(capsys, "rloo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(prompts_file),
                           "--reward_funcs", f"{rewards_file}:short", "--output_dir", str(tmp_path / "o"),
                           "--max_steps", "1", "--bf16", "false", *extra)
    assert code != 0
    assert message in one_line(err)

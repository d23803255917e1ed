"""ReMax end to end on the tiny model: the greedy completion's score as each prompt's baseline (checked against a
greedy sample), advantages against the logged scores, the KL folded into the per-token returns, the loss on a
rollout against a hand computation, and one-line errors."""

import json
import math

import pytest
import torch

from alignlab.algorithms.remax import ReMaxConfig, ReMaxTrainer
from alignlab.ops.kl import kl_k1
from tests.conftest import one_line, read_metrics, run_cli


def _config(model, data, rewards, out, **kw):
    """2 prompts x 2 sampled completions of at most 6 tokens per step, in 2 micro-batches of 2."""
    return ReMaxConfig(**{"model_name_or_path": model, "dataset_name": str(data), "output_dir": str(out),
                          "reward_funcs": [f"{rewards}:short"], "num_generations": 2, "max_completion_length": 6,
                          "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 2,
                          "learning_rate": 1e-3, "save_steps": 0, "bf16": False, "logging_steps": 1, **kw})


def test_remax_trains_against_the_greedy_baseline(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    out = tmp_path / "run"
    trainer = ReMaxTrainer(_config(tiny_model_dir, prompts_file, rewards_file, out, sample_steps=1))
    assert trainer.setup.ref_model is None  # beta 0: no reference
    examples = trainer.prompts[:2]
    with torch.no_grad():
        greedy = trainer.setup.sample(trainer.policy, examples, max_new_tokens=6, do_sample=False)
        rollout = trainer.rollout(trainer.policy, examples, 1)
    # the baseline is the score of each prompt's greedy completion; every token's advantage is score - baseline
    assert float(rollout.metrics["baseline_reward"]) == pytest.approx(float(greedy.scores.mean()), abs=1e-6)
    for i, row in enumerate(rollout.samples):
        assert row["baseline_score"] == pytest.approx(float(greedy.scores[i // 2]), abs=1e-6)
        assert row["advantage"] == pytest.approx(row["score"] - row["baseline_score"], abs=1e-6)
    # one iteration: ratio 1, so the loss is minus the mean advantage over the micro-batch's completion tokens
    batch = rollout.updates[0][0]
    ((loss, metrics),) = trainer.compute_loss(trainer.policy, batch)
    mask = batch["response_mask"].bool()
    assert float(loss.detach()) == pytest.approx(float(-batch["advantages"][mask].mean()), abs=1e-6)
    assert float(metrics["clip_ratio"]) == 0.0
    for mb in rollout.updates[0]:  # constant over each completion's tokens, 0 on padding
        m = mb["response_mask"].bool()
        for row, rm in zip(mb["advantages"], m):
            assert torch.allclose(row[rm], row[rm][0].expand(int(rm.sum()))) and (row[~rm] == 0).all()

    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    trainer.train()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for name in ("loss", "reward", "reward_std", "baseline_reward", "return", "clip_ratio", "policy/approxkl",
                 "completions/mean_length", "rewards/short/mean", "rewards/short/std", "time/baseline"):
        assert all(math.isfinite(r[name]) for r in rows), name
    assert "kl" not in rows[0]
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 4
    for s in samples:
        assert s["advantage"] == pytest.approx(s["score"] - s["baseline_score"], abs=1e-5)
    assert (out / "plots" / "reward.png").exists() and (out / "model.safetensors").exists()


def test_the_kl_enters_the_per_token_returns(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    beta = 0.5
    trainer = ReMaxTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "kl", beta=beta,
                                   sample_steps=1))
    assert trainer.setup.ref_model is not None
    with torch.no_grad():
        for p in trainer.policy.parameters():  # move the policy off the reference so that the KL is not 0
            p.add_(0.05 * torch.randn_like(p))
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:2], 1)
        assert float(rollout.metrics["kl"]) != 0.0
        firsts, expected = [], sorted(row["score"] - row["baseline_score"] for row in rollout.samples)
        for mb in rollout.updates[0]:
            kl = kl_k1(trainer.setup.logps(trainer.policy, mb), trainer.setup.reference_logps(trainer.policy, mb))
            m = mb["response_mask"].bool()
            adv = mb["advantages"]
            for row, k, rm in zip(adv, kl, m):
                n = int(rm.sum())
                # A_t - A_{t+1} = -beta * kl_t: the returns are suffix sums of the token rewards
                torch.testing.assert_close(row[: n - 1] - row[1:n], -beta * k[: n - 1], atol=1e-5, rtol=1e-4)
                firsts.append(float(row[0] + beta * k[:n].sum()))  # = score - greedy score
    assert sorted(firsts) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num_generations", "0"], "--num_generations must be >= 1"),
        (["--num_generations", "3", "--per_device_train_batch_size", "4"], "4 completions per step is not a multiple"),
        (["--beta", "-1"], "--beta must be >= 0"),
    ],
)
def test_cli_errors_are_one_line(capsys, tiny_model_dir, prompts_file, rewards_file, tmp_path, extra, message):
    code, _, err = run_cli(capsys, "remax", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(prompts_file),
                           "--reward_funcs", f"{rewards_file}:short", "--output_dir", str(tmp_path / "o"),
                           "--max_steps", "1", "--bf16", "false", *extra)
    assert code != 0
    assert message in one_line(err)

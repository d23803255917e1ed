"""REINFORCE++ end to end on the tiny model: per-token advantages whitened over the batch's tokens (checked on the
rollout), the group baseline, the per-token clipped loss against a hand computation, and one-line errors."""

import math

import pytest
import torch

from alignlab.algorithms.reinforce_pp import ReinforcePPConfig, ReinforcePPTrainer
from tests.conftest import one_line, read_metrics, run_cli


def _config(model, data, rewards, out, **kw):
    base = dict(
        model_name_or_path=model, dataset_name=str(data), output_dir=str(out), reward_funcs=[f"{rewards}:short"],
        per_device_train_batch_size=4, gradient_accumulation_steps=2, n_samples_per_prompt=4,
        max_completion_length=6, max_steps=2, learning_rate=1e-3, save_steps=0, bf16=False, logging_steps=1,
    )
    base.update(kw)
    return ReinforcePPConfig(**base)


def _all_rows(rollout, key):
    width = max(mb[key].shape[1] for mb in rollout.updates[0])
    return torch.cat([torch.nn.functional.pad(mb[key].float(), (0, width - mb[key].shape[1])) for mb in rollout.updates[0]])


def test_reinforce_pp_trains_and_whitens_over_tokens(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    out = tmp_path / "run"
    trainer = ReinforcePPTrainer(_config(tiny_model_dir, prompts_file, rewards_file, out, init_kl_coef=0.0))
    assert trainer.setup.ref_model is None
    with torch.no_grad():
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:2], 1)
    adv, mask = _all_rows(rollout, "advantages"), _all_rows(rollout, "response_mask").bool()
    # no KL, gamma 1: one value per completion, mean 0 and variance 1 over the batch's completion tokens
    for row, m in zip(adv, mask):
        assert torch.allclose(row[m], row[m][0].expand(int(m.sum())), atol=1e-6)
        assert (row[~m] == 0).all()
    assert float(adv[mask].mean()) == pytest.approx(0.0, abs=1e-5)
    if float(adv[mask].abs().sum()) > 0:
        assert float((adv[mask] ** 2).mean()) == pytest.approx(1.0, abs=1e-4)
    batch = rollout.updates[0][0]
    ((loss, metrics),) = trainer.compute_loss(trainer.policy, batch)
    m = batch["response_mask"].bool()
    assert float(loss.detach()) == pytest.approx(float(-batch["advantages"][m].mean()), abs=1e-6)  # ratio 1
    assert float(metrics["clip_ratio"]) == 0.0

    trainer.train()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for name in ("loss", "reward", "reward_std", "return", "clip_ratio", "completions/mean_length"):
        assert all(math.isfinite(r[name]) for r in rows), name


def test_baseline_estimator_with_kl_and_epochs(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    out = tmp_path / "b"
    cfg = _config(tiny_model_dir, prompts_file, rewards_file, out, advantage_estimator="reinforce_baseline",
                  init_kl_coef=0.1, max_epochs=2, max_steps=1)
    trainer = ReinforcePPTrainer(cfg)
    assert trainer.setup.ref_model is not None
    with torch.no_grad():
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:2], 1)
    assert len(rollout.updates) == 2 and "old_logps" in rollout.updates[0][0]
    assert float(rollout.metrics["kl"]) == pytest.approx(0.0, abs=1e-6)  # policy == reference before training
    trainer.train()
    row = read_metrics(out)[0]
    assert math.isfinite(row["loss"]) and row["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--advantage_estimator", "reinforce_baseline", "--n_samples_per_prompt", "1"], "--n_samples_per_prompt must be >= 2 with --advantage_estimator reinforce_baseline"),
        (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
        (["--n_samples_per_prompt", "3"], "not a multiple of the 3 completions per prompt"),
    ],
)
def test_cli_errors_are_one_line(capsys, tiny_model_dir, prompts_file, rewards_file, tmp_path, extra, message):
    code, _, err = run_cli(capsys, "reinforce-pp", "--model_name_or_path", tiny_model_dir, "--dataset_name",
                           str(prompts_file), "--reward_funcs", f"{rewards_file}:short", "--output_dir",
                           str(tmp_path / "o"), "--max_steps", "1", "--bf16", "false", *extra)
    assert code != 0
    assert message in one_line(err)

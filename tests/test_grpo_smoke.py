"""GRPO end to end on the tiny model: outputs and TRL's metric names, groups and advantages, the dapo
normalisation across micro-batches, the reference only when beta > 0, and one-line errors."""

import json
import math

import pytest
import torch

from alignlab.algorithms.grpo import GRPOConfig, GRPOTrainer
from alignlab.losses.ppo import aggregate_token_loss, clipped_policy_loss
from tests.conftest import one_line, read_metrics, run_cli

def _config(model, data, rewards, out, **kw):
    base = dict(
        model_name_or_path=model, dataset_name=str(data), output_dir=str(out), reward_funcs=[f"{rewards}:short"],
        per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4, max_completion_length=6,
        max_steps=2, learning_rate=1e-3, save_steps=0, bf16=False, logging_steps=1,
    )
    base.update(kw)
    return GRPOConfig(**base)


def test_grpo_writes_outputs_with_trl_metric_names(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    out = tmp_path / "run"
    trainer = GRPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, out, beta=0.1, sample_steps=1))
    assert trainer.setup.ref_model is not None
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    trainer.train()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for name in ("reward", "reward_std", "kl", "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean",
                 "clip_ratio/low_min", "clip_ratio/high_max", "entropy", "completions/mean_length",
                 "completions/min_length", "completions/max_length", "completions/clipped_ratio",
                 "frac_reward_zero_std", "rewards/short/mean", "tokens_per_second", "loss", "learning_rate"):
        assert all(math.isfinite(r[name]) for r in rows), name
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference on the first step
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 8 and "advantage" in samples[0]
    # 2 prompts x 4 generations per step: completions of one prompt are adjacent and share its prompt
    assert all(samples[i]["prompt"] == samples[i - i % 4]["prompt"] for i in range(8))
    assert (out / "plots" / "reward.png").exists() and (out / "model.safetensors").exists()


def test_no_reference_without_beta_and_dapo_normalises_over_the_whole_step(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    cfg = _config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "r", beta=0.0)
    trainer = GRPOTrainer(cfg)
    assert trainer.setup.ref_model is None and not trainer.setup.has_reference
    with torch.no_grad():
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:2], 1)
        (update,) = rollout.updates  # num_iterations 1: one optimizer step of 2 micro-batches of 4
        assert [len(mb["advantages"]) for mb in update] == [4, 4]
        # group advantages: each prompt's 4 completions are centred
        per_micro = [trainer.compute_loss(trainer.policy, {**mb, **rollout.scalars})[0][0] for mb in update]
        # the loop weights each micro-batch by 1/2: the sum must be the dapo loss of all 8 completions at once
        logps = [trainer.setup.logps(trainer.policy, mb) for mb in update]
        losses = [clipped_policy_loss(lp, lp, mb["advantages"], mb["response_mask"].bool())[0] for lp, mb in zip(logps, update)]
        width = max(l.shape[1] for l in losses)
        stacked = torch.cat([torch.nn.functional.pad(l, (0, width - l.shape[1])) for l in losses])
        masks = torch.cat([torch.nn.functional.pad(mb["response_mask"], (0, width - mb["response_mask"].shape[1])) for mb in update])
        whole = aggregate_token_loss(stacked, masks, loss_type="dapo")
    assert sum(per_micro) / 2 == pytest.approx(float(whole), abs=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_other_loss_types_and_iterations_run(tiny_model_dir, prompts_file, rewards_file, tmp_path, loss_type):
    # two iterations on one sampled batch: the first update is on-policy (ratio 1, nothing clipped); the
    # second starts from the updated policy, so its ratios move away from 1 and the old log-probs stay put
    out = tmp_path / loss_type
    trainer = GRPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, out, loss_type=loss_type,
                                  num_iterations=2, epsilon_high=0.28, max_steps=1))
    with torch.no_grad():
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:2], 1)
    assert len(rollout.updates) == 2 and "old_logps" in rollout.updates[0][0]
    first = {**rollout.updates[0][0], **rollout.scalars}
    with torch.no_grad():
        [(_, metrics)] = trainer.compute_loss(trainer.policy, first)
    assert float(metrics["clip_ratio/region_mean"]) == 0.0
    trainer.train()
    row = read_metrics(out)[0]
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--per_device_train_batch_size", "3", "--num_generations", "2"], "3 completions per step is not a multiple of --num_generations 2"),
        (["--per_device_train_batch_size", "16", "--num_generations", "2", "--gradient_accumulation_steps", "1"], "one rollout takes 8 prompts"),
        (["--loss_type", "gpg"], "invalid choice: 'gpg'"),
    ],
)
def test_cli_errors_are_one_line(capsys, tiny_model_dir, prompts_file, rewards_file, tmp_path, extra, message):
    code, _, err = run_cli(capsys, "grpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(prompts_file),
                           "--output_dir", str(tmp_path / "x"), "--reward_funcs", f"{rewards_file}:short", *extra)
    assert code != 0 and message in one_line(err)


@pytest.mark.parametrize("options", [
    {"loss_type": "bnpo"},
    {"loss_type": "cispo", "epsilon_high": 5.0},
    {"loss_type": "sapo"},
    {"loss_type": "grpo", "importance_sampling_level": "sequence"},
])
def test_loss_types_match_the_pure_loss_on_a_rollout(tiny_model_dir, prompts_file, rewards_file, tmp_path, options):
    # on-policy (old log-probs = current): each variant's micro-batch loss is its pure function's, reduced as
    # its loss_type says; and one optimizer step moves the weights
    from alignlab.losses.ppo import aggregate_token_loss, get_policy_loss

    trainer = GRPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "r", max_steps=1, **options))
    cfg = trainer.config
    with torch.no_grad():
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:2], 1)
        mb = {**rollout.updates[0][0], **rollout.scalars}
        [(loss, metrics)] = trainer.compute_loss(trainer.policy, mb)
        logps = trainer.setup.logps(trainer.policy, mb)
        extra = {"cispo": {"epsilon_high": 5.0}, "sapo": {}}.get(cfg.loss_type, {"cliprange": 0.2})
        per_token, _ = get_policy_loss(cfg.loss_type)(logps, logps, mb["advantages"], mb["response_mask"].bool(),
                                                     importance_sampling_level=cfg.importance_sampling_level, **extra)
        expected = aggregate_token_loss(per_token, mb["response_mask"].bool(), loss_type=cfg.loss_type,
                                        max_completion_length=cfg.max_completion_length,
                                        num_items_in_batch=mb["num_items_in_batch"])
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)
    clip_key = {"cispo": "cispo_clip_ratio", "sapo": None}.get(cfg.loss_type, "clip_ratio/region_mean")
    assert clip_key is None or clip_key in metrics
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())


def test_kl_bias_correction_keeps_the_value_on_policy_and_adds_kl_times_grad_logp(tiny_model_dir, prompts_file,
                                                                                   rewards_file, tmp_path):
    # use_bias_correction_kl (TRL 1.16's default): the k3 KL times the importance weight, which is 1 on-policy
    # but whose gradient adds beta * kl * grad log pi (reduced as the loss); off, the plain k3 term
    import dataclasses

    from alignlab.ops.kl import kl_k3

    trainer = GRPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "r", beta=0.1, max_steps=1,
                                  loss_type="grpo"))
    assert trainer.config.use_bias_correction_kl
    with torch.no_grad():
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:2], 1)
    mb = {**rollout.updates[0][0], **rollout.scalars}
    mask = mb["response_mask"].bool()
    mb["ref_logps"] = mb["ref_logps"] - 0.3 * mask  # a reference that differs from the policy: kl > 0
    params = [p for p in trainer.policy.parameters() if p.requires_grad]
    losses, grads = {}, {}
    for correction in (True, False):
        trainer.config = dataclasses.replace(trainer.config, use_bias_correction_kl=correction)
        trainer.policy.zero_grad()
        [(loss, metrics)] = trainer.compute_loss(trainer.policy, mb)
        loss.backward()
        losses[correction] = float(loss.detach())
        grads[correction] = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        assert float(metrics["kl"]) > 0
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    trainer.policy.zero_grad()
    logps = trainer.setup.logps(trainer.policy, mb)
    extra = aggregate_token_loss(0.1 * kl_k3(logps, mb["ref_logps"]).detach() * logps, mask, loss_type="grpo")
    extra.backward()
    difference = [a - b for a, b in zip(grads[True], grads[False])]
    assert any(d.abs().max() > 0 for d in difference)
    for d, p in zip(difference, params):
        torch.testing.assert_close(d, torch.zeros_like(p) if p.grad is None else p.grad, rtol=1e-4, atol=1e-7)


def test_top_entropy_quantile_and_off_policy_mask_shape_the_loss(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    """TRL's top_entropy_quantile and off_policy_mask_threshold: the policy term counts only the high-entropy
    tokens of the sequences kept, the reduction (dapo) still divides by every token."""
    from alignlab.losses.ppo import high_entropy_mask

    trainer = GRPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "r",
                                  top_entropy_quantile=0.25, off_policy_mask_threshold=0.1))
    with torch.no_grad():
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:2], 1)
        mb = {**rollout.updates[0][0], **rollout.scalars}
        mask = mb["response_mask"].bool()
        logps, entropy = trainer.setup.logps(trainer.policy, mb, with_entropy=True)
        adv = mb["advantages"]
        # old log-probs one nat above the current ones: every negative-advantage sequence is off-policy (KL 1 > 0.1)
        old = torch.where(mask, logps + 1.0, 0.0)
        [(loss, _)] = trainer.compute_loss(trainer.policy, {**mb, "old_logps": old})
        per_token = clipped_policy_loss(logps, old, adv, mask)[0]
        keep = high_entropy_mask(entropy, mask, 0.25) & (adv >= 0).unsqueeze(1)
        expected = aggregate_token_loss(per_token * keep, mask, loss_type="dapo",
                                        num_items_in_batch=mb["num_items_in_batch"])
        plain = aggregate_token_loss(per_token, mask, loss_type="dapo", num_items_in_batch=mb["num_items_in_batch"])
    assert 0 < keep.sum() < mask.sum() and (adv < 0).any()
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)
    assert float(loss) != pytest.approx(float(plain), abs=1e-6)


def test_multi_objective_aggregation_normalize_then_sum(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    """TRL's normalize_then_sum (GDPO): each source normalised per group, weighted sum, then the batch std."""
    from alignlab.advantages.group import group_advantages

    other = tmp_path / "long.py"
    other.write_text("def long(prompts, completions, **kw):\n    return [100.0 * len(c) for c in completions]\n")
    trainer = GRPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "r",
                                  reward_funcs=[f"{rewards_file}:short", f"{other}:long"], reward_weights=[1.0, 0.5],
                                  multi_objective_aggregation="normalize_then_sum"))
    torch.manual_seed(0)
    with torch.no_grad():
        scored = trainer.setup.sample(trainer.policy, trainer.prompts[:2], max_new_tokens=6, num_generations=4)
    rewards = trainer.advantage_scores(scored, 4)
    groups = torch.stack([scored.per_source["short"], scored.per_source["long"]], 1).view(2, 4, 2)
    normalised = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    expected = (normalised * torch.tensor([1.0, 0.5])).sum(-1).flatten()
    assert rewards.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert not torch.allclose(rewards, scored.scores)
    name, kw = trainer.advantage_estimator()
    advantages, _ = group_advantages(rewards, 4, **kw)
    trl = (expected - expected.mean()) / (expected.std() + 1e-4)  # TRL's batch-level step
    assert advantages.tolist() == pytest.approx(trl.tolist(), abs=1e-5)
    with pytest.raises(Exception, match="multi_objective_aggregation"):
        _config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "x", multi_objective_aggregation="mean")


def test_entropy_coef_subtracts_the_mean_entropy_with_its_gradient(tiny_model_dir, prompts_file, rewards_file,
                                                                   tmp_path):
    """TRL's entropy_coef: loss - coef * mean token entropy; the entropy's gradient (from the selected logits)
    matches autograd through the full logits."""
    trainer = GRPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "r", entropy_coef=0.5,
                                  padding_free=False))
    plain = GRPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "p", padding_free=False))
    with torch.no_grad():
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:2], 1)
    mb = {**rollout.updates[0][0], **rollout.scalars}
    model = trainer.policy
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(t, m):
        [(loss, metrics)] = t.compute_loss(m, mb)
        return loss, metrics, torch.autograd.grad(loss, params)

    loss, metrics, with_bonus = grads(trainer, model)
    loss0, _, without = grads(plain, model)
    # the reference: the entropy of softmax(logits / T) at the completion positions, from the full logits
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits[:, :-1].float()
    rows = torch.arange(logits.shape[0])[:, None]
    z = logits[rows, mb["completion_index"]] / trainer.config.temperature
    entropy = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
    mask = mb["response_mask"].bool()
    mean = torch.where(mask, entropy, 0.0).sum() / mask.sum()
    expected = torch.autograd.grad(-0.5 * mean, params)
    assert float(loss) == pytest.approx(float(loss0) - 0.5 * float(mean), abs=1e-5)
    assert metrics["entropy_coef"] == 0.5
    for a, b, e in zip(with_bonus, without, expected):
        assert torch.allclose(a - b, e, atol=1e-5), float((a - b - e).abs().max())


def test_use_adaptive_entropy_moves_the_coefficient_once_per_optimizer_step(tiny_model_dir, prompts_file,
                                                                             rewards_file, tmp_path):
    """TRL's use_adaptive_entropy: no bonus before the first measurement; after each optimizer step's micro-batches
    the coefficient moves by entropy_coef_delta toward keeping the entropy at entropy_target; checkpointed."""
    cfg = dict(use_adaptive_entropy=True, entropy_coef=0.1, entropy_coef_delta=0.05, entropy_target=100.0,
               padding_free=False)
    trainer = GRPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "r", **cfg))
    plain = GRPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "p", padding_free=False))
    with torch.no_grad():
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:2], 1)
    (update,) = rollout.updates
    assert trainer.adaptive.pending == [2]
    first, second = ({**mb, **rollout.scalars} for mb in update)
    [(loss, _)] = trainer.compute_loss(trainer.policy, first)
    [(loss0, _)] = plain.compute_loss(trainer.policy, first)
    assert float(loss) == pytest.approx(float(loss0), abs=1e-6)  # entropy still unmeasured (inf): no bonus
    assert trainer.adaptive.coef == 0.1
    trainer.compute_loss(trainer.policy, second)  # the step's last micro-batch: entropy <= 100, so up by delta
    assert trainer.adaptive.coef == pytest.approx(0.15) and trainer.adaptive.last_entropy < 100
    [(loss, metrics)] = trainer.compute_loss(trainer.policy, {**first})  # the next step applies 0.15
    [(loss0, _)] = plain.compute_loss(trainer.policy, first)
    assert float(loss) < float(loss0) and metrics["entropy_coef"] == pytest.approx(0.15)
    state = trainer.adaptive.state_dict()
    trainer.adaptive.load_state_dict({"entropy_coef": 0.3, "last_world_entropy": 1.0})
    assert (trainer.adaptive.coef, trainer.adaptive.last_entropy) == (0.3, 1.0)
    assert state["entropy_coef"] == pytest.approx(0.15)


def test_adaptive_entropy_state_is_checkpointed_and_resumed(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    """The controller's coefficient travels in checkpoints (accelerate's register_for_checkpointing), as TRL's
    entropy_ctrl_state.json."""
    cfg = dict(use_adaptive_entropy=True, entropy_coef=0.1, entropy_coef_delta=0.05, entropy_target=100.0,
               save_steps=1, max_steps=2)
    first = GRPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "r", **cfg))
    first.train()
    assert first.adaptive.coef == pytest.approx(0.2)  # one optimizer step (2 micro-batches) per step: +delta each
    again = GRPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "s", **cfg,
                                resume_from_checkpoint=str(tmp_path / "r" / "checkpoint-1")))
    again.train()
    assert again.adaptive.coef == pytest.approx(0.2)  # restored at 0.15, then step 2 (from scratch: 0.15)

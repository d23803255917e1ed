"""PPO end to end on the tiny model: outputs, metrics, updates of policy and critic, the first update's ratio,
LoRA with a shared base, a reward model as the reward, resume, and one-line errors through the CLI."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from alignlab.algorithms.ppo import PPOConfig, PPOTrainer, explained_variance, train_ppo
from alignlab.errors import UserError
from tests.conftest import one_line, read_metrics, run_cli

@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"Say something about {i}."}], "topic": str(i)} for i in range(6)]
    rows += [{"prompt": f"Plain text prompt {i}:"} for i in range(2)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(model, data, rewards, out, **kw):
    base = dict(
        model_name_or_path=model,
        dataset_name=str(data),
        output_dir=str(out),
        reward_funcs=[f"{rewards}:short"],
        per_device_train_batch_size=2,
        num_mini_batches=2,
        num_ppo_epochs=2,
        response_length=6,
        max_steps=2,
        learning_rate=1e-3,
        save_steps=0,
        bf16=False,
        logging_steps=1,
    )
    base.update(kw)
    return PPOConfig(**base)


PPO_METRICS = (
    "objective/scores", "objective/kl", "objective/entropy", "objective/rlhf_reward", "objective/non_score_reward",
    "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value", "val/clipfrac", "val/explained_variance",
    "completions/mean_length", "completions/clipped_ratio", "time/generation", "time/scoring", "time/training",
    "tokens_per_second/generation", "tokens_per_second/train", "learning_rate", "grad_norm",
)


def test_ppo_writes_outputs_and_updates_policy_and_critic(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    out = tmp_path / "run"
    cfg = _config(tiny_model_dir, prompts_file, rewards_file, out, sample_steps=2)
    trainer = PPOTrainer(cfg)
    policy_before = {k: v.clone() for k, v in trainer.model.policy.state_dict().items()}
    critic_before = {k: v.clone() for k, v in trainer.model.value_model.state_dict().items()}
    result = trainer.train()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and result.global_step == 2
    for name in PPO_METRICS:
        assert all(math.isfinite(r[name]) for r in rows), name
    # policy == reference while sampling the first batch; the old log-probs come from generate's scores (KV
    # cache), the reference's from a full forward, so they agree to float32 rounding
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    assert rows[0]["objective/entropy"] > 0
    assert rows[1]["learning_rate"] < rows[0]["learning_rate"]  # linear decay, one scheduler step per rollout
    # both models were trained
    assert any(not torch.equal(policy_before[k], v) for k, v in trainer.model.policy.state_dict().items())
    critic_after = trainer.model.value_model.state_dict()
    assert not torch.equal(critic_before["score.weight"], critic_after["score.weight"])
    # the policy alone is saved, in HF format
    saved = load_file(out / "model.safetensors")
    assert "model.embed_tokens.weight" in saved and not any(k.startswith("score") for k in saved)
    assert (out / "config.yaml").exists() and (out / "plots" / "reward.png").exists() and (out / "plots" / "kl.png").exists()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 2] and len(samples) == 2 * 4
    assert {"prompt", "completion", "score", "rewards/short"} <= set(samples[0])


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_first_update_starts_at_ratio_one(tiny_model_dir, prompts_file, rewards_file, tmp_path, top_p):
    """The training forward of the first micro-batch reproduces the rollout's log-probs and values, so the
    ratio is 1 and nothing is clipped (a misaligned index or a different forward would show here). With
    top_p 1 the old log-probs come from generate's scores, with top_p < 1 from a forward."""
    cfg = _config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "r", padding_free=True, top_p=top_p)
    trainer = PPOTrainer(cfg)
    with torch.no_grad():
        rollout = trainer.rollout(trainer.model, trainer.prompts[:4], 1)
        assert len(rollout.updates) == cfg.num_ppo_epochs * cfg.num_mini_batches
        assert all(len(u) == 1 for u in rollout.updates)  # mini-batch 2 == micro-batch 2
        batch = rollout.updates[0][0]
        terms = list(trainer.compute_loss(trainer.model, batch))  # policy, then value term
        loss, metrics = sum(t[0] for t in terms), {**terms[0][1], **terms[1][1]}
        logps, values = trainer.model(batch)
    assert metrics["policy/approxkl"] < 1e-10 and metrics["policy/clipfrac"] == 0
    assert torch.allclose(logps, batch["old_logps"], atol=1e-5) and torch.allclose(values, batch["old_values"], atol=1e-5)
    # advantages are whitened over the whole rollout and zero on padding
    assert math.isfinite(float(loss))
    assert (batch["advantages"][batch["response_mask"] == 0] == 0).all()


def test_num_generations_samples_each_prompt_that_many_times(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    """``num_generations`` completions of each prompt per step (OpenRLHF's ``n_samples_per_prompt``), each its own
    row of the rollout with its own advantages; the batch must hold whole groups."""
    cfg = _config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "g", num_generations=2,
                  per_device_train_batch_size=4, num_mini_batches=1, num_ppo_epochs=1, max_steps=1, sample_steps=1)
    assert cfg.rollout_batch_size == 2  # prompts per step
    trainer = PPOTrainer(cfg)
    assert trainer.prompts_per_step == 2
    with torch.no_grad():
        rollout = trainer.rollout(trainer.model, trainer.prompts[:2], 1)
    [[batch]] = rollout.updates
    assert batch["response_mask"].shape[0] == 4 and batch["advantages"].abs().sum() > 0
    trainer.train()
    samples = [json.loads(line) for line in (tmp_path / "g" / "samples.jsonl").read_text().splitlines()]
    prompts = [json.dumps(s["prompt"]) for s in samples]
    assert len(samples) == 4 and all(prompts.count(p) == 2 for p in prompts)
    with pytest.raises(UserError, match="multiple of the 3 completions per prompt"):
        PPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "h", num_generations=3,
                           per_device_train_batch_size=4))


class _Wrapped(torch.nn.Module):
    """Stands in for a DDP wrapper: not a PolicyAndValue, so compute_loss takes its one-backward path."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, batch):
        return self.module(batch)


def test_loss_terms_give_the_gradient_of_the_summed_loss(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    """The policy and value terms back-propagated one after the other (one process) give the same loss and
    gradients as their sum back-propagated once (the DDP path)."""
    cfg = _config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "t", padding_free=True)
    trainer = PPOTrainer(cfg)
    model = trainer.model
    with torch.no_grad():
        batch = trainer.rollout(model, trainer.prompts[:4], 1).updates[0][0]
    model.train()
    losses = 0.0
    for loss, _ in trainer.compute_loss(model, batch):
        loss.backward()
        losses = losses + loss.detach()
    staged = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    [(summed, metrics)] = trainer.compute_loss(_Wrapped(model), batch)
    summed.backward()
    assert {"loss/policy", "loss/value", "policy/clipfrac", "val/clipfrac"} <= set(metrics)
    assert torch.allclose(losses, summed.detach())
    assert staged.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("policy.") for n in staged) and any(n.startswith("value_model.") for n in staged)
    for name, grad in staged.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-6), name


def test_lora_shares_the_base_and_a_reward_model_scores(tiny_model_dir, tiny_tokenizer, prompts_file, tmp_path):
    from alignlab.models import load_reward_model

    rm_dir = tmp_path / "rm"
    torch.manual_seed(1)
    load_reward_model(tiny_model_dir, pad_token_id=tiny_tokenizer.pad_token_id).save_pretrained(rm_dir)
    tiny_tokenizer.save_pretrained(rm_dir)
    out = tmp_path / "lora"
    cfg = _config(tiny_model_dir, prompts_file, None, out, reward_funcs=None, reward_model_path=str(rm_dir),
                  use_peft=True, lora_r=4, lora_alpha=8, missing_eos_penalty=1.0, kl_estimator="k3")
    trainer = PPOTrainer(cfg)
    assert trainer.ref_model is None  # the reference is the policy with its adapters disabled
    # the value model starts from the reward model: same score head
    rm_head = load_file(rm_dir / "model.safetensors")["score.weight"]
    assert torch.equal(trainer.model.value_model.base_model.model.score.original_module.weight, rm_head)
    trainer.train()
    rows = read_metrics(out)
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # generation vs forward rounding only
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert (out / "adapter_model.safetensors").exists()


def test_resume_continues_from_the_checkpoint(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    out = tmp_path / "res"
    train_ppo(_config(tiny_model_dir, prompts_file, rewards_file, out, max_steps=2, save_steps=1))
    assert (out / "checkpoint-1").exists()  # the last step writes the final model, not a checkpoint
    train_ppo(_config(tiny_model_dir, prompts_file, rewards_file, out, max_steps=3, save_steps=1,
                      resume_from_checkpoint="true"))
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_explained_variance_by_hand():
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]]).bool()
    # perfect critic -> 1; constant critic at the mean -> 0 (Var(returns - 2) == Var(returns))
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)
    # values 0: Var(returns) / Var(returns) -> 0 as well; values = -returns: 1 - 4 = -3
    assert explained_variance(-returns, returns, mask) == pytest.approx(-3.0)


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "give --reward_model_path and/or --reward_funcs"),
        (["--reward_funcs", "nope.py:f"], "--reward_funcs 'nope.py:f': file not found"),
        (["--reward_funcs", "{rewards}:short", "--reward_weights", "1", "2"], "--reward_weights has 2 values for 1"),
        (["--reward_funcs", "{rewards}:short", "--per_device_train_batch_size", "16"], "one rollout takes 16 prompts"),
        (["--reward_funcs", "{rewards}:short", "--eval_split_size", "0.2"], "no evaluation pass"),
        (["--reward_funcs", "{rewards}:short", "--kl_estimator", "k2"], "invalid choice: 'k2'"),
    ],
)
def test_cli_errors_are_one_line(capsys, tiny_model_dir, prompts_file, rewards_file, tmp_path, extra, message):
    extra = [e.format(rewards=rewards_file) for e in extra]
    code, _, err = run_cli(capsys, "ppo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(prompts_file),
                           "--output_dir", str(tmp_path / "x"), "--bf16", "false", *extra)
    assert code != 0 and message in one_line(err)


def test_cli_reports_a_failing_reward_function(capsys, tiny_model_dir, prompts_file, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(prompts, completions, **kw):\n    return [1.0]\n")
    code, _, err = run_cli(capsys, "ppo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(prompts_file),
                           "--output_dir", str(tmp_path / "x"), "--reward_funcs", f"{bad}:f", "--bf16", "false",
                           "--per_device_train_batch_size", "2", "--response_length", "3", "--max_steps", "1")
    assert code == 1 and f"reward function {bad}:f must return a list of 2 numbers, got 1 values" in one_line(err)

"""Online DPO end to end on the tiny model: pairs from the policy's own completions, TRL's metric names, the
chosen/rejected pick, LoRA with the disabled-adapter reference, and one-line errors."""

import json
import math

import pytest
import torch

from alignlab.algorithms.online_dpo import OnlineDPOConfig, OnlineDPOTrainer, pick_chosen, tied_pair_weights
from tests.conftest import one_line, read_metrics, run_cli

def _config(model, data, rewards, out, **kw):
    base = dict(
        model_name_or_path=model, dataset_name=str(data), output_dir=str(out), reward_funcs=[f"{rewards}:short"],
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_new_tokens=6, max_steps=2,
        learning_rate=1e-3, save_steps=0, bf16=False, logging_steps=1,
    )
    base.update(kw)
    return OnlineDPOConfig(**base)


def test_pick_chosen_by_hand():
    # prompt 0: 1.0 vs 2.0 -> second (index 1) chosen; prompt 1: tie -> first (index 2); prompt 2: 5 vs -1 -> first
    chosen, rejected = pick_chosen(torch.tensor([1.0, 2.0, 3.0, 3.0, 5.0, -1.0]))
    assert chosen.tolist() == [1, 2, 4] and rejected.tolist() == [0, 3, 5]


def test_pick_chosen_best_and_worst_of_a_group():
    # groups of 3: [1, 5, 2] -> chosen 1, rejected 0; [4, 4, 0] -> the first of the maxima (3), rejected 5;
    # [2, 7, 7] -> the first 7 (7), rejected 6; [3, 3, 3], all tied -> the first (9) over the last (11)
    scores = torch.tensor([1.0, 5.0, 2.0, 4.0, 4.0, 0.0, 2.0, 7.0, 7.0, 3.0, 3.0, 3.0])
    chosen, rejected = pick_chosen(scores, 3)
    assert chosen.tolist() == [1, 3, 7, 9] and rejected.tolist() == [0, 5, 6, 11]
    with pytest.raises(ValueError, match="groups of num_generations=3"):
        pick_chosen(torch.zeros(4), 3)


def test_best_and_worst_of_four_make_the_pairs(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    # 4 completions per prompt: each micro-batch pairs the highest- and the lowest-scored completion of a prompt
    trainer = OnlineDPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "g4",
                                       num_generations=4, drop_tied_pairs=False))
    with torch.no_grad():
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:4], 1)
    (update,) = rollout.updates
    assert len(update) == 2 and all(mb["input_ids"].shape[0] == 4 for mb in update)  # 2 pairs per micro-batch
    margins = rollout.metrics["objective/scores_margin"]
    scores = rollout.metrics["objective/scores"].view(4, 4)
    assert torch.equal(margins, scores.max(1).values - scores.min(1).values)
    [(loss, _)] = trainer.compute_loss(trainer.policy, update[0])
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-5)  # policy == reference


def test_tied_pair_weights_by_hand():
    # 4 pairs, 2 tied: the untied ones weigh 4 / 2 = 2, so the mean over all 4 is the mean over the untied 2
    weights = tied_pair_weights(torch.tensor([False, True, False, True]))
    assert weights.tolist() == [2.0, 0.0, 2.0, 0.0]
    losses = torch.tensor([0.5, 9.0, 0.7, 9.0])
    assert float((weights * losses).mean()) == pytest.approx(0.6)
    assert tied_pair_weights(torch.tensor([False, False])).tolist() == [1.0, 1.0]
    assert tied_pair_weights(torch.tensor([True, True])).tolist() == [0.0, 0.0]


CONSTANT_REWARD = "def constant(prompts, completions, **kwargs):\n    return [0.5 for _ in completions]\n"


@pytest.mark.parametrize("drop", [True, False])
def test_tied_pairs_are_left_out_of_the_loss(tiny_model_dir, prompts_file, tmp_path, drop):
    # every pair ties under a constant reward: dropped, the step's loss is 0 and the policy does not move (Adam's
    # first step from zero gradients is zero); kept (TRL's rule), the first completion is trained up
    rewards = tmp_path / "constant.py"
    rewards.write_text(CONSTANT_REWARD)
    out = tmp_path / f"drop-{drop}"
    trainer = OnlineDPOTrainer(_config(tiny_model_dir, prompts_file, tmp_path / "unused", out, max_steps=1,
                                       reward_funcs=[f"{rewards}:constant"], drop_tied_pairs=drop))
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    trainer.train()
    row = read_metrics(out)[0]
    assert row["frac_reward_zero_std"] == 1.0
    moved = any(not torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    if drop:
        assert row["loss"] == 0.0 and not moved
    else:
        assert row["loss"] == pytest.approx(math.log(2), abs=1e-5) and moved


def test_online_dpo_trains_and_logs_trl_names(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    out = tmp_path / "run"
    trainer = OnlineDPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, out))
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    with torch.no_grad():
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:4], 1)
    (update,) = rollout.updates
    assert len(update) == 2 and all(mb["input_ids"].shape[0] == 4 for mb in update)  # 2 pairs per micro-batch
    # the first micro-batch: loss at the reference is log 2 per untied pair (policy == reference), margins 0
    [(loss, metrics)] = trainer.compute_loss(trainer.policy, update[0])
    weight = update[0]["pair_weight"].chunk(2)[0]  # 0 for a tied pair, else pairs / untied pairs of the step
    assert float(loss.detach()) == pytest.approx(math.log(2) * float(weight.mean()), abs=1e-5)
    assert float(metrics["rewards/margins"].abs().max()) < 1e-5
    # TRL's sampled entropy estimate: -log pi of each completion, the mean of -logps/chosen and -logps/rejected
    entropy = float(metrics["objective/entropy"].mean())
    assert entropy > 0 and entropy == pytest.approx(
        -(float(metrics["logps/chosen"].mean()) + float(metrics["logps/rejected"].mean())) / 2, rel=1e-5)
    trainer.train()
    rows = read_metrics(out)
    for name in ("objective/scores", "objective/kl", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                 "rewards/margins", "loss", "completions/mean_length", "tokens_per_second", "frac_reward_zero_std", "objective/entropy"):
        assert all(math.isfinite(r[name]) for r in rows), name
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sum(s["chosen"] for s in samples) == len(samples) // 2


def test_lora_and_ipo(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    out = tmp_path / "lora"
    trainer = OnlineDPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, out, use_peft=True, lora_r=4,
                                       lora_alpha=8, loss_type="ipo", max_steps=1))
    assert trainer.setup.ref_model is None
    trainer.train()
    # LoRA starts at zero, so the policy is the reference: every log-ratio is 0 and IPO's loss is
    # (0 - 1 / (2 beta))^2 = (1 / 0.2)^2 = 25 at beta 0.1
    assert read_metrics(out)[0]["loss"] == pytest.approx(25.0, rel=1e-4)
    assert (out / "adapter_model.safetensors").exists()


def test_cli_errors_are_one_line(capsys, tiny_model_dir, prompts_file, rewards_file, tmp_path):
    code, _, err = run_cli(capsys, "online-dpo", "--model_name_or_path", tiny_model_dir, "--dataset_name",
                           str(prompts_file), "--output_dir", str(tmp_path / "x"), "--reward_funcs",
                           f"{rewards_file}:short", "--beta", "0")
    assert code != 0 and "--beta must be > 0" in one_line(err)


def test_any_registered_loss_with_its_declared_hyperparameters(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    # exo_pair reads label_smoothing e: at the reference (h = 0) q_w = q_l = 1/2 and the loss is
    # 0.5 (log 0.5 - log(1 - e)) + 0.5 (log 0.5 - log e) = 0.5 (-0.6931472 + 0.1053605) + 0.5 (-0.6931472 + 2.3025851)
    # = 0.5108256 for e = 0.1, the same for every pair
    trainer = OnlineDPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "exo",
                                       loss_type="exo_pair", label_smoothing=0.1, max_steps=1))
    assert trainer.config.loss_hyperparameters() == {"beta": 0.1, "label_smoothing": 0.1}
    with torch.no_grad():
        (update,) = trainer.rollout(trainer.policy, trainer.prompts[:4], 1).updates
        [(loss, metrics)] = trainer.compute_loss(trainer.policy, update[0])
    assert float(loss) == pytest.approx(0.5108256, abs=1e-5) and "objective/kl" in metrics


def test_a_reference_free_loss_loads_no_reference(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    from alignlab.losses.dpo import PairLogps, simpo_loss

    out = tmp_path / "simpo"
    trainer = OnlineDPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, out, loss_type="simpo",
                                       simpo_gamma=0.3, beta=2.0, max_steps=1))
    assert trainer.setup.ref_model is None and not trainer.setup.has_reference
    with torch.no_grad():
        (update,) = trainer.rollout(trainer.policy, trainer.prompts[:4], 1).updates
        batch = update[0]
        assert "ref_logps" not in batch
        [(loss, metrics)] = trainer.compute_loss(trainer.policy, batch)
        # the same loss from the policy's own summed log-probs, by simpo_loss with this config's gamma and beta
        chosen, rejected = trainer._logps(trainer.policy, batch).chunk(2)
        lengths = batch["response_mask"].sum(1).float().chunk(2)
        expected = simpo_loss(PairLogps(chosen, rejected, *lengths), beta=2.0, simpo_gamma=0.3).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6) and "objective/kl" not in metrics
    trainer.train()
    row = read_metrics(out)[0]
    assert math.isfinite(row["loss"]) and math.isfinite(row["rewards/margins"]) and "objective/kl" not in row


def test_max_length_cuts_the_prompts_on_the_left_for_the_log_probs(tiny_model_dir, prompts_file, rewards_file,
                                                                   tmp_path):
    """TRL's Online DPO max_length: prompt + the step's longest completion fit it; the completions stay whole and
    the prompts keep their last tokens (sampling saw the whole prompt)."""
    from alignlab.data.sequences import left_truncated_prompts

    assert left_truncated_prompts([[1, 2, 3, 4], [5, 6]], [[7], [8, 9]], 4) == [[3, 4], [5, 6]]
    assert left_truncated_prompts([[1, 2, 3]], [[7, 8, 9]], 3) == [[3]]  # at least one prompt token
    trainer = OnlineDPOTrainer(_config(tiny_model_dir, prompts_file, rewards_file, tmp_path / "m", max_length=10,
                                       drop_tied_pairs=False))
    torch.manual_seed(0)
    with torch.no_grad():
        rollout = trainer.rollout(trainer.policy, trainer.prompts[:4], 1)
        (update,) = rollout.updates
        mb = update[0]
        longest = int(mb["response_mask"].sum(1).max())
        assert len(trainer.prompts[0]["prompt_ids"]) > 10 - longest
        lengths = mb["attention_mask"].sum(1)
        assert int(lengths.max()) <= 10 and torch.equal(mb["completion_mask"].sum(1), mb["response_mask"].sum(1))
        [(loss, _)] = trainer.compute_loss(trainer.policy, mb)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-5)  # the reference saw the same cut pairs

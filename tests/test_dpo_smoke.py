"""DPO end to end on the tiny model: outputs, parameter updates, LoRA, precomputed reference, resume."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignlab.algorithms.dpo import DPOConfig, train_dpo
from tests.conftest import read_metrics, tiny_config


def _config(model, data, out, **kw):
    return tiny_config(DPOConfig, model, data, out, **kw)


def test_full_dpo_writes_outputs_and_updates_weights(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    result = train_dpo(_config(tiny_model_dir, pairs_file, out, eval_split_size=4, bf16=True))
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "tokens_per_second"):
        assert all(math.isfinite(r[name]) for r in train_rows), name
    assert eval_rows and eval_rows[-1]["step"] == 3 and "eval_rewards/accuracies" in eval_rows[-1]
    assert result.eval_metrics["eval_rewards/accuracies"] == eval_rows[-1]["eval_rewards/accuracies"]
    before = load_file(Path(tiny_model_dir) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["beta"] == 0.1 and cfg["loss_type"] == ["sigmoid"]
    for stem in ("loss", "rewards_accuracies", "rewards_margins", "rewards"):
        assert (out / "plots" / f"{stem}.png").stat().st_size > 1000
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)


def test_lora_saves_adapter_or_merged_model(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    train_dpo(_config(tiny_model_dir, pairs_file, out, use_peft=True, lora_r=4, lora_alpha=8, max_steps=2))
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert read_metrics(out)[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)  # adapters start at zero
    model = AutoModelForCausalLM.from_pretrained(out)
    assert hasattr(model, "peft_config")

    merged = tmp_path / "merged"
    train_dpo(_config(tiny_model_dir, pairs_file, merged, use_peft=True, lora_r=4, max_steps=2, merge_lora=True))
    assert (merged / "model.safetensors").exists() and not (merged / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(merged)


def test_precomputed_reference_gives_same_first_step(tiny_model_dir, pairs_file, tmp_path):
    live = read_metrics(train_dpo(_config(tiny_model_dir, pairs_file, tmp_path / "a", max_steps=2)).output_dir)
    pre = read_metrics(
        train_dpo(_config(tiny_model_dir, pairs_file, tmp_path / "b", max_steps=2, precompute_ref_log_probs=True)).output_dir
    )
    for name in ("loss", "rewards/margins", "logps/chosen"):
        assert pre[0][name] == pytest.approx(live[0][name], rel=1e-4, abs=1e-6)
        assert pre[1][name] == pytest.approx(live[1][name], rel=1e-3, abs=1e-5)


def test_gradient_accumulation_matches_larger_batch(tiny_model_dir, pairs_file, tmp_path):
    one = read_metrics(train_dpo(_config(tiny_model_dir, pairs_file, tmp_path / "a", max_steps=2)).output_dir)
    two = read_metrics(
        train_dpo(
            _config(tiny_model_dir, pairs_file, tmp_path / "b", max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
        ).output_dir
    )
    # same 4 pairs in step 1, same gradient, so the same parameters going into step 2
    for name in ("loss", "rewards/margins", "grad_norm"):
        assert two[0][name] == pytest.approx(one[0][name], rel=1e-4, abs=1e-6), name
    assert two[1]["loss"] == pytest.approx(one[1]["loss"], rel=1e-3)


def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    kw = dict(max_steps=4, save_steps=1, save_total_limit=2)
    train_dpo(_config(tiny_model_dir, pairs_file, out, **kw))
    full = read_metrics(out)
    # checkpoints after steps 1, 2, 3 (none at the last step); the limit keeps the newest two
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not list(out.glob(".checkpoint-*"))  # no partial checkpoint left behind
    train_dpo(_config(tiny_model_dir, pairs_file, out, resume_from_checkpoint=str(out / "checkpoint-2"), **kw))
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full[2:], resumed[2:]):
        for name in ("loss", "rewards/margins", "learning_rate"):
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-7), (a["step"], name)
    # `true` picks the newest checkpoint
    train_dpo(_config(tiny_model_dir, pairs_file, out, resume_from_checkpoint="true", **kw))
    again = read_metrics(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert again[3]["loss"] == pytest.approx(full[3]["loss"], rel=1e-5)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_load_no_reference_and_learn(tiny_model_dir, pairs_file, tmp_path, loss_type):
    from alignlab.algorithms.dpo import DPOTrainer

    cfg = _config(tiny_model_dir, pairs_file, tmp_path / loss_type, loss_type=loss_type, max_steps=6,
                  per_device_train_batch_size=12)
    trainer = DPOTrainer(cfg)
    assert trainer.ref_model is None and not cfg.needs_reference
    trainer.train()
    rows = read_metrics(tmp_path / loss_type)
    # the same 12 pairs every step: the loss falls and the margin between chosen and rejected grows
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]


def test_several_loss_types_are_weighted(tiny_model_dir, pairs_file, tmp_path):
    # loss_type [sigmoid, sft] with weights [1, 0]: the sft term adds nothing, so step 1's loss is sigmoid's log 2
    train_dpo(_config(tiny_model_dir, pairs_file, tmp_path / "mix", loss_type=["sigmoid", "sft"],
                      loss_weights=[1.0, 0.0], max_steps=1))
    assert read_metrics(tmp_path / "mix")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_report_to_tensorboard_model_card_and_output_dir_lock(tiny_model_dir, pairs_file, tmp_path):
    from huggingface_hub import ModelCard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from alignlab.errors import UserError
    from alignlab.train.lock import OutputDirLock

    out = tmp_path / "tb"
    train_dpo(_config(tiny_model_dir, pairs_file, out, report_to=["tensorboard"]))
    rows = read_metrics(out)
    events = EventAccumulator(str(next((out / "runs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in logged] == [1, 2, 3]
    assert [v for _, v in logged] == pytest.approx([r["loss"] for r in rows])
    card = ModelCard.load(out / "README.md")
    assert "DPO" in card.text and f"{rows[-1]['loss']:.4g}"[:4] in card.text
    with OutputDirLock(out):  # a live run holds the folder: a second one is refused
        with pytest.raises(UserError, match="in use by a live run"):
            train_dpo(_config(tiny_model_dir, pairs_file, out))


def _first_batch(trainer, n=2):
    from alignlab.data.preference import collate_pairs

    return collate_pairs(trainer.train_examples[:n], trainer._pad_id)


def test_ld_alpha_weighs_the_verbose_tokens(tiny_model_dir, pairs_file, tmp_path):
    """LD-DPO (TRL's ld_alpha): each pair's tokens past the shorter completion's length count ld_alpha times."""
    from alignlab.algorithms.dpo import DPOTrainer
    from alignlab.ops.logprobs import completion_logps

    trainer = DPOTrainer(_config(tiny_model_dir, pairs_file, tmp_path / "r", ld_alpha=0.25))
    batch = _first_batch(trainer)
    with torch.no_grad():
        per_token = completion_logps(trainer.policy, batch["input_ids"], batch["attention_mask"],
                                     batch["completion_mask"], padding_free=False)[0]
        got = trainer._logps(trainer.policy, batch)
    tokens = (batch["completion_mask"][:, 1:] * batch["attention_mask"][:, 1:]).bool()
    lengths = tokens.sum(dim=1)
    assert lengths[0] != lengths[2] or lengths[1] != lengths[3]  # some pair has verbose tokens
    for row in range(4):
        shared = int(min(lengths[row % 2], lengths[2 + row % 2]))
        values = per_token[row][tokens[row]]
        assert float(got[row]) == pytest.approx(float(values[:shared].sum() + 0.25 * values[shared:].sum()), abs=1e-4)


def test_f_divergence_type_scores_the_log_ratios(tiny_model_dir, pairs_file, tmp_path):
    """f-DPO (TRL's f_divergence_type): forward KL's score 1 - 1/u replaces the log-ratio in the loss; the
    rewards/* metrics stay beta times the log-ratios, as TRL."""
    from alignlab.algorithms.dpo import DPOTrainer
    from alignlab.errors import UserError

    trainer = DPOTrainer(_config(tiny_model_dir, pairs_file, tmp_path / "r", f_divergence_type="forward_kl",
                                 beta=1.0))
    batch = _first_batch(trainer, 1)
    with torch.no_grad():
        chosen, rejected = trainer._logps(trainer.policy, batch).chunk(2)
        batch.update(ref_chosen_logps=chosen - math.log(2.0), ref_rejected_logps=rejected)  # ratios 2 and 1
        [(loss, metrics)] = trainer.compute_loss(trainer.policy, batch)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-4)  # -log sigmoid(0.5 - 0)
    assert float(metrics["rewards/chosen"].mean()) == pytest.approx(math.log(2.0), abs=1e-4)
    with pytest.raises(UserError, match="f_divergence_type"):
        _config(tiny_model_dir, pairs_file, tmp_path / "x", f_divergence_type="forward_kl", loss_type="apo_zero")

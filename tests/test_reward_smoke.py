"""Reward model end to end on the tiny model: the scored token, outputs, parameter updates, margins, LoRA with a
trainable score head, ``alignlab score``, and one-line errors through the CLI."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from alignlab.algorithms.reward import RewardConfig, RewardTrainer, collate_reward_pairs, sequence_scores, train_reward
from alignlab.models import load_reward_model
from tests.conftest import one_line, read_metrics, run_cli, tiny_config


def _config(model, data, out, **kw):
    return tiny_config(RewardConfig, model, data, out, **kw)


def test_score_is_read_at_the_last_real_token(tiny_model_dir, tiny_tokenizer):
    """pad == eos here, so a sequence ending in EOS must still be scored at that EOS, and padding must not matter."""
    tok = tiny_tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    torch.manual_seed(0)
    model = load_reward_model(tiny_model_dir, pad_token_id=tok.pad_token_id).eval()
    assert model.config.pad_token_id == tok.pad_token_id and model.config.num_labels == 1
    short = tok("Paris.").input_ids + [tok.eos_token_id]
    long = tok("The capital of France is Paris, of course.").input_ids + [tok.eos_token_id]
    width = len(long)
    input_ids = torch.tensor([short + [tok.pad_token_id] * (width - len(short)), long])
    attention_mask = torch.tensor([[1] * len(short) + [0] * (width - len(short)), [1] * width])
    with torch.no_grad():
        scores = sequence_scores(model, input_ids, attention_mask)
        # expected: each sequence alone, the score head on the final hidden state of its last token (the EOS)
        expected = [model.score(model.model(input_ids=torch.tensor([s])).last_hidden_state[0, -1]).item() for s in (short, long)]
        # transformers' own pooling skips trailing pad-id tokens, i.e. the EOS: one token too early
        hf = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        before_eos = model.score(model.model(input_ids=torch.tensor([short[:-1]])).last_hidden_state[0, -1]).item()
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert hf[0].item() == pytest.approx(before_eos, abs=1e-5)
    assert abs(scores[0].item() - hf[0].item()) > 1e-4


def test_reward_writes_outputs_updates_weights_and_scores(capsys, tiny_model_dir, pairs_file, tmp_path):
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"prompt": f"What is {i} times 2?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 3}, maybe."}) + "\n" for i in range(6)))
    out = tmp_path / "rm"
    result = train_reward(_config(tiny_model_dir, pairs_file, out, eval_dataset_name=str(evals)))
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    names = ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "learning_rate", "grad_norm", "tokens_per_second")
    for name in names:
        assert all(math.isfinite(r[name]) for r in train_rows), name
    eval_row = [r for r in rows if "eval_loss" in r][-1]
    for name in ("eval_loss", "eval_accuracy", "eval_margin", "eval_rewards/chosen", "eval_rewards/rejected"):
        assert math.isfinite(eval_row[name]), name
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    before = load_file(Path(tiny_model_dir) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert "score.weight" in after and after["score.weight"].shape[0] == 1
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    for stem in ("loss", "accuracy", "margin", "rewards"):
        assert (out / "plots" / f"{stem}.png").stat().st_size > 1000
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == AutoTokenizer.from_pretrained(out).pad_token_id

    # `alignlab score` on the eval file reproduces the run's final evaluation (same scoring function, same batches)
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    code, stdout, err = run_cli(capsys, "score", "--reward_model_path", str(out), "--dataset_name", str(evals), "--bf16", "false")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing  # writes nothing
    printed = dict(line.split(": ") for line in stdout.strip().splitlines())
    assert int(printed["pairs"]) == 6
    assert float(printed["accuracy"]) == pytest.approx(result.eval_metrics["eval_accuracy"], abs=1e-4)
    assert float(printed["mean chosen score"]) == pytest.approx(eval_row["eval_rewards/chosen"], abs=1e-4)
    assert float(printed["mean rejected score"]) == pytest.approx(eval_row["eval_rewards/rejected"], abs=1e-4)


def test_margin_column_and_centring_reach_the_loss(tiny_model_dir, tmp_path):
    data = tmp_path / "margins.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no", "margin": float(i)}) + "\n" for i in range(4)))
    trainer = RewardTrainer(_config(tiny_model_dir, data, tmp_path / "x", center_rewards_coefficient=0.01))
    assert [e["margin"] for e in trainer.train_examples] == [0.0, 1.0, 2.0, 3.0]
    batch = collate_reward_pairs(trainer.train_examples, trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        [(loss, metrics)] = trainer.compute_loss(trainer.model.eval(), batch)
    rc, rr = metrics["rewards/chosen"], metrics["rewards/rejected"]
    expected = (-F.logsigmoid(rc - rr - torch.tensor([0.0, 1.0, 2.0, 3.0])) + 0.01 * (rc + rr) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_lora_keeps_the_score_head_trainable(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForSequenceClassification

    trainer = RewardTrainer(_config(tiny_model_dir, pairs_file, tmp_path / "lora", use_peft=True, lora_r=4, lora_alpha=8, max_steps=2))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("score" in n and "modules_to_save" in n for n in trainable)
    assert any("lora_A" in n for n in trainable)
    head_before = trainer.model.get_base_model().score.modules_to_save["default"].weight.detach().clone()
    trainer.train()
    out = tmp_path / "lora"
    assert (out / "adapter_model.safetensors").exists()
    saved = load_file(out / "adapter_model.safetensors")
    head_key = next(k for k in saved if "score" in k)
    assert not torch.equal(saved[head_key], head_before)  # the head was trained and saved with the adapter
    tok = trainer.tokenizer
    batch = collate_reward_pairs(trainer.train_examples[:4], tok.pad_token_id)
    with torch.no_grad():
        trained = sequence_scores(trainer.model.eval(), batch["input_ids"], batch["attention_mask"])
        reloaded = sequence_scores(load_reward_model(out, pad_token_id=tok.pad_token_id).eval(), batch["input_ids"], batch["attention_mask"])
    assert reloaded.tolist() == pytest.approx(trained.tolist(), abs=1e-4)

    merged = tmp_path / "merged"
    train_reward(_config(tiny_model_dir, pairs_file, merged, use_peft=True, lora_r=4, max_steps=1, merge_lora=True))
    assert (merged / "model.safetensors").exists() and not (merged / "adapter_config.json").exists()
    AutoModelForSequenceClassification.from_pretrained(merged)


@pytest.mark.parametrize(
    "rows, needle",
    [
        ([{"prompt": "Q?", "chosen": " A", "rejected": " B"}, {"prompt": "Q?", "chosen": " A"}], ":2: missing field 'rejected'"),
        ([{"prompt": "Q?", "chosen": " A", "rejected": " B", "margin": 1}, {"prompt": "Q?", "chosen": " A", "rejected": " C"}], ":2: missing field 'margin'"),
        ([{"prompt": "Q?", "chosen": " A", "rejected": " B", "margin": "big"}], ":1: field 'margin' must be a finite number"),
        ([{"prompt": "Q?", "chosen": " A", "rejected": " B", "margin": float("nan")}], ":1: field 'margin' must be a finite number"),
        ([{"prompt": "Q?", "chosen": "", "rejected": " B"}], ":1: field 'chosen' is empty"),
    ],
)
def test_bad_rows_give_one_line_through_the_cli(capsys, tmp_path, tiny_model_dir, rows, needle):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli(capsys, "reward", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--output_dir", str(tmp_path / "o"))
    assert code == 1
    line = one_line(err)
    assert line.startswith("alignlab reward: error: ") and f"{data}{needle}" in line


def test_cli_flags_defaults_and_score_errors(capsys, tmp_path, tiny_model_dir, pairs_file):
    code, _, err = run_cli(capsys, "reward", "--dataset_name", "d.jsonl", "--output_dir", "x", "--center_rewards_coefficient", "-1")
    assert code != 0 and "--center_rewards_coefficient must be >= 0" in one_line(err)
    code, _, err = run_cli(capsys, "score", "--dataset_name", str(pairs_file))
    assert code != 0 and "--reward_model_path is required" in one_line(err)
    code, _, err = run_cli(capsys, "score", "--reward_model_path", "./no/such/rm", "--dataset_name", str(pairs_file))
    assert code == 1 and "--reward_model_path: ./no/such/rm does not exist" in one_line(err)
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys, "reward", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(pairs_file), "--output_dir", str(out),
        "--max_steps", "1", "--per_device_train_batch_size", "2", "--eval_split_size", "0.25", "--bf16", "false",
    )
    assert code == 0, err
    assert f"trained model: {out}" in stdout and "eval accuracy:" in stdout
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["learning_rate"] == 1e-4 and cfg["truncation_mode"] == "drop"  # TRL's RewardConfig defaults


def test_a_causal_lm_lora_adapter_starts_a_reward_model(tiny_model_dir, tmp_path):
    """An SFT run saved as a LoRA adapter is a valid --model_name_or_path: the adapter is merged into the backbone."""
    from alignlab.models import apply_lora, load_causal_lm, load_tokenizer, save_pretrained

    tok = load_tokenizer(tiny_model_dir)
    policy = apply_lora(load_causal_lm(tiny_model_dir), r=4, alpha=8, dropout=0.0, target_modules=None)
    torch.manual_seed(1)
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # a non-zero update, as after training
    adapter = tmp_path / "sft-lora"
    adapter.mkdir()
    save_pretrained(policy, tok, adapter)
    expected = policy.merge_and_unload().model.layers[0].self_attn.q_proj.weight
    model = load_reward_model(str(adapter), pad_token_id=tok.pad_token_id)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight, expected)

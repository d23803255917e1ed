"""SFT end to end on the tiny model: outputs, parameter updates, the loss against transformers' own, packing,
LoRA on conversations, one-line errors through the CLI, and the SFT output as the start of DPO."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignlab.algorithms.dpo import DPOConfig, train_dpo
from alignlab.algorithms.sft import SFTConfig, SFTTrainer, train_sft
from alignlab.data.sft import collate_sft
from tests.conftest import one_line, read_metrics, run_cli, tiny_config


@pytest.fixture
def sft_file(tmp_path) -> Path:
    """Twelve prompt-completion rows."""
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(12)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def chat_file(tmp_path) -> Path:
    """Eight two-turn conversations."""
    rows = []
    for i in range(8):
        rows.append({"messages": [
            {"role": "user", "content": f"Count to {i}."},
            {"role": "assistant", "content": " ".join(str(k) for k in range(i + 1))},
            {"role": "user", "content": "Thanks."},
            {"role": "assistant", "content": "You're welcome."},
        ]})
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(model, data, out, **kw):
    return tiny_config(SFTConfig, model, data, out, **kw)


def test_sft_writes_outputs_updates_weights_and_feeds_dpo(tiny_model_dir, sft_file, pairs_file, tmp_path):
    out = tmp_path / "sft"
    result = train_sft(_config(tiny_model_dir, sft_file, out, eval_split_size=4, bf16=True))
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for name in ("loss", "mean_token_accuracy", "learning_rate", "grad_norm", "tokens_per_second"):
        assert all(math.isfinite(r[name]) for r in train_rows), name
    assert all(0.0 <= r["mean_token_accuracy"] <= 1.0 for r in train_rows)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    eval_row = [r for r in rows if "eval_loss" in r][-1]
    assert eval_row["step"] == 3 and result.eval_metrics["eval_mean_token_accuracy"] == eval_row["eval_mean_token_accuracy"]
    before = load_file(Path(tiny_model_dir) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert yaml.safe_load((out / "config.yaml").read_text())["completion_only_loss"] is None  # TRL's: yes
    for stem in ("loss", "mean_token_accuracy"):
        assert (out / "plots" / f"{stem}.png").stat().st_size > 1000
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)

    # the SFT output is a valid starting point for DPO
    dpo_out = tmp_path / "dpo"
    train_dpo(DPOConfig(model_name_or_path=str(out), dataset_name=str(pairs_file), output_dir=str(dpo_out),
                        per_device_train_batch_size=4, max_steps=1, save_steps=0, bf16=False, max_length=64))
    assert read_metrics(dpo_out)[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)
    assert (dpo_out / "model.safetensors").exists()


def test_loss_and_accuracy_match_transformers_and_packing(tiny_model_dir, sft_file, tmp_path):
    trainer = SFTTrainer(_config(tiny_model_dir, sft_file, tmp_path / "x"))
    model, pad = trainer.model.eval(), trainer.tokenizer.pad_token_id
    examples = trainer.train_examples[:6]
    batch = collate_sft(examples, pad)
    with torch.no_grad():
        [(loss, metrics)] = trainer.compute_loss(model, batch)
        # transformers' own causal-LM loss: mean cross-entropy over labels != -100, shifted by one
        labels = batch["input_ids"].masked_fill(batch["loss_mask"] == 0, -100)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        shift_logits, shift_labels = out.logits[:, :-1], labels[:, 1:]
        keep = shift_labels != -100
        accuracy = (shift_logits.argmax(-1)[keep] == shift_labels[keep]).float().mean()
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert metrics["mean_token_accuracy"].item() == pytest.approx(accuracy.item(), abs=1e-6)

    # the same examples packed into rows of 40 tokens: same targets, same numbers (examples do not see each other)
    from alignlab.data.sft import pack_sft_examples

    packed = pack_sft_examples(examples, 40)
    assert len(packed) < len(examples)
    with torch.no_grad():
        [(packed_loss, packed_metrics)] = trainer.compute_loss(model, collate_sft(packed, pad))
    assert packed_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert packed_metrics["mean_token_accuracy"].item() == pytest.approx(metrics["mean_token_accuracy"].item(), abs=1e-6)


def test_packing_run_and_lora_on_conversations(tiny_model_dir, sft_file, chat_file, tmp_path):
    out = tmp_path / "packed"
    train_sft(_config(tiny_model_dir, sft_file, out, packing=True, max_length=48, max_steps=2, per_device_train_batch_size=2))
    assert all(math.isfinite(r["loss"]) for r in read_metrics(out))

    from transformers import AutoModelForCausalLM

    lora, full = tmp_path / "lora", tmp_path / "full"
    train_sft(_config(tiny_model_dir, chat_file, lora, use_peft=True, lora_r=4, lora_alpha=8, max_steps=2))
    train_sft(_config(tiny_model_dir, chat_file, full, max_steps=1))
    assert (lora / "adapter_model.safetensors").exists()
    # LoRA's B matrices start at zero: its first step's loss is the base model's, as full fine-tuning's is
    assert read_metrics(lora)[0]["loss"] == pytest.approx(read_metrics(full)[0]["loss"], rel=1e-5)
    assert read_metrics(lora)[1]["loss"] != read_metrics(lora)[0]["loss"]
    assert hasattr(AutoModelForCausalLM.from_pretrained(lora), "peft_config")


@pytest.mark.parametrize(
    "rows, needle",
    [
        ([{"prompt": "Q?", "completion": " A"}, {"prompt": "Q?"}], ":2: missing field 'completion'"),
        ([{"text": "fine"}, {"text": ""}], ":2: field 'text' is empty"),
        ([{"messages": [{"role": "user", "content": "Hi"}]}], ":1: no assistant message to train on"),
        ([{"input": "x"}], ":1: missing field: expected 'messages'"),
    ],
)
def test_bad_rows_give_one_line_through_the_cli(capsys, tmp_path, tiny_model_dir, rows, needle):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli(capsys, "sft", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--output_dir", str(tmp_path / "o"),
                           "--assistant_only_loss", "true")
    assert code == 1
    line = one_line(err)
    assert line.startswith("alignlab sft: error: ") and f"{data}{needle}" in line


def test_cli_flags_andrun_cli(capsys, tmp_path, tiny_model_dir, sft_file):
    code, _, err = run_cli(capsys, "sft", "--dataset_name", "d.jsonl", "--output_dir", "x", "--packing", "true", "--max_length", "1")
    assert code != 0 and "--max_length must be >= 2" in one_line(err)
    code, _, err = run_cli(capsys, "sft", "--dataset_name", "d.jsonl", "--output_dir", "x", "--truncation_mode", "drop")
    assert code != 0 and "--truncation_mode" in one_line(err)
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys, "sft", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(sft_file), "--output_dir", str(out),
        "--max_steps", "1", "--per_device_train_batch_size", "2", "--eval_split_size", "2", "--bf16", "false",
    )
    assert code == 0, err
    assert f"trained model: {out}" in stdout and "eval mean_token_accuracy:" in stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["learning_rate"] == 2e-5  # TRL's SFT default


def test_padding_free_batches_are_one_row_with_the_padded_numbers(tiny_model_dir, sft_file, tmp_path):
    """TRL's padding_free: a micro-batch is one row, positions restarting per example; loss and metrics as padded."""
    padded = SFTTrainer(tiny_config(SFTConfig, tiny_model_dir, sft_file, tmp_path / "a"))
    free = SFTTrainer(tiny_config(SFTConfig, tiny_model_dir, sft_file, tmp_path / "b", padding_free=True))
    examples = sorted(padded.train_examples, key=lambda e: len(e["input_ids"]))[::4][:3]
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) > 1  # the padded batch has padding
    batch = free.collate(examples)
    assert batch["input_ids"].shape == (1, sum(lengths)) and bool(batch["attention_mask"].all())
    assert batch["position_ids"][0, lengths[0]] == 0
    with torch.no_grad():
        [(loss_free, m_free)] = free.compute_loss(padded.model, batch)
        [(loss_pad, m_pad)] = padded.compute_loss(padded.model, padded.collate(examples))
    assert float(loss_free) == pytest.approx(float(loss_pad), abs=1e-5)
    assert float(m_free["mean_token_accuracy"]) == pytest.approx(float(m_pad["mean_token_accuracy"]))


@pytest.mark.parametrize("strategy", ["wrapped", "bfd_split"])
def test_packing_strategies_wrapped_and_bfd_split_keep_every_token(tiny_model_dir, sft_file, tmp_path, strategy):
    """TRL's packing_strategy: wrapped cuts the concatenated examples every max_length tokens (no position ids);
    bfd_split cuts longer examples into fragments instead of truncating them, then packs first-fit."""
    whole = SFTTrainer(tiny_config(SFTConfig, tiny_model_dir, sft_file, tmp_path / "w", max_length=None))
    packed = SFTTrainer(tiny_config(SFTConfig, tiny_model_dir, sft_file, tmp_path / strategy, max_length=8,
                                    packing=True, packing_strategy=strategy))
    rows = packed.train_examples
    tokens = [t for e in whole.train_examples for t in e["input_ids"]]
    assert max(len(e["input_ids"]) for e in whole.train_examples) > 8  # plain bfd would truncate
    assert all(len(r["input_ids"]) <= 8 for r in rows)
    if strategy == "wrapped":
        assert [t for r in rows for t in r["input_ids"]] == tokens
        assert [len(r["input_ids"]) for r in rows[:-1]] == [8] * (len(rows) - 1) and "position_ids" not in rows[0]
    else:
        assert sorted(t for r in rows for t in r["input_ids"]) == sorted(tokens)
        assert all(r["position_ids"][0] == 0 for r in rows)
    with torch.no_grad():
        [(loss, _)] = packed.compute_loss(packed.model, packed.collate(rows[:2]))
    assert math.isfinite(float(loss))


def test_activation_offloading_saves_the_activations_on_cpu_with_the_same_numbers(tiny_model_dir, sft_file, tmp_path,
                                                                                   monkeypatch):
    """TRL's activation_offloading: the training forwards run under saved-tensor hooks that keep autograd's
    activations in CPU memory (torch's save_on_cpu); the run is the same."""
    packed = []

    class Recording(torch.autograd.graph.save_on_cpu):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook

            def counting(tensor):
                packed.append(tensor.shape)
                return pack(tensor)

            self.pack_hook = counting

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Recording)
    train_sft(tiny_config(SFTConfig, tiny_model_dir, sft_file, tmp_path / "a", max_steps=2))
    assert not packed
    train_sft(tiny_config(SFTConfig, tiny_model_dir, sft_file, tmp_path / "b", max_steps=2, activation_offloading=True))
    assert packed  # every tensor saved for the backward went through the offloading hook
    for a, b in zip(read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)

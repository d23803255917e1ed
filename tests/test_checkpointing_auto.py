"""``--gradient_checkpointing auto`` (train/checkpointing.py): the activation estimate by hand, the decision against
the memory available, the largest micro-batch from the data, the flag's forms, and that the loop's runtime turns
checkpointing on when auto says so."""

import functools
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignlab.algorithms.dpo import DPOConfig
from alignlab.algorithms.grpo import GRPOConfig
from alignlab.algorithms.online_dpo import OnlineDPOConfig
from alignlab.cli import parse_config
from alignlab.data.preference import build_pair_examples, collate_pairs
from alignlab.train import checkpointing
from alignlab.train.runtime import Runtime


def _tiny(attn="sdpa", dtype=torch.float32):
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(config).to(dtype)


def test_estimate_by_hand_for_a_tiny_config():
    # per token and layer: 6 h + 2 h_kv + 4 i = 6*64 + 2*(2 heads * 16) + 4*128 = 960 values
    assert checkpointing.layer_activation_values(_tiny().config, 10, eager=False) == 960
    # 2 layers x (2 rows x 10 tokens) x 960 values x 4 bytes
    assert checkpointing.activation_bytes(_tiny(), 2, 10) == 2 * 20 * 960 * 4 == 153_600
    assert checkpointing.activation_bytes(_tiny(), 2, 10, bf16=True) == 76_800  # autocast: 2 bytes
    assert checkpointing.activation_bytes(_tiny(dtype=torch.bfloat16), 2, 10) == 76_800  # bf16 weights
    # eager attention keeps the probabilities: heads x width more values per token
    assert checkpointing.activation_bytes(_tiny("eager"), 2, 10) == 2 * 20 * (960 + 4 * 10) * 4
    # padding-free: the real tokens count, the width only for the score term
    assert checkpointing.activation_bytes(_tiny(), 1, 10, tokens=7) == 2 * 7 * 960 * 4


def test_the_estimate_sums_every_model_inside_a_wrapper():
    class PolicyAndValue(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.policy, self.value = _tiny(), _tiny()

    assert checkpointing.activation_bytes(PolicyAndValue(), 2, 10) == 2 * 153_600
    assert len(checkpointing.trained_models(PolicyAndValue())) == 2


def test_decision_against_the_memory_available(caplog):
    model, cpu = _tiny(), torch.device("cpu")
    estimate = checkpointing.activation_bytes(model, 2, 10)
    with caplog.at_level(logging.INFO, logger="alignlab.train.checkpointing"):
        assert checkpointing.decide(model, 2, 10, 20, bf16=False, device=cpu, available=2 * estimate - 1)
        assert not checkpointing.decide(model, 2, 10, 20, bf16=False, device=cpu, available=2 * estimate)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("gradient_checkpointing auto: on (")
    assert "2 rows x 10 tokens" in lines[1] and "host RAM available" in lines[1] and "off" in lines[1]


def test_available_memory_is_the_hosts_on_cpu(monkeypatch):
    import psutil

    class Memory:
        available = 12345

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory())
    assert checkpointing.available_bytes(torch.device("cpu")) == 12345


def _pairs(tokenizer):
    rows = [(f"row {i}", {"prompt": "Say something.", "chosen": "Yes " * n, "rejected": "No."})
            for i, n in enumerate([3, 40, 5, 20, 2])]
    return build_pair_examples(rows, tokenizer, max_length=None)[0]


def test_the_largest_offline_micro_batch_comes_from_the_longest_rows(tiny_tokenizer, tmp_path):
    examples = _pairs(tiny_tokenizer)
    collate = functools.partial(collate_pairs, pad_token_id=tiny_tokenizer.pad_token_id)
    config = DPOConfig(dataset_name="builtin:concise", output_dir=str(tmp_path), per_device_train_batch_size=2)
    rows, width, tokens = checkpointing.largest_micro_batch(config, examples, collate, online=False)
    longest = collate([examples[1], examples[3]])  # the two pairs with the longest chosen answers
    assert (rows, width) == tuple(longest["input_ids"].shape) and rows == 4
    assert tokens == int(longest["attention_mask"].sum()) and width == len(examples[1]["chosen_input_ids"])


def test_the_largest_online_micro_batch_is_the_longest_prompt_plus_the_cap(tmp_path):
    prompts = [{"prompt_ids": [1] * n} for n in (5, 17, 9)]
    grpo = GRPOConfig(dataset_name="builtin:concise", output_dir=str(tmp_path), per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=30)
    assert checkpointing.largest_micro_batch(grpo, prompts, None, online=True) == (4, 47, 4 * 47)
    online_dpo = OnlineDPOConfig(dataset_name="builtin:concise", output_dir=str(tmp_path),
                                 per_device_train_batch_size=3, max_new_tokens=8)
    assert checkpointing.largest_micro_batch(online_dpo, prompts, None, online=True) == (6, 25, 6 * 25)


@pytest.mark.parametrize("argv, expected", [
    ([], None), (["--gradient_checkpointing", "auto"], None), (["--gradient_checkpointing", "AUTO"], None),
    (["--gradient_checkpointing"], True), (["--gradient_checkpointing", "true"], True),
    (["--gradient_checkpointing", "false"], False),
])
def test_command_line_forms(argv, expected, tmp_path):
    config = parse_config(DPOConfig, ["--dataset_name", "builtin:concise", "--output_dir", str(tmp_path), *argv],
                          "alignlab dpo")
    assert config.gradient_checkpointing is expected


def test_auto_is_unset_for_every_optional_bool_flag(tmp_path):
    base = ["--dataset_name", "builtin:concise", "--output_dir", str(tmp_path), "--bf16", "auto"]
    from alignlab.train.config import resolve_bf16

    assert parse_config(DPOConfig, base, "alignlab dpo").bf16 == resolve_bf16(None)
    from alignlab.cli import _Exit

    with pytest.raises(_Exit, match="--bf16: expected true, false or auto, got 'maybe'"):
        parse_config(DPOConfig, [*base[:-1], "maybe"], "alignlab dpo")


def test_yaml_and_python_forms(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("gradient_checkpointing: auto\n")
    argv = ["--dataset_name", "builtin:concise", "--output_dir", str(tmp_path), "--config", str(path)]
    assert parse_config(DPOConfig, argv, "alignlab dpo").gradient_checkpointing is None
    path.write_text("gradient_checkpointing: true\n")
    assert parse_config(DPOConfig, argv, "alignlab dpo").gradient_checkpointing is True
    assert DPOConfig(dataset_name="builtin:concise", output_dir=str(tmp_path)).gradient_checkpointing is None
    assert DPOConfig(dataset_name="builtin:concise", output_dir=str(tmp_path),
                     gradient_checkpointing="auto").gradient_checkpointing is None


@pytest.mark.parametrize("available, expected", [(1, True), (10**15, False)])
def test_the_runtime_turns_it_on_when_auto_says_so(available, expected, tiny_model_dir, tiny_tokenizer, tmp_path,
                                                   monkeypatch):
    from alignlab.models import load_causal_lm

    monkeypatch.setattr(checkpointing, "available_bytes", lambda device: available)
    runtime = Runtime(DPOConfig(dataset_name="builtin:concise", output_dir=str(tmp_path), bf16=False,
                                per_device_train_batch_size=2))
    model = runtime.prepare_model(load_causal_lm(tiny_model_dir))
    assert not model.is_activation_checkpointing  # auto: decided once the data is known
    collate = functools.partial(collate_pairs, pad_token_id=tiny_tokenizer.pad_token_id)
    assert runtime.auto_checkpointing(model, _pairs(tiny_tokenizer), collate, online=False) is expected
    assert model.is_activation_checkpointing is expected


def test_an_explicit_setting_wins_over_auto(tiny_model_dir, tmp_path, monkeypatch):
    from alignlab.models import load_causal_lm

    monkeypatch.setattr(checkpointing, "available_bytes", lambda device: 1)
    for setting in (True, False):
        runtime = Runtime(DPOConfig(dataset_name="builtin:concise", output_dir=str(tmp_path), bf16=False,
                                    gradient_checkpointing=setting))
        model = runtime.prepare_model(load_causal_lm(tiny_model_dir))
        assert model.is_activation_checkpointing is setting
        assert runtime.auto_checkpointing(model, [{"prompt_ids": [1]}], None, online=True) is setting
        assert model.is_activation_checkpointing is setting


def test_the_loop_decides_before_training(tiny_model_dir, pairs_file, tmp_path, monkeypatch, caplog):
    from alignlab.algorithms.dpo import train_dpo
    from tests.conftest import tiny_config

    monkeypatch.setattr(checkpointing, "available_bytes", lambda device: 1)
    with caplog.at_level(logging.INFO, logger="alignlab.train.checkpointing"):
        train_dpo(tiny_config(DPOConfig, tiny_model_dir, pairs_file, tmp_path / "run", max_steps=1))
    assert [r.getMessage()[:33] for r in caplog.records] == ["gradient_checkpointing auto: on ("]

"""The command line: one-line errors naming the flag or file, YAML configs, and a real run."""

import json

import pytest

from alignlab.algorithms.dpo import DPOConfig
from alignlab.cli import main, parse_config
from tests.conftest import one_line, run_cli


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--output_dir", "x", "--dataset_name", "d.jsonl", "--no_such_flag", "1"], "unknown flag --no_such_flag"),
        (["--output_dir", "x", "--dataset_name", "d.jsonl", "--beta", "-1"], "--beta must be > 0"),
        (["--output_dir", "x", "--dataset_name", "d.jsonl", "--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1"),
        (["--output_dir", "x", "--dataset_name", "d.jsonl", "--beta", "abc"], "--beta"),
        (["--output_dir", "x", "--dataset_name", "d.jsonl", "--loss_type", "nope"], "--loss_type"),
        (["--dataset_name", "d.jsonl"], "--output_dir is required"),
        (["--output_dir", "x", "--dataset_name", "d.jsonl", "--bf16", "maybe"], "--bf16"),
    ],
)
def test_bad_flags_giveone_line(capsys, argv, needle):
    code, _, err = run_cli(capsys, "dpo", *argv)
    assert code != 0
    assert needle in one_line(err)


def test_unknown_command(capsys):
    code, _, err = run_cli(capsys, "dance")
    assert code == 2 and "unknown command 'dance'" in err


def test_yaml_config_supplies_flags_and_cli_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("beta: 0.3\nlearning_rate: 2.0e-5\ndataset_name: d.jsonl\noutput_dir: out\nlora_target_modules: [q_proj, v_proj]\nbf16: false\n")
    config = parse_config(DPOConfig, ["--config", str(cfg), "--beta", "0.2"], "alignlab dpo")
    assert config.beta == 0.2 and config.learning_rate == 2e-5 and config.bf16 is False
    assert config.lora_target_modules == ["q_proj", "v_proj"]


def test_yaml_config_errors(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("betaa: 0.3\n")
    code, _, err = run_cli(capsys, "dpo", "--config", str(cfg))
    assert code != 0 and "unknown key 'betaa'" in one_line(err)
    cfg.write_text("beta: [1\n")
    code, _, err = run_cli(capsys, "dpo", "--config", str(cfg))
    assert code != 0 and "invalid YAML" in one_line(err)


def test_bad_data_row_names_file_and_line(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "Q?", "chosen": " A", "rejected": " B"}) + "\n" + json.dumps({"prompt": "Q?", "chosen": " A"}) + "\n")
    code, _, err = run_cli(capsys, "dpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--output_dir", str(tmp_path / "o"))
    assert code == 1
    assert f"{data}:2: missing field 'rejected'" in one_line(err)
    data.write_text('{"prompt": "Q?", "chosen": " A", "rejected": " B"}\n{oops}\n')
    code, _, err = run_cli(capsys, "dpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--output_dir", str(tmp_path / "o"))
    assert code == 1 and f"{data}:2: malformed JSON" in one_line(err)


def test_missing_model_path(capsys, pairs_file, tmp_path):
    code, _, err = run_cli(capsys, "dpo", "--model_name_or_path", "./no/such/model", "--dataset_name", str(pairs_file), "--output_dir", str(tmp_path / "o"))
    assert code == 1 and "does not exist" in one_line(err)


def test_dpo_then_generate(capsys, tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys, "dpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(pairs_file), "--output_dir", str(out),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--eval_split_size", "0.25", "--logging_steps", "1",
    )
    assert code == 0, err
    assert f"trained model: {out}" in stdout and "eval rewards/accuracies:" in stdout
    assert (out / "metrics.jsonl").exists() and (out / "config.yaml").exists()
    code, stdout, err = run_cli(capsys, "generate", "--model_name_or_path", str(out), "--prompt", "Hello", "--max_new_tokens", "5", "--do_sample", "false")
    assert code == 0, err
    assert stdout.startswith("### prompt: Hello")


@pytest.mark.parametrize("command", ["dpo", "sft", "reward", "generate"])
def test_help_lists_flags(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--model_name_or_path" in out and "--config" in out


def test_bf16_unset_means_native_bf16_only():
    from alignlab.train.config import fast_bf16_available

    base = ["--output_dir", "x", "--dataset_name", "d.jsonl"]
    assert parse_config(DPOConfig, base, "alignlab dpo").bf16 is fast_bf16_available()
    assert parse_config(DPOConfig, base + ["--bf16"], "alignlab dpo").bf16 is True  # bare flag, as TRL users type it
    assert parse_config(DPOConfig, base + ["--bf16", "false"], "alignlab dpo").bf16 is False

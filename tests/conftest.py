"""Shared fixtures: a tiny random 2-layer Llama with the embedded tokenizer, and the shared data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HH_PAIRS = SHARED / "data" / "hh-rlhf-harmless" / "pairs-2000.jsonl.gz"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A randomly initialised 2-layer Llama (hidden 64) saved with the embedded model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignlab.models import load_tokenizer

    tokenizer = load_tokenizer(None)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from alignlab.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    """Twelve short explicit-prompt pairs in a JSONL file."""
    rows = [
        {"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.", "rejected": f"Well, it might be {2 * i + 1}, maybe."}
        for i in range(12)
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(config_cls, model, data, out, **overrides):
    """``config_cls`` for a short float32 run of the tiny model on ``data`` into ``out``: 3 steps of 4 examples,
    a row logged every step, no checkpoints, a learning rate that visibly moves a random model."""
    settings = dict(model_name_or_path=model, dataset_name=str(data), output_dir=str(out), per_device_train_batch_size=4,
                    max_steps=3, logging_steps=1, learning_rate=1e-3, save_steps=0, bf16=False)
    if "max_length" in {f.name for f in dataclasses.fields(config_cls)}:
        settings["max_length"] = 64
    return config_cls(**{**settings, **overrides})


def read_metrics(output_dir) -> list[dict]:
    with open(Path(output_dir) / "metrics.jsonl") as handle:
        return [json.loads(line) for line in handle]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``alignlab ARGV`` in-process; returns ``(exit code, stdout, stderr)``."""
    from alignlab.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    """The single error line of ``err`` (data-summary log lines and progress bars aside); fails on tracebacks or
    more lines."""
    skip = ("train data", "eval data", "data ", "prompts ", "training:", "evaluating ", "gradient_checkpointing auto:")
    lines = [l for l in err.strip().splitlines() if l.strip() and not l.startswith(skip)]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


SHORT_REWARD = (
    "def short(prompts, completions, **kw):\n"
    "    return [-float(len(c[0]['content'] if isinstance(c, list) else c)) / 10 for c in completions]\n"
)


@pytest.fixture
def rewards_file(tmp_path) -> Path:
    """A reward-function file with ``short``: minus a tenth of the completion's character count."""
    path = tmp_path / "rewards.py"
    path.write_text(SHORT_REWARD)
    return path


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    """Six conversational prompts in a JSONL file (the online algorithms' tests; PPO's tests use their own)."""
    rows = [{"prompt": [{"role": "user", "content": f"Say something about {i}."}]} for i in range(6)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    """A TCP port free on this machine now, for a ``torchrun --master_port``: a fixed one can still be held by
    another run's processes (or linger after one), and then the two runs' processes meet in one store."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

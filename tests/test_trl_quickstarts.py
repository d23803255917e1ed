"""TRL's own quick starts (its docs' DPO, GRPO with a Python reward function, Reward, SFT and KTO examples), run
with only the import changed: ``from alignlab import ...`` instead of ``from trl import ...``. The embedded model
stands in for the hub model id, a small local ``datasets.Dataset`` in the hub data set's format for
``load_dataset(...)``, and the config adds ``max_steps=2`` and short lengths (and an ``output_dir`` under the test's
folder) so that each runs in well under a minute on a CPU."""

from __future__ import annotations

import pytest
from datasets import Dataset

pytestmark = pytest.mark.integration

SHORT = dict(max_steps=2, per_device_train_batch_size=2, logging_steps=1, save_steps=0, bf16=False)


def _messages(user: str, assistant: str | None = None) -> list[dict]:
    turns = [{"role": "user", "content": user}]
    return turns + ([{"role": "assistant", "content": assistant}] if assistant is not None else [])


@pytest.fixture(scope="module")
def model_path() -> str:
    """The embedded model (the path ``alignlab prepare-model`` prints), in place of ``"Qwen/Qwen2-0.5B-Instruct"``."""
    from alignlab.models import embedded_model_path

    return str(embedded_model_path())


def ultrafeedback_binarized() -> Dataset:
    """``trl-lib/ultrafeedback_binarized``'s format: conversational chosen / rejected with the prompt inside."""
    return Dataset.from_list([
        {"chosen": _messages(f"What is {i} + {i}?", f"{2 * i}."),
         "rejected": _messages(f"What is {i} + {i}?", f"I think it is {2 * i + 1}, but I am not sure.")}
        for i in range(8)
    ])


def capybara() -> Dataset:
    """``trl-lib/Capybara``'s format: a ``messages`` column."""
    return Dataset.from_list([{"messages": _messages(f"Name a colour number {i}.", "Blue.")} for i in range(8)])


def kto_mix() -> Dataset:
    """``trl-lib/kto-mix-14k``'s format: conversational prompt and completion, a boolean label."""
    return Dataset.from_list([
        {"prompt": _messages(f"What is {i} + 1?"), "completion": [{"role": "assistant", "content": text}],
         "label": good}
        for i in range(4) for text, good in ((f"{i + 1}.", True), ("No idea.", False))
    ])


def tldr() -> Dataset:
    """``trl-lib/tldr``'s format: a text ``prompt`` column."""
    return Dataset.from_list([{"prompt": f"SUBREDDIT: r/test\nPOST: Story number {i}.\nTL;DR:"} for i in range(8)])


@pytest.mark.parametrize("method, load_dataset", [("DPO", ultrafeedback_binarized), ("KTO", kto_mix)])
def test_dpo_and_kto_quick_starts(method, load_dataset, model_path, tmp_path):
    """TRL's DPO and KTO quick starts: the same script but for the method's name."""
    import alignlab  # was: import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Config, Trainer = getattr(alignlab, f"{method}Config"), getattr(alignlab, f"{method}Trainer")
    model = AutoModelForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_dataset = load_dataset()

    training_args = Config(output_dir=str(tmp_path / f"Qwen2-0.5B-{method}"), max_length=64, **SHORT)
    trainer = Trainer(model=model, args=training_args, processing_class=tokenizer, train_dataset=train_dataset)
    trainer.train()

    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2]
    assert (tmp_path / f"Qwen2-0.5B-{method}" / "trainer_state.json").is_file()


def test_grpo_quick_start_with_a_python_reward_function(model_path, tmp_path):
    from alignlab import GRPOConfig, GRPOTrainer  # was: from trl import GRPOConfig, GRPOTrainer

    dataset = tldr()

    # Define the reward function, which rewards completions that are close to 20 characters
    def reward_len(completions, **kwargs):
        return [-abs(20 - len(completion)) for completion in completions]

    training_args = GRPOConfig(output_dir=str(tmp_path / "Qwen2-0.5B-GRPO"), num_generations=2,
                               max_completion_length=8, **SHORT)
    trainer = GRPOTrainer(
        model=model_path,
        reward_funcs=reward_len,
        args=training_args,
        train_dataset=dataset,
    )
    trainer.train()

    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in rows] == [1, 2] and "rewards/reward_len/mean" in rows[0]


def test_reward_quick_start(model_path, tmp_path):
    from alignlab import RewardConfig, RewardTrainer  # was: from trl import RewardTrainer

    dataset = ultrafeedback_binarized()

    trainer = RewardTrainer(
        model=model_path,
        args=RewardConfig(output_dir=str(tmp_path / "Qwen3-0.6B-Reward"), max_length=64, **SHORT),
        train_dataset=dataset,
    )
    trainer.train()

    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2]


def test_sft_quick_start(model_path, tmp_path):
    from alignlab import SFTConfig, SFTTrainer  # was: from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model_path,
        args=SFTConfig(output_dir=str(tmp_path / "Qwen3-0.6B-SFT"), max_length=64, **SHORT),
        train_dataset=capybara(),
    )
    trainer.train()
    trainer.save_model()

    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2]
    assert (tmp_path / "Qwen3-0.6B-SFT" / "model.safetensors").is_file()

"""The Python API as TRL's: trainers built from a model, args, datasets.Dataset objects, a tokenizer, a peft
config, callbacks and reward functions; train / evaluate / save_model; TrainerState and trainer_state.json;
transformers' callbacks obeyed. Tiny random model (tests/conftest.py)."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from transformers import TrainerCallback, TrainerControl, TrainerState

import alignlab
from alignlab.errors import UserError
from tests.conftest import read_metrics

PAIRS = [{"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.", "rejected": f"Well, maybe {2 * i + 1}."}
         for i in range(12)]
PROMPTS = [{"prompt": f"Count to {i}:"} for i in range(8)]


def small(config_cls, out, **overrides):
    """A short float32 run's config built the TRL way (no model, no data in it)."""
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                    learning_rate=1e-3, save_steps=0, bf16=False)
    names = {f for f in config_cls.__dataclass_fields__}
    if "max_length" in names and config_cls.__name__ != "OnlineDPOConfig":  # Online DPO: a cap of its log-probs
        settings["max_length"] = 64
    if "max_completion_length" in names:
        settings.update(max_completion_length=4, num_generations=4) if "num_generations" in names else \
            settings.update(max_completion_length=4)
    return config_cls(**{**settings, **overrides})


def length_reward(prompts, completions, completion_ids, **kwargs):
    """TRL's signature: shorter is better."""
    return [-float(len(ids)) for ids in completion_ids]


def test_every_registered_method_is_importable_from_alignlab():
    from alignlab.methods import methods

    exported = {getattr(alignlab, name) for name in alignlab.__all__ if name.endswith(("Config", "Trainer"))
                or name == "IterativeDPO"}
    for command, method in methods().items():
        assert method.config in exported, command
    for name in ("DPOTrainer", "DPOConfig", "GRPOTrainer", "GRPOConfig", "SFTTrainer", "SFTConfig", "RewardTrainer",
                 "RewardConfig", "KTOTrainer", "KTOConfig", "RLOOTrainer", "RLOOConfig", "OnlineDPOTrainer",
                 "OnlineDPOConfig", "PPOTrainer", "PPOConfig"):
        assert isinstance(getattr(alignlab, name), type)
    with pytest.raises(AttributeError):
        alignlab.NoSuchTrainer


def test_import_alignlab_stays_light():
    import subprocess
    import sys

    code = "import sys, alignlab; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_configs_without_dataset_name_build(tmp_path):
    from alignlab import DPOConfig, GRPOConfig

    DPOConfig(output_dir=str(tmp_path), beta=0.2)
    GRPOConfig(output_dir=str(tmp_path), reward_funcs=[length_reward])


def test_neither_dataset_object_nor_name_is_a_one_line_error(tiny_model_dir, tmp_path):
    from alignlab import DPOConfig, DPOTrainer

    with pytest.raises(UserError, match="--dataset_name is required"):
        DPOTrainer(model=tiny_model_dir, args=small(DPOConfig, tmp_path / "r"))
    with pytest.raises(UserError, match="--dataset_name is required"):
        DPOTrainer(small(DPOConfig, tmp_path / "r", model_name_or_path=tiny_model_dir))


class StopAfter(TrainerCallback):
    """Records the events it sees; stops training from on_log at step ``stop``."""

    def __init__(self, stop: int):
        self.stop, self.events, self.logs = stop, [], []

    def __getattribute__(self, name):
        if name.startswith("on_") and name not in ("on_log",):
            object.__getattribute__(self, "events").append(name)
        return object.__getattribute__(self, name)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append("on_log")
        self.logs.append(dict(logs))
        assert isinstance(state, TrainerState) and isinstance(control, TrainerControl)
        assert args.per_device_train_batch_size == 4 and args.logging_first_step is False  # TrainingArguments' fields
        if "loss" in logs and state.global_step >= self.stop:
            control.should_training_stop = True


def test_dpo_the_trl_way_with_callback_state_evaluate_and_save(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from alignlab import DPOConfig, DPOTrainer

    out = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    callback = StopAfter(2)
    trainer = DPOTrainer(model=model, args=small(DPOConfig, out, max_steps=5), train_dataset=Dataset.from_list(PAIRS),
                         eval_dataset=Dataset.from_list(PAIRS[:4]), processing_class=tiny_tokenizer,
                         callbacks=[callback])
    assert trainer.policy is model and trainer.args.dataset_name == "<train_dataset>"
    trainer.train()
    assert trainer.state.global_step == 2  # stopped through control.should_training_stop
    assert "loss" in callback.logs[0] and "rewards/margins" in callback.logs[0]
    assert trainer.model is model
    for event in ("on_init_end", "on_train_begin", "on_epoch_begin", "on_step_begin", "on_step_end", "on_evaluate",
                  "on_epoch_end", "on_train_end"):
        assert event in callback.events, event
    history = trainer.state.log_history
    train_rows = [h for h in history if "loss" in h]
    assert [h["step"] for h in train_rows] == [1, 2]
    assert {"loss", "grad_norm", "learning_rate", "epoch", "step", "rewards/accuracies", "logps/chosen"} <= set(
        train_rows[0])
    assert "nonfinite_steps" not in train_rows[0]
    assert any("eval_loss" in h for h in history)
    assert "train_runtime" in history[-1] and "train_loss" in history[-1]
    saved = json.loads((out / "trainer_state.json").read_text())
    assert saved["global_step"] == 2 and saved["log_history"] == json.loads(json.dumps(history))
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]

    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_rewards/accuracies", "eval_runtime", "epoch"} <= set(metrics)
    assert "on_evaluate" in callback.events and trainer.state.log_history[-1]["eval_loss"] == metrics["eval_loss"]
    where = trainer.save_model(str(tmp_path / "saved"))
    assert (where / "model.safetensors").is_file() and (where / "tokenizer_config.json").is_file()


def test_callback_should_save_and_checkpoint_trainer_state(tiny_model_dir, tmp_path):
    from alignlab import SFTConfig, SFTTrainer

    class SaveAtOne(TrainerCallback):
        saves = 0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            SaveAtOne.saves += 1

    rows = [{"prompt": f"Say {i}.", "completion": f" {i}"} for i in range(8)]
    out = tmp_path / "sft"
    from transformers import PrinterCallback, ProgressCallback

    trainer = SFTTrainer(tiny_model_dir, args=small(SFTConfig, out), train_dataset=Dataset.from_list(rows),
                         callbacks=[SaveAtOne, PrinterCallback, ProgressCallback])  # transformers' own run too
    trainer.train()
    assert SaveAtOne.saves == 1
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and [h["step"] for h in state["log_history"]] == [1]
    # resuming takes log_history back from the checkpoint
    again = SFTTrainer(tiny_model_dir, args=small(SFTConfig, out, overwrite_output_dir=True),
                       train_dataset=Dataset.from_list(rows))
    again.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert [h["step"] for h in again.state.log_history if "loss" in h] == [1, 2, 3]


def test_evaluate_before_training_leaves_the_folder_free(tiny_model_dir, tmp_path):
    from alignlab import RewardConfig, RewardTrainer

    out = tmp_path / "rm"
    trainer = RewardTrainer(tiny_model_dir, args=small(RewardConfig, out, max_steps=1),
                            train_dataset=Dataset.from_list(PAIRS), eval_dataset=Dataset.from_list(PAIRS[:4]))
    before = trainer.evaluate()
    assert {"eval_loss", "eval_accuracy", "epoch"} <= set(before) and before["epoch"] == 0.0
    assert not (out / "metrics.jsonl").exists()
    trainer.train()  # not refused as a folder holding an earlier run
    assert [h for h in trainer.state.log_history if "eval_loss" in h][0]["step"] == 0


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_several_eval_sets_as_a_dict_are_each_evaluated_as_transformers_does(method, tiny_model_dir, tmp_path):
    """``eval_dataset={"a": ..., "b": ...}``: each set evaluated and logged as ``eval_a_*`` / ``eval_b_*``, with
    the same numbers as that set given alone (DPO); the evaluations during training log both."""
    from alignlab import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

    rows = PAIRS if method == "dpo" else PROMPTS
    first, second = Dataset.from_list(rows[:4]), Dataset.from_list(rows[4:7])
    Trainer, Config = (DPOTrainer, DPOConfig) if method == "dpo" else (GRPOTrainer, GRPOConfig)
    extra = {} if method == "dpo" else {"reward_funcs": length_reward}
    args = dict(max_steps=2, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4)
    trainer = Trainer(model=tiny_model_dir, args=small(Config, tmp_path / "both", **args), train_dataset=rows,
                      eval_dataset={"a": first, "b": second}, **extra)
    before = trainer.evaluate()
    for prefix in ("eval_a", "eval_b"):
        assert {f"{prefix}_loss", f"{prefix}_runtime", f"{prefix}_samples_per_second"} <= set(before)
    assert "eval_loss" not in before
    if method == "dpo":  # (GRPO samples its eval completions: set a's draws come first)
        alone = Trainer(model=tiny_model_dir, args=small(Config, tmp_path / "b", **args), train_dataset=rows,
                        eval_dataset=second).evaluate()
        assert before["eval_b_loss"] == pytest.approx(alone["eval_loss"], abs=1e-6)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "eval_a_loss" in h]
    assert [h["step"] for h in logged][-2:] == [1, 2] and all("eval_b_loss" in h for h in logged)
    with pytest.raises(UserError, match="eval_dataset: an empty dict"):
        Trainer(model=tiny_model_dir, args=small(Config, tmp_path / "x"), train_dataset=rows, eval_dataset={}, **extra)


def test_an_eval_set_of_a_dict_may_be_a_file(tiny_model_dir, tmp_path):
    """A data spec string among the dict's sets is read as ``--eval_dataset_name`` reads it."""
    from alignlab import DPOConfig, DPOTrainer

    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS[4:7]))
    trainer = DPOTrainer(model=tiny_model_dir, args=small(DPOConfig, tmp_path / "r"), train_dataset=PAIRS,
                         eval_dataset={"a": PAIRS[:4], "b": str(path)})
    assert {"eval_a_loss", "eval_b_loss"} <= set(trainer.evaluate())


def test_ref_model_as_a_path_as_in_trls_quick_start(tiny_model_dir, tmp_path):
    from alignlab import DPOConfig, DPOTrainer

    trainer = DPOTrainer(model=tiny_model_dir, ref_model=tiny_model_dir, args=small(DPOConfig, tmp_path / "r"),
                         train_dataset=PAIRS)
    assert trainer.args.ref_model_name_or_path == tiny_model_dir
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.policy


@pytest.mark.parametrize("method", ["kto", "online-dpo", "ppo"])
def test_kto_online_dpo_and_ppo_take_a_ref_model_object(method, tiny_model_dir, tmp_path):
    """TRL's ``ref_model`` for the other methods that have a reference: the object given is the frozen reference
    (here a copy of the model with one weight changed), not a copy of ``model``."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        ref.model.norm.weight.fill_(0.5)
    if method == "kto":
        from alignlab import KTOConfig, KTOTrainer

        data = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in PAIRS
                for k in ("chosen", "rejected")]
        trainer = KTOTrainer(tiny_model_dir, ref, args=small(KTOConfig, tmp_path / "r"), train_dataset=data)
        reference = trainer.ref_model
    elif method == "online-dpo":
        from alignlab import OnlineDPOConfig, OnlineDPOTrainer

        trainer = OnlineDPOTrainer(tiny_model_dir, ref, reward_funcs=length_reward,
                                   args=small(OnlineDPOConfig, tmp_path / "r"), train_dataset=PROMPTS)
        reference = trainer.setup.ref_model
    else:
        from alignlab import PPOConfig, PPOTrainer

        trainer = PPOTrainer(model=tiny_model_dir, ref_model=ref, reward_funcs=length_reward,
                             args=small(PPOConfig, tmp_path / "r"), train_dataset=PROMPTS)
        reference = trainer.ref_model
    assert trainer.args.ref_model_name_or_path == "<ref_model>"
    assert torch.equal(reference.model.norm.weight, torch.full_like(reference.model.norm.weight, 0.5))
    assert not any(p.requires_grad for p in reference.parameters())
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "loss" in h][-1] == 3


def test_the_same_object_as_model_and_ref_model_is_refused(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from alignlab import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError, match="model and ref_model cannot be the same object"):
        DPOTrainer(model, model, args=small(DPOConfig, tmp_path / "x"), train_dataset=PAIRS)


@pytest.mark.parametrize("method", ["reward", "kto"])
def test_offline_trainers_take_datasets(method, tiny_model_dir, tiny_tokenizer, tmp_path):
    if method == "reward":
        from alignlab import RewardConfig as Config, RewardTrainer as Trainer
        data = Dataset.from_list(PAIRS).to_iterable_dataset()  # read in full
    else:
        from alignlab import KTOConfig as Config, KTOTrainer as Trainer
        data = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in PAIRS
                for k in ("chosen", "rejected")]
    trainer = Trainer(model=tiny_model_dir, args=small(Config, tmp_path / method, max_steps=2),
                      train_dataset=data if method == "reward" else Dataset.from_list(data),
                      processing_class=tiny_tokenizer)
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2]


def test_peft_config_trains_a_lora_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    from alignlab import DPOConfig, DPOTrainer
    from alignlab.models import is_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(tiny_model_dir, args=small(DPOConfig, tmp_path / "lora", max_steps=1),
                         train_dataset=Dataset.from_list(PAIRS), peft_config=lora)
    assert is_peft_model(trainer.policy) and trainer.ref_model is None  # reference: adapters disabled
    trainable = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    trainer.train()
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


def test_a_peft_model_object_trains_its_adapters(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignlab import DPOConfig, DPOTrainer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, task_type="CAUSAL_LM"))
    trainer = DPOTrainer(model, args=small(DPOConfig, tmp_path / "p", max_steps=1),
                         train_dataset=Dataset.from_list(PAIRS))
    assert trainer.policy is model and trainer.args.use_peft
    trainer.train()
    assert (tmp_path / "p" / "adapter_model.safetensors").is_file()


def test_grpo_with_a_callable_reward(tiny_model_dir, tmp_path):
    from alignlab import GRPOConfig, GRPOTrainer

    seen = {}

    def reward_with_columns(prompts, completions, completion_ids, **columns):
        seen.update(columns, n=len(completions))
        return [float(len(c)) for c in completions]

    out = tmp_path / "grpo"
    data = Dataset.from_list([{**row, "topic": "count"} for row in PROMPTS])
    def unique_chars(completions, **kwargs):  # the signature of TRL's quick start: keywords only
        return [len(set(c.lower())) for c in completions]

    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=[length_reward, reward_with_columns, unique_chars],
                          args=small(GRPOConfig, out, max_steps=2), train_dataset=data)
    trainer.train()
    assert seen["n"] == 4 and seen["topic"] == ["count"] * 4
    row = [h for h in trainer.state.log_history if "loss" in h][0]
    assert "rewards/length_reward/mean" in row and "rewards/reward_with_columns/mean" in row
    assert "rewards/unique_chars/mean" in row
    assert "reward_with_columns" in (out / "config.yaml").read_text()  # named, not pickled


def test_grpo_config_reward_funcs_with_a_callable_in_the_old_form(tiny_model_dir, tmp_path):
    from alignlab import GRPOConfig, GRPOTrainer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    config = small(GRPOConfig, tmp_path / "old", max_steps=1, model_name_or_path=tiny_model_dir,
                   dataset_name=str(prompts), reward_funcs=[length_reward])
    trainer = GRPOTrainer(config)
    assert trainer.setup.sources[0].func is length_reward


def returns_one_too_few(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def returns_a_string(prompts, completions, **kwargs):
    return "good"


def returns_none(prompts, completions, **kwargs):
    return None


def raises(prompts, completions, **kwargs):
    raise KeyError("score")


def bad_row(prompts, completions, **kwargs):
    return [0.0, "high", 0.0, 0.0]


@pytest.mark.parametrize("fn, message", [
    (returns_one_too_few, "reward function returns_one_too_few must return a list of 4 numbers, got 3 values"),
    (returns_a_string, "reward function returns_a_string must return a list of 4 numbers, got str"),
    (returns_none, "reward function returns_none must return a list of 4 numbers, got NoneType"),
    (raises, "reward function raises raised KeyError: 'score'"),
    (bad_row, "reward function bad_row returned 'high' for completion 1"),
])
def test_malformed_callable_rewards_stop_with_one_line(fn, message, tiny_model_dir, tmp_path):
    from alignlab import GRPOConfig, GRPOTrainer

    trainer = GRPOTrainer(tiny_model_dir, fn, args=small(GRPOConfig, tmp_path / fn.__name__, max_steps=1),
                          train_dataset=Dataset.from_list(PROMPTS))
    with pytest.raises(UserError) as info:
        trainer.train()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_no_reward_at_all_is_one_line(tiny_model_dir, tmp_path):
    from alignlab import RLOOConfig, RLOOTrainer

    with pytest.raises(UserError, match="give --reward_model_path and/or --reward_funcs"):
        RLOOTrainer(tiny_model_dir, None, args=small(RLOOConfig, tmp_path / "x"), train_dataset=PROMPTS)


def test_a_reward_model_object_in_reward_funcs(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from alignlab import OnlineDPOConfig, OnlineDPOTrainer

    scorer = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    trainer = OnlineDPOTrainer(model=tiny_model_dir, reward_funcs=[length_reward, scorer],
                               args=small(OnlineDPOConfig, tmp_path / "odpo", max_steps=1,
                                          per_device_train_batch_size=2, reward_weights=[0.5, 2.0]),
                               train_dataset=Dataset.from_list(PROMPTS), reward_processing_classes=[None, tiny_tokenizer])
    names = [s.name for s in trainer.setup.sources]
    assert names == ["length_reward", "reward_model"] and trainer.setup.sources[1].model is scorer
    assert trainer.args.reward_weights == [0.5, 2.0]
    trainer.train()


def test_bad_arguments_are_one_line_errors(tiny_model_dir, tmp_path):
    from alignlab import DPOConfig, GRPOConfig, SFTConfig, SFTTrainer

    data = Dataset.from_list(PAIRS)
    with pytest.raises(UserError, match="data_collator is not supported"):
        SFTTrainer(tiny_model_dir, args=small(SFTConfig, tmp_path / "a"), data_collator=object(), train_dataset=data)
    with pytest.raises(UserError, match="args must be a SFTConfig"):
        SFTTrainer(tiny_model_dir, args=small(DPOConfig, tmp_path / "a"), train_dataset=data)
    with pytest.raises(UserError, match="reward_funcs: SFTConfig trains on fixed data"):
        SFTTrainer(tiny_model_dir, args=small(SFTConfig, tmp_path / "a"), train_dataset=data,
                   reward_funcs=length_reward)
    with pytest.raises(UserError, match="ref_model: SFTConfig has no separate reference model"):
        SFTTrainer(tiny_model_dir, args=small(SFTConfig, tmp_path / "a"), train_dataset=data, ref_model=tiny_model_dir)
    with pytest.raises(UserError, match="unknown argument 'learning_rate'"):
        SFTTrainer(tiny_model_dir, learning_rate=1.0)
    with pytest.raises(UserError, match="expected a mapping of columns"):
        from alignlab import GRPOTrainer

        GRPOTrainer(tiny_model_dir, length_reward, args=small(GRPOConfig, tmp_path / "b"), train_dataset=[1, 2])


def test_default_args_and_dataset_dict(tiny_model_dir, tmp_path, monkeypatch):
    from datasets import DatasetDict

    from alignlab import SFTTrainer

    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"Say {i}.", "completion": f" {i}"} for i in range(8)]
    trainer = SFTTrainer(tiny_model_dir, train_dataset=DatasetDict(train=Dataset.from_list(rows)))
    assert trainer.args.output_dir.endswith("-SFT") and len(trainer.train_examples) == 8


def test_the_command_line_still_says_dataset_name_is_required(capsys, tiny_model_dir, tmp_path):
    from tests.conftest import run_cli

    code, _, err = run_cli(capsys, "dpo", "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "o"))
    assert code == 1 and err.strip().endswith("--dataset_name is required") and len(err.strip().splitlines()) == 1


def test_a_bad_row_is_named_by_the_dataset_argument(tiny_model_dir, tmp_path):
    from alignlab import DPOConfig, DPOTrainer
    from alignlab.errors import DataError

    bad = PAIRS[:3] + [{"prompt": "x", "chosen": 3, "rejected": "y"}]
    with pytest.raises(DataError, match="train_dataset row 4"):
        DPOTrainer(tiny_model_dir, args=small(DPOConfig, tmp_path / "d"), train_dataset=bad)


def test_substep_and_optimizer_step_events_and_should_epoch_stop(tiny_model_dir, tmp_path):
    """transformers' on_substep_end (each accumulation micro-batch but the last), on_pre_optimizer_step and
    on_optimizer_step (around optimizer.step, the gradients still there), in the Trainer's order; and
    control.should_epoch_stop: the epoch ends after the step, the next one starts, the run ends after its epochs."""
    from alignlab import SFTConfig, SFTTrainer

    class Record(TrainerCallback):
        def __init__(self):
            self.events, self.grads = [], []

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.events.append("epoch_begin")

        def on_substep_end(self, args, state, control, **kwargs):
            self.events.append("substep_end")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.events.append("pre_optimizer_step")

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.events.append("optimizer_step")
            self.grads.append(all(p.grad is not None for p in model.parameters() if p.requires_grad))

        def on_step_end(self, args, state, control, **kwargs):
            self.events.append("step_end")
            if state.global_step == 1:
                control.should_epoch_stop = True

    rows = [{"prompt": f"Say {i}.", "completion": f" {i}"} for i in range(8)]
    record = Record()
    # 8 rows, 2 per micro-batch, 2 micro-batches per step: 2 steps per epoch, 2 epochs
    trainer = SFTTrainer(tiny_model_dir, args=small(SFTConfig, tmp_path / "sft", max_steps=-1, num_train_epochs=2,
                                                    per_device_train_batch_size=2, gradient_accumulation_steps=2),
                         train_dataset=Dataset.from_list(rows), callbacks=[record])
    trainer.train()
    step = ["substep_end", "pre_optimizer_step", "optimizer_step", "step_end"]
    # epoch 1 stopped after its first step; epoch 2 whole; no third epoch
    assert record.events == ["epoch_begin", *step, "epoch_begin", *step, *step]
    assert record.grads == [True, True, True] and trainer.state.global_step == 3

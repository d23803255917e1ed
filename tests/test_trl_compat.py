"""TRL users' flags carry over: every field of TRL 1.16's trainer configs is accepted with TRL's name and default,
or is a documented exception (docs/trl.md); the flags alignlab used to refuse now parse and act."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import one_line, read_metrics, run_cli, tiny_config

trl = pytest.importorskip("trl")

DOC = Path(__file__).resolve().parents[1] / "docs" / "trl.md"

def _configs():
    """(TRL config class, alignlab config class) for every config docs/trl.md covers."""
    import warnings

    from alignlab.algorithms.dpo import DPOConfig
    from alignlab.algorithms.grpo import GRPOConfig
    from alignlab.algorithms.kto import KTOConfig
    from alignlab.algorithms.online_dpo import OnlineDPOConfig
    from alignlab.algorithms.reward import RewardConfig
    from alignlab.algorithms.rloo import RLOOConfig
    from alignlab.algorithms.sft import SFTConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOConfig as TrlCPO
        from trl.experimental.online_dpo import OnlineDPOConfig as TrlOnlineDPO
        from trl.experimental.orpo import ORPOConfig as TrlORPO
    return [(trl.SFTConfig, SFTConfig), (trl.RewardConfig, RewardConfig), (trl.DPOConfig, DPOConfig),
            (trl.KTOConfig, KTOConfig), (trl.GRPOConfig, GRPOConfig), (trl.RLOOConfig, RLOOConfig),
            (TrlOnlineDPO, OnlineDPOConfig), (TrlORPO, DPOConfig), (TrlCPO, DPOConfig)]


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _same(a, b) -> bool:
    """Equal defaults; a one-element list equals its element (alignlab's ``loss_type`` takes one name or a list,
    TRL's Online DPO ``beta`` a list)."""
    a = a[0] if isinstance(a, list) and len(a) == 1 else a
    b = b[0] if isinstance(b, list) and len(b) == 1 else b
    return a == b or str(a) == str(b)


def _doc_table(heading: str) -> dict[str, str]:
    """Field name -> the row's text, from the table under ``## heading`` of docs/trl.md."""
    text = DOC.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `([a-z0-9_]+)`", line)
        if match:
            rows[match.group(1)] = line
    return rows


def test_every_trl_field_is_supported_or_a_documented_exception():
    exceptions, defaults = _doc_table("Exceptions"), _doc_table("Different defaults and meanings")
    problems = []
    for trl_cls, ours in _configs():
        mine = {f.name: f for f in dataclasses.fields(ours)}
        for f in dataclasses.fields(trl_cls):
            if f.name in exceptions:
                continue
            if f.name not in mine:
                problems.append(f"{trl_cls.__name__}.{f.name}: missing")
            elif not _same(_default(f), _default(mine[f.name])) and f.name not in defaults:
                problems.append(f"{trl_cls.__name__}.{f.name}: default {_default(f)!r} here "
                                f"{_default(mine[f.name])!r}, not in docs/trl.md")
    assert not problems, "\n".join(problems)


def test_the_documented_exceptions_are_the_ones_the_code_enforces():
    from alignlab.train.trl_args import EXCEPTIONS

    assert set(_doc_table("Exceptions")) == set(EXCEPTIONS)
    for name, row in _doc_table("Exceptions").items():
        assert ("error" in row) == EXCEPTIONS[name].error and ("warning" in row) != EXCEPTIONS[name].error, name


def test_exceptions_are_fewer_than_a_tenth_of_the_fields():
    names = {f.name for trl_cls, _ in _configs() for f in dataclasses.fields(trl_cls)}
    exceptions = set(_doc_table("Exceptions"))
    assert exceptions <= names
    assert len(exceptions) < 0.1 * len(names), f"{len(exceptions)} of {len(names)}"


# --- the command line and YAML ----------------------------------------------------------------------------------
def test_trl_dpo_script_command_line_parses():
    """TRL's documented DPO command line (trl/scripts/dpo.py), hub names replaced by local ones."""
    from alignlab.algorithms.dpo import DPOConfig
    from alignlab.cli import parse_config

    argv = ("--dataset_name builtin:concise --model_name_or_path m --learning_rate 5.0e-7 --num_train_epochs 1 "
            "--per_device_train_batch_size 2 --max_steps 1000 --gradient_accumulation_steps 8 "
            "--gradient_checkpointing --eval_strategy steps --eval_steps 50 --output_dir out "
            "--no_remove_unused_columns --use_peft --lora_r 32 --lora_alpha 16 --logging_steps 25 "
            "--optim adamw_torch --lr_scheduler_type cosine_with_min_lr "
            '--lr_scheduler_kwargs {"min_lr_rate":0.1} --warmup_steps 0.1 --dtype bfloat16 '
            "--attn_implementation sdpa --model_revision main --use_rslora --use_dora --run_name r1 "
            "--save_strategy epoch --logging_strategy steps --dataset_num_proc 1 --hub_model_id me/model "
            "--report_to none --bf16 false").split()
    config = parse_config(DPOConfig, argv, "alignlab dpo")
    assert (config.eval_strategy, config.eval_steps, config.save_strategy) == ("steps", 50, "epoch")
    assert config.remove_unused_columns is False and config.gradient_checkpointing is True
    assert config.lr_scheduler_kwargs == {"min_lr_rate": 0.1} and config.warmup_steps == 0.1
    assert (config.dtype, config.attn_implementation, config.use_rslora, config.use_dora) == (
        "bfloat16", "sdpa", True, True)
    assert config.run_name == "r1" and config.hub_model_id == "me/model" and config.optim == "adamw_torch"


def test_trl_recipe_yaml_loads(tmp_path):
    """The keys of a TRL recipe YAML (model, precision, LoRA, logging, hub) are all known."""
    from alignlab.algorithms.sft import SFTConfig
    from alignlab.cli import parse_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model_name_or_path: m\nmodel_revision: main\ndtype: bfloat16\nattn_implementation: sdpa\n"
        "dataset_name: builtin:concise\ndataset_num_proc: 1\nbf16: false\ndo_eval: true\neval_strategy: 'no'\n"
        "gradient_accumulation_steps: 4\ngradient_checkpointing: true\n"
        "gradient_checkpointing_kwargs:\n  use_reentrant: false\nhub_model_id: me/m\nhub_strategy: every_save\n"
        "learning_rate: 2.0e-05\nlog_level: info\nlogging_steps: 5\nlogging_strategy: steps\n"
        "lr_scheduler_type: cosine\nmax_length: 1024\nmax_steps: -1\nnum_train_epochs: 1\noutput_dir: out\n"
        "overwrite_output_dir: true\nper_device_eval_batch_size: 4\nper_device_train_batch_size: 2\n"
        "push_to_hub: false\nreport_to:\n- none\nsave_strategy: 'no'\nseed: 42\nuse_liger_kernel: false\n"
        "warmup_steps: 0.05\npacking: false\nuse_peft: true\nlora_r: 16\nlora_alpha: 32\nload_in_4bit: false\n"
        "lora_target_modules: all-linear\nrun_name: sft-run\n")
    config = parse_config(SFTConfig, ["--config", str(recipe)], "alignlab sft")
    assert config.dtype == "bfloat16" and config.save_strategy == "no" and config.warmup_steps == 0.05
    assert config.gradient_checkpointing_kwargs == {"use_reentrant": False} and config.run_name == "sft-run"


@pytest.mark.parametrize("argv, needle", [
    (["--push_to_hub"], "--push_to_hub True: not supported here (needs a Hugging Face hub account"),
    (["--deepspeed", "ds.json"], "--deepspeed ds.json: not supported here (needs DeepSpeed"),
    (["--load_in_4bit"], "--load_in_4bit needs bitsandbytes"),
    (["--lr_scheduler_type", "nope"], "--lr_scheduler_type: unknown scheduler 'nope'"),
    (["--torch_dtype", "float64x"], "--torch_dtype: unknown dtype 'float64x'"),
    (["--eval_strategy", "sometimes"], "--eval_strategy/--eval-strategy: invalid choice: 'sometimes'"),
    (["--logging_steps", "2.5"], "--logging_steps must be a whole number of steps or a ratio in (0, 1)"),
    (["--save_strategy", "best"], "--save_strategy best: not supported here"),
])
def test_refused_values_stop_with_one_line(capsys, tmp_path, argv, needle):
    code, _, err = run_cli(capsys, "dpo", "--dataset_name", "builtin:concise", "--output_dir", str(tmp_path / "o"),
                           *argv)
    assert code != 0 and needle in one_line(err)


def test_load_in_4bit_on_cpu_names_the_device(monkeypatch):
    """bitsandbytes present or not, 4-bit loading on a CPU-only machine stops at the config with one line that
    names the device."""
    import importlib.util

    from alignlab.algorithms.sft import SFTConfig
    from alignlab.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if hasattr(torch, "accelerator"):
        monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: None)
    for installed in (False, True):
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: object() if name == "bitsandbytes" and installed else real(name, *a))
        with pytest.raises(UserError) as info:
            SFTConfig(dataset_name="d.jsonl", output_dir="o", load_in_4bit=True, use_peft=True)
        assert "cpu" in str(info.value) and "\n" not in str(info.value)


def test_warning_exceptions_warn_once_and_go_on(caplog):
    from alignlab.algorithms.dpo import DPOConfig

    with caplog.at_level("WARNING"):
        config = DPOConfig(dataset_name="d.jsonl", output_dir="o", use_liger_kernel=True, dataset_num_proc=4)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("--use_liger_kernel True: not supported here") for line in lines)
    assert any(line.startswith("--dataset_num_proc 4: not supported here") for line in lines)
    assert config.use_liger_kernel is True


# --- what the flags do ------------------------------------------------------------------------------------------
def test_float_steps_are_ratios_of_the_total():
    from alignlab.algorithms.dpo import DPOConfig
    from alignlab.train.schedule import Cadence, resolve_steps

    assert resolve_steps(0.25, 10) == 3 and resolve_steps(4.0, 10) == 4 and resolve_steps(None, 10) is None
    config = DPOConfig(dataset_name="d.jsonl", output_dir="o", logging_steps=0.5, eval_steps=0.25, save_steps=0.5,
                       save_strategy="steps", eval_strategy="steps")
    cadence = Cadence.from_config(config, total_steps=8)
    assert (cadence.logging_steps, cadence.eval_steps, cadence.save_steps) == (4, 2, 4)
    assert [s for s in range(1, 9) if cadence.log(s, False, s == 8)] == [4, 8]
    assert [s for s in range(1, 9) if cadence.evaluate(s, s / 8, False)] == [2, 4, 6, 8]


def test_strategies_follow_transformers_default_flow():
    from alignlab.algorithms.dpo import DPOConfig
    from alignlab.train.schedule import Cadence

    def cadence(**kw):
        return Cadence.from_config(DPOConfig(dataset_name="d.jsonl", output_dir="o", **kw), total_steps=6)

    epoch = cadence(logging_strategy="epoch", eval_strategy="epoch", save_strategy="epoch")
    ends = {3: True, 6: True}  # two epochs of three steps
    assert [s for s in range(1, 7) if epoch.log(s, ends.get(s, False), s == 6)] == [3, 6]
    assert [s for s in range(1, 7) if epoch.save(s, ends.get(s, False))] == [3, 6]
    assert [s for s in range(1, 7) if epoch.evaluate(s, s / 3, ends.get(s, False))] == [3, 6]
    quiet = cadence(logging_strategy="no", save_strategy="no", logging_first_step=True)
    assert not any(quiet.log(s, True, s == 6) or quiet.save(s, True) for s in range(1, 7))
    first = cadence(logging_steps=4, logging_first_step=True)
    assert [s for s in range(1, 7) if first.log(s, False, s == 6)] == [1, 4, 6]
    delayed = cadence(eval_strategy="steps", eval_steps=1, eval_delay=3)
    assert [s for s in range(1, 7) if delayed.evaluate(s, 0.0, False)] == [3, 4, 5, 6]


def _optimizer_config(**kw):
    from alignlab.algorithms.dpo import DPOConfig

    return DPOConfig(dataset_name="d.jsonl", output_dir="o", **kw)


@pytest.mark.parametrize("optim, cls", [("adamw_torch", "AdamW"), ("adamw_torch_fused", "AdamW"),
                                        ("adafactor", "Adafactor"), ("sgd", "SGD"), ("adagrad", "Adagrad"),
                                        ("rmsprop", "RMSprop")])
def test_optim_names_go_through_transformers(optim, cls):
    from alignlab.train.loop import parameter_groups
    from alignlab.train.schedule import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    config = _optimizer_config(optim=optim, learning_rate=0.01, weight_decay=0.1)
    optimizer = build_optimizer(config, model, parameter_groups(model, 0.1))
    assert type(optimizer).__name__ == cls
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_unknown_optimizer_is_one_line():
    from alignlab.errors import UserError
    from alignlab.train.schedule import build_optimizer

    model = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="^--optim nope: "):
        build_optimizer(_optimizer_config(optim="nope"), model, [{"params": list(model.parameters())}])


def test_cosine_with_min_lr_takes_its_kwargs():
    from alignlab.train.schedule import build_scheduler

    model = torch.nn.Linear(2, 2)
    config = _optimizer_config(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs='{"min_lr_rate": 0.1}',
                               warmup_steps=0.2, learning_rate=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = build_scheduler(config, optimizer, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    lrs.append(scheduler.get_last_lr()[0])
    assert lrs[0] == 0 and lrs[2] == pytest.approx(1.0)  # two warm-up steps (0.2 of 10)
    assert lrs[-1] == pytest.approx(0.1) and min(lrs[2:]) == pytest.approx(0.1)
    with pytest.raises(Exception, match="lr_scheduler_kwargs"):
        build_scheduler(_optimizer_config(lr_scheduler_type="cosine_with_min_lr"), optimizer, total_steps=10)


def test_rslora_and_dora_reach_peft(tiny_model_dir, tmp_path):
    from alignlab.algorithms.sft import SFTConfig
    from alignlab.models import load_causal_lm
    from alignlab.train.runtime import Runtime

    config = SFTConfig(dataset_name="d.jsonl", output_dir=str(tmp_path), use_peft=True, use_rslora=True,
                       use_dora=True, lora_r=4, lora_alpha=8, bf16=False)
    model = Runtime(config, device=torch.device("cpu")).prepare_model(load_causal_lm(tiny_model_dir))
    lora = model.peft_config["default"]
    assert lora.use_rslora and lora.use_dora
    layer = next(m for m in model.modules() if hasattr(m, "lora_magnitude_vector") and m.lora_magnitude_vector)
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA's alpha / sqrt(r)


def test_model_init_fields_reach_from_pretrained(tiny_model_dir):
    from alignlab.algorithms.sft import SFTConfig
    from alignlab.models import load_causal_lm
    from alignlab.train.trl_args import model_init_kwargs

    config = SFTConfig(dataset_name="d.jsonl", output_dir="o", dtype="bfloat16", attn_implementation="eager")
    kwargs = model_init_kwargs(config)
    assert kwargs == {"dtype": torch.bfloat16, "attn_implementation": "eager"}
    model = load_causal_lm(tiny_model_dir, init_kwargs=kwargs)
    assert next(model.parameters()).dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    override = SFTConfig(dataset_name="d.jsonl", output_dir="o", model_init_kwargs='{"dtype": "float32"}')
    assert model_init_kwargs(override)["dtype"] == "float32"
    older = SFTConfig(dataset_name="d.jsonl", output_dir="o", torch_dtype="float16")  # the earlier name
    assert model_init_kwargs(older)["dtype"] == torch.float16


def test_a_run_honours_ratios_strategies_scheduler_and_run_name(tiny_model_dir, pairs_file, tmp_path):
    """A short DPO run: logging every half of the run and on the first step, a checkpoint per epoch, an evaluation
    on start and every quarter, cosine_with_min_lr, adafactor, NEFTune and TRL's token count."""
    from alignlab.algorithms.dpo import DPOConfig, train_dpo

    out = tmp_path / "run"
    config = tiny_config(DPOConfig, tiny_model_dir, pairs_file, out, max_steps=4, per_device_train_batch_size=4,
                         eval_split_size=4, logging_steps=0.5, logging_first_step=True, eval_steps=0.25,
                         eval_strategy="steps", eval_on_start=True, save_strategy="epoch", save_steps=500,
                         lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-5},
                         optim="adafactor",
                         neftune_noise_alpha=5.0, include_num_input_tokens_seen="non_padding", run_name="named")
    train_dpo(config)
    rows = read_metrics(out)
    train_steps = [r["step"] for r in rows if "loss" in r]
    eval_steps = [r["step"] for r in rows if "eval_loss" in r]
    assert train_steps == [1, 2, 4] and eval_steps == [0, 1, 2, 3, 4]
    assert all(r["num_input_tokens_seen"] == r["num_tokens"] for r in rows if "loss" in r)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # 8 pairs: 2 steps an epoch
    assert [r for r in rows if "loss" in r][-1]["learning_rate"] == pytest.approx(1e-5)  # the schedule's floor


def test_max_completion_length_caps_each_completion(tiny_tokenizer):
    from alignlab.data.preference import build_pair_examples

    rows = [("f:1", {"prompt": "Q?", "chosen": " one two three four five six", "rejected": " no"})]
    full, _ = build_pair_examples(rows, tiny_tokenizer, max_length=None)
    capped, _ = build_pair_examples(rows, tiny_tokenizer, max_length=None, max_completion_length=2)
    assert sum(capped[0]["chosen_completion_mask"]) == 2 < sum(full[0]["chosen_completion_mask"])
    assert capped[0]["rejected_input_ids"] == full[0]["rejected_input_ids"][:len(capped[0]["rejected_input_ids"])]


def test_eval_strategy_takes_the_test_split_of_dataset_name(tmp_path):
    """As TRL's scripts: with an eval strategy and no other eval data, the ``dataset_test_split`` split of
    ``dataset_name``; a single file has none (one line)."""
    from datasets import Dataset, DatasetDict

    from alignlab.algorithms.sft import SFTConfig
    from alignlab.errors import UserError
    from alignlab.train.setup import load_train_eval

    saved = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list([{"text": "a"}, {"text": "b"}]),
                 "test": Dataset.from_list([{"text": "c"}])}).save_to_disk(str(saved))

    def build(rows, tokenizer):
        class Stats:
            def describe(self):
                return ""
        return [row["text"] for _, row in rows], Stats()

    config = SFTConfig(dataset_name=str(saved), output_dir="o", eval_strategy="steps", eval_steps=1)
    assert load_train_eval(config, build, None) == (["a", "b"], ["c"])
    quiet = SFTConfig(dataset_name=str(saved), output_dir="o")
    assert load_train_eval(quiet, build, None) == (["a", "b"], [])
    single = tmp_path / "d.jsonl"
    single.write_text('{"text": "a"}\n')
    with pytest.raises(UserError, match="has no 'test' split; give --eval_dataset_name or --eval_split_size"):
        load_train_eval(SFTConfig(dataset_name=str(single), output_dir="o", eval_strategy="epoch"), build, None)


def test_logging_nan_inf_filter_leaves_non_finite_losses_out():
    from alignlab.train.window import MetricsWindow

    window = MetricsWindow(lambda t: t)
    window.finite_only.add("loss")
    for value in (1.0, float("nan"), 3.0):
        window.add("loss", torch.tensor(value))
        window.add("other", torch.tensor(value))
    means = window.means()
    assert means["loss"] == 2.0 and math.isnan(means["other"])


def test_data_order_fields_reach_the_loader():
    from alignlab.algorithms.kto import KTOConfig
    from alignlab.algorithms.sft import SFTConfig
    from alignlab.train.schedule import loader_options

    cpu = torch.device("cpu")
    sft = SFTConfig(dataset_name="d.jsonl", output_dir="o")  # shuffle_dataset false: no pre-shuffle, loader shuffles
    assert loader_options(sft, shuffle=True, online=False, device=cpu)["shuffle"] is True
    kto = KTOConfig(dataset_name="d.jsonl", output_dir="o")  # TRL's KTO reads rows in order
    assert loader_options(kto, shuffle=True, online=False, device=cpu)["shuffle"] is False
    seeded = SFTConfig(dataset_name="d.jsonl", output_dir="o", data_seed=3, dataloader_drop_last=True)
    options = loader_options(seeded, shuffle=True, online=False, device=cpu)
    assert options["generator"].initial_seed() == 3 and options["drop_last"] is True


def test_ddp_and_accelerator_config_fields_become_accelerate_options():
    from alignlab.algorithms.sft import SFTConfig
    from alignlab.errors import UserError
    from alignlab.train.trl_args import accelerator_options

    config = SFTConfig(dataset_name="d.jsonl", output_dir="o", ddp_timeout=60, ddp_find_unused_parameters=True,
                       ddp_bucket_cap_mb=10, accelerator_config='{"even_batches": false}')
    options = accelerator_options(config)
    kinds = {type(h).__name__: h for h in options["kwargs_handlers"]}
    assert kinds["InitProcessGroupKwargs"].timeout.total_seconds() == 60
    assert kinds["DistributedDataParallelKwargs"].find_unused_parameters is True
    assert kinds["DistributedDataParallelKwargs"].bucket_cap_mb == 10
    assert options["dataloader_config"].even_batches is False and options["dataloader_config"].use_seedable_sampler
    assert accelerator_options(SFTConfig(dataset_name="d.jsonl", output_dir="o"))["kwargs_handlers"] == []
    with pytest.raises(UserError, match="key 'gradient_accumulation_kwargs' is not supported here"):
        accelerator_options(SFTConfig(dataset_name="d.jsonl", output_dir="o",
                                      accelerator_config={"gradient_accumulation_kwargs": {}}))


def test_sync_reference_mixes_the_policy_in():
    from alignlab.errors import UserError
    from alignlab.train.schedule import sync_reference

    policy, reference = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = reference.weight.detach().clone()
    sync_reference(policy, reference, 0.6)
    assert torch.allclose(reference.weight, 0.6 * policy.weight + 0.4 * before)
    with pytest.raises(UserError, match="--sync_ref_model: the reference model has no parameter"):
        sync_reference(torch.nn.Linear(3, 2), reference, 0.6)


def test_sync_ref_model_updates_dpos_reference(tiny_model_dir, pairs_file, tmp_path):
    """TR-DPO with alpha 1: after the last step's update the reference is the trained policy."""
    from alignlab.algorithms.dpo import DPOConfig, DPOTrainer
    from alignlab.errors import UserError

    trainer = DPOTrainer(tiny_config(DPOConfig, tiny_model_dir, pairs_file, tmp_path / "run", max_steps=2,
                                     sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=1.0))
    start = {k: v.detach().clone() for k, v in trainer.ref_model.named_parameters()}
    trainer.train()
    reference = dict(trainer.ref_model.named_parameters())
    for name, param in trainer.policy.named_parameters():
        assert torch.equal(reference[name], param.detach()), name
    assert any(not torch.equal(start[k], reference[k]) for k in start)
    with pytest.raises(UserError, match="--sync_ref_model updates a separate reference model"):
        DPOConfig(dataset_name="d.jsonl", output_dir="o", sync_ref_model=True, use_peft=True)


def test_kto_apo_zero_unpaired_has_no_reference_point(tiny_model_dir, tmp_path):
    """TRL's unpaired APO-zero: KTO's losses with z0 = 0; at step 1 (policy = reference) every loss is 0.5."""
    from alignlab.algorithms.kto import KTOConfig, train_kto

    data = tmp_path / "unpaired.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus {i}?", "completion": f"{2 * i}.", "label": bool(i % 2)})
                            + "\n" for i in range(8)))
    out = tmp_path / "run"
    train_kto(tiny_config(KTOConfig, tiny_model_dir, data, out, max_steps=2, loss_type="apo_zero_unpaired"))
    rows = read_metrics(out)
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and rows[0]["kl"] == 0 and rows[1]["kl"] == 0
    assert rows[1]["loss"] != rows[0]["loss"]


def test_alphapo_reward_shape_follows_trls_cpo_trainer():
    """TRL CPOTrainer with alpha != 0: r = (1 - p^-alpha) / alpha of the (summed, or SimPO's per-token) log-probs."""
    import torch.nn.functional as F

    from alignlab.losses.dpo import PairLogps, preference_loss

    pair = PairLogps(chosen_logps=torch.tensor([-2.0, -6.0]), rejected_logps=torch.tensor([-3.0, -4.0]),
                     chosen_lengths=torch.tensor([2.0, 3.0]), rejected_lengths=torch.tensor([1.0, 4.0]))
    alpha, beta = 0.5, 0.1

    def reward(logps):
        return (1 - torch.exp(logps).pow(-alpha)) / alpha

    cpo = preference_loss(["cpo"], pair, beta=beta, cpo_alpha=0.0, label_smoothing=0.0, alpha=alpha)
    expected = -F.logsigmoid(beta * (reward(pair.chosen_logps) - reward(pair.rejected_logps)))
    assert torch.allclose(cpo, expected)  # per pair
    simpo = preference_loss(["simpo"], pair, beta=beta, simpo_gamma=0.5, label_smoothing=0.0, alpha=alpha)
    margin = reward(pair.chosen_logps / pair.chosen_lengths) - reward(pair.rejected_logps / pair.rejected_lengths)
    assert torch.allclose(simpo, -F.logsigmoid(beta * (margin - 0.5 / beta)))
    plain = preference_loss(["cpo"], pair, beta=beta, cpo_alpha=0.0, label_smoothing=0.0, alpha=0.0)
    assert torch.allclose(plain, -F.logsigmoid(beta * (pair.chosen_logps - pair.rejected_logps)))


def test_skip_memory_metrics_false_logs_transformers_memory_metrics(tiny_model_dir, pairs_file, tmp_path):
    from alignlab.algorithms.dpo import DPOConfig, train_dpo

    out = tmp_path / "run"
    result = train_dpo(tiny_config(DPOConfig, tiny_model_dir, pairs_file, out, max_steps=1, skip_memory_metrics=False))
    last = read_metrics(out)[-1]
    for name in ("train_mem_cpu_alloc_delta", "train_mem_cpu_peaked_delta", "before_init_mem_cpu"):
        assert isinstance(last[name], int) and name in result.train_metrics, name
    quiet = tmp_path / "quiet"
    train_dpo(tiny_config(DPOConfig, tiny_model_dir, pairs_file, quiet, max_steps=1))
    assert not any("_mem_" in key for row in read_metrics(quiet) for key in row)

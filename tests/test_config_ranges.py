"""Every command's numeric flags are checked in one place (alignlab.train.config.check_ranges) before any work: an
out-of-range or non-finite value is one line naming the flag, a non-zero exit, no traceback."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from tests.conftest import one_line, run_cli


def _configs() -> dict[str, type]:
    from alignlab.algorithms.reward import ScoreConfig
    from alignlab.experiments.compare import CompareConfig
    from alignlab.experiments.evaluate import EvaluateConfig
    from alignlab.generate import GenerateConfig
    from alignlab.methods import methods

    return {**{name: m.config for name, m in methods().items()}, "score": ScoreConfig, "evaluate": EvaluateConfig,
            "compare": CompareConfig, "generate": GenerateConfig}


def _numeric(field: dataclasses.Field) -> str | None:
    """``"int"`` or ``"float"`` for a numeric flag (lists of numbers too), else ``None``."""
    text = field.type.__name__ if isinstance(field.type, type) else str(field.type)  # a string, or a type once
    words = set(re.findall(r"\w+", re.sub(r"'[^']*'|\"[^\"]*\"", "", text)))  # HfArgumentParser resolved it
    if "bool" in words:
        return None
    return "float" if "float" in words else "int" if "int" in words else None


def _out_of_range(kind: str, rule) -> list[str]:
    """Values outside ``rule`` (or, without one, outside what every such field allows: finite floats, counts
    >= 0), as command-line text."""
    values = ["nan", "inf", "-inf"] if kind == "float" else []
    if rule is None:
        return values + (["-1"] if kind == "int" else [])
    step = 1 if kind == "int" else 0.5
    fmt = (lambda v: str(int(v))) if kind == "int" else repr
    if rule.ge is not None:
        values.append(fmt(rule.ge - step))
    if rule.gt is not None:
        values.append(fmt(rule.gt))
    if rule.le is not None:
        values.append(fmt(rule.le + step))
    if rule.lt is not None:
        values.append(fmt(rule.lt))
    return [v for v in values if not (v.lstrip("-").replace(".", "").isdigit() and float(v) in rule.also)]


def _cases() -> list[tuple[str, str, str]]:
    from alignlab.train.config import class_ranges

    cases = []
    for command, cls in _configs().items():
        rules = class_ranges(cls)
        for field in dataclasses.fields(cls):
            kind = _numeric(field)
            if kind:
                cases += [(command, field.name, value) for value in _out_of_range(kind, rules.get(field.name))]
    return cases


def test_every_command_rejects_every_out_of_range_value_in_one_line(capsys):
    # through the command line (in-process): one value per flag and command; every value of each through the same
    # check the command line makes (building a command's parser 1000 times would take a minute)
    from alignlab.errors import UserError
    from alignlab.train.config import check_ranges

    cases = _cases()
    configs = _configs()
    assert {c for c, _, _ in cases} == set(configs)  # every command has numeric flags, and is covered
    failures, seen = [], set()
    for command, name, value in cases:
        if (command, name) in seen:
            kind = _numeric(next(f for f in dataclasses.fields(configs[command]) if f.name == name))
            number = float(value) if kind == "float" else int(value)
            try:
                check_ranges(configs[command], {name: number})
                failures.append(f"{command} --{name} {value}: accepted")
            except UserError as exc:
                if not str(exc).startswith(f"--{name} must be"):
                    failures.append(f"{command} --{name} {value}: {exc}")
            continue
        seen.add((command, name))
        code, _, err = run_cli(capsys, command, f"--{name}", value)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        ok = code != 0 and len(lines) == 1 and "Traceback" not in err and f"--{name}" in lines[0]
        if not ok:
            failures.append(f"{command} --{name} {value}: exit {code}: {err.strip()[-300:]}")
    assert not failures, "\n".join(failures)


def test_the_rules_speak_of_the_flag_value_and_range(capsys):
    cases = {
        ("grpo", "--num_generations", "1"): "alignlab grpo: error: --num_generations must be >= 2 (a group of one "
                                              "completion is its own baseline: every advantage would be 0), got 1",
        ("grpo", "--beta", "inf"): "alignlab grpo: error: --beta must be a finite number, got inf",
        ("dpo", "--learning_rate", "-1e-5"): "alignlab dpo: error: --learning_rate must be > 0, got -1e-05",
        ("sft", "--max_steps", "0"): "alignlab sft: error: --max_steps must be >= 1 (or -1 to use "
                                     "--num_train_epochs), got 0",
        ("rloo", "--reward_weights", "nan"): "alignlab rloo: error: --reward_weights must be a finite number, "
                                             "got [nan]",
        ("generate", "--top_p", "1.5"): "alignlab generate: error: --top_p must be in (0, 1], got 1.5",
    }
    for (command, flag, value), expected in cases.items():
        code, _, err = run_cli(capsys, command, flag, value)
        assert code == 1 and one_line(err) == expected
    # plain negative numbers still read as values, lists of them too
    code, _, err = run_cli(capsys, "dpo", "--warmup_ratio", "-0.5")
    assert code == 1 and one_line(err) == "alignlab dpo: error: --warmup_ratio must be in [0, 1), got -0.5"


def test_the_same_rules_hold_for_configs_built_in_python(tiny_model_dir):
    from alignlab.algorithms.grpo import GRPOConfig
    from alignlab.errors import UserError

    base = dict(model_name_or_path=tiny_model_dir, dataset_name="p.jsonl", output_dir="o", reward_funcs=["m:f"])
    with pytest.raises(UserError, match=r"^--num_generations must be >= 2 .*got 1$"):
        GRPOConfig(**base, num_generations=1)
    with pytest.raises(UserError, match=r"^--beta must be a finite number, got nan$"):
        GRPOConfig(**base, beta=math.nan)
    with pytest.raises(UserError, match=r"^--max_grad_norm must be a finite number, got inf$"):
        GRPOConfig(**base, max_grad_norm=math.inf)


def test_a_subclass_declares_its_own_rules():
    from alignlab.errors import UserError
    from alignlab.train.config import Range, TrainConfig, check_ranges

    @dataclasses.dataclass
    class Custom(TrainConfig):
        RANGES = {"num_generations": Range(ge=1), "clip": Range(gt=0, lt=1, why="a ratio")}
        num_generations: int = 1
        clip: float = 0.2

    Custom(output_dir="o", dataset_name="d.jsonl", bf16=False)  # its own rule wins over the name's (>= 2)
    with pytest.raises(UserError, match=r"^--clip must be in \(0, 1\) \(a ratio\), got 1.0$"):
        Custom(output_dir="o", dataset_name="d.jsonl", bf16=False, clip=1.0)
    with pytest.raises(UserError, match=r"^--per_device_train_batch_size must be >= 1, got 0$"):
        check_ranges(Custom, {"per_device_train_batch_size": 0})

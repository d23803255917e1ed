"""Reward functions named by the user, their validation, weights, and the reward model as a source."""

import math
import sys

import pytest
import torch

from alignlab.errors import UserError
from alignlab.rollout.rewards import build_reward_sources, call_reward_func, compute_rewards, load_reward_func


@pytest.fixture
def funcs_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def length(prompts, completions, **kw):\n"
        "    return [float(len(c)) for c in completions]\n"
        "def echo_column(prompts, completions, answer, completion_ids, **kw):\n"
        "    return [float(a) + len(ids) for a, ids in zip(answer, completion_ids)]\n"
        "def maybe(prompts, completions, **kw):\n"
        "    return [None if c == 'skip' else 1.0 for c in completions]\n"
        "NOT_CALLABLE = 3\n"
    )
    return path


def test_loads_from_a_file_and_from_a_module(funcs_file, monkeypatch):
    fn = load_reward_func(f"{funcs_file}:length")
    assert fn(["p"], ["abc"]) == [3.0]
    monkeypatch.syspath_prepend(str(funcs_file.parent))
    sys.modules.pop("my_rewards", None)
    assert load_reward_func("my_rewards:length")(["p"], ["ab"]) == [2.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", "expected path/to/file.py:function or module:function"),
        ("missing.py:f", "file not found"),
        ("{file}:nope", "has no 'nope'"),
        ("{file}:NOT_CALLABLE", "is not callable"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ],
)
def test_bad_specs_are_one_clear_error(funcs_file, spec, message):
    with pytest.raises(UserError, match=message):
        load_reward_func(spec.format(file=funcs_file))


def test_return_values_are_checked():
    with pytest.raises(UserError, match="must return a list of 2 numbers, got 1 values"):
        call_reward_func(lambda p, c, **k: [1.0], "f", ["a", "b"], ["x", "y"])
    with pytest.raises(UserError, match="returned 'x' for completion 1"):
        call_reward_func(lambda p, c, **k: [1.0, "x"], "f", ["a", "b"], ["x", "y"])
    with pytest.raises(UserError, match="returned nan for completion 0"):
        call_reward_func(lambda p, c, **k: [math.nan], "f", ["a"], ["x"])
    with pytest.raises(UserError, match="raised ZeroDivisionError"):
        call_reward_func(lambda p, c, **k: [1 / 0], "f", ["a"], ["x"])


def test_weighted_sum_with_columns_and_none(funcs_file):
    sources = build_reward_sources(
        [f"{funcs_file}:length", f"{funcs_file}:echo_column", f"{funcs_file}:maybe"], [2.0, 1.0, 10.0],
        with_reward_model=False,
    )
    assert [s.name for s in sources] == ["length", "echo_column", "maybe"]
    total, per = compute_rewards(
        sources,
        prompts=["p1", "p2"],
        completions=["abc", "skip"],
        completion_ids=[[5, 6], [7]],
        columns={"answer": [10, 20]},
    )
    # completion 0: 2*3 + (10 + 2) + 10*1 = 28; completion 1: 2*4 + (20 + 1) + (None -> 0) = 29
    assert total.tolist() == [28.0, 29.0]
    assert math.isnan(per["maybe"][1]) and per["length"].tolist() == [3.0, 4.0]


def test_weights_must_match_the_sources(funcs_file):
    with pytest.raises(UserError, match="--reward_weights has 1 values for 2 reward sources"):
        build_reward_sources([f"{funcs_file}:length"], [1.0], with_reward_model=True)
    with pytest.raises(UserError, match="nothing to compute rewards with"):
        build_reward_sources(None, None, with_reward_model=False)
    names = [s.name for s in build_reward_sources([f"{funcs_file}:length"] * 2, None, with_reward_model=False)]
    assert names == ["length", "length_2"]


def test_reward_model_source_scores_the_last_real_token(tiny_model_dir, tiny_tokenizer):
    from alignlab.models import load_reward_model
    from alignlab.rollout.scoring import sequence_scores

    torch.manual_seed(0)
    model = load_reward_model(tiny_model_dir, pad_token_id=tiny_tokenizer.pad_token_id).eval()
    sources = build_reward_sources(None, [0.5], with_reward_model=True)
    sources[-1].model = model
    inputs = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    with torch.no_grad():
        total, per = compute_rewards(
            sources, prompts=["a", "b"], completions=["x", "y"], completion_ids=[[7], [9]], columns={}, reward_inputs=inputs
        )
        alone = sequence_scores(model, torch.tensor([[8, 9]]), torch.tensor([[1, 1]]))
    assert torch.allclose(per["reward_model"][1], alone[0], atol=1e-5)
    assert torch.allclose(total, 0.5 * per["reward_model"])

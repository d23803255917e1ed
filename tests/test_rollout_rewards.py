"""Reward functions named by the user, their validation, weights, and the reward model as a source."""

import logging
import math
import re
import sys

import numpy as np

import pytest
import torch

from alignlab.errors import UserError
from alignlab.rollout.rewards import (
    build_reward_sources,
    call_reward_func,
    compute_rewards,
    load_reward_func,
    run_reward_func,
    validate_rewards,
)


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
        "def boom(prompts, completions, **kw):\n"
        "    raise KeyError('answer')\n"
        "def half_bad(prompts, completions, **kw):\n"
        "    return [float('nan') if c == 'skip' else 2.0 for c in completions]\n"
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
        ("no_colon", "expected path/to/file.py:function, module:function, package.module.function"),
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
        call_reward_func(lambda prompts, completions, **k: [1.0], "f", ["a", "b"], ["x", "y"])
    with pytest.raises(UserError, match="returned 'x' for completion 1"):
        call_reward_func(lambda prompts, completions, **k: [1.0, "x"], "f", ["a", "b"], ["x", "y"])
    with pytest.raises(UserError, match="returned nan for completion 0"):
        call_reward_func(lambda prompts, completions, **k: [math.nan], "f", ["a"], ["x"])
    with pytest.raises(UserError, match="raised ZeroDivisionError"):
        call_reward_func(lambda prompts, completions, **k: [1 / 0], "f", ["a"], ["x"])


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


@pytest.mark.parametrize(
    "values, message",
    [
        # wrong count / not a list: the whole call is bad
        ([1.0], "must return a list of 3 numbers, got 1 values"),
        ({"a": 1.0}, "must return a list of 3 numbers, got dict"),
        ("1.0 2.0 3.0", "must return a list of 3 numbers, got str"),
        ((v for v in [1.0, 2.0, 3.0]), "must return a list of 3 numbers, got generator"),
        (torch.ones(3, 1), "must return a list of 3 numbers, got Tensor"),
        (2.0, "must return a list of 3 numbers, got float"),
        # bad entries: the first one is named with its index, and the count
        ([1.0, math.inf, "x"], r"returned inf for completion 1 \(2 of 3 bad\): expected a finite number or None"),
        ([1.0, 2.0, -math.inf], r"returned -inf for completion 2 \(1 of 3 bad\)"),
        ([math.nan, None, 1.0], r"returned nan for completion 0 \(1 of 3 bad\)"),
        ([None, "0.5", 1.0], r"returned '0.5' for completion 1 \(1 of 3 bad\)"),
        ([True, 1.0, 1.0], r"returned True for completion 0"),
        ([1.0, [1.0], 1.0], r"returned \[1.0\] for completion 1"),
        ([1.0, 1.0, np.float32(np.nan)], r"returned np.float32\(nan\) for completion 2"),
    ],
)
def test_bad_return_values_are_one_line_errors_naming_the_function(values, message):
    with pytest.raises(UserError, match=f"^reward function rewards.py:score {message}") as info:
        validate_rewards(values, 3, "rewards.py:score")
    assert "\n" not in str(info.value)


def test_good_values_none_numpy_and_tensors():
    # None is "not applicable": NaN here, not bad; numpy and 0-d tensor numbers count as numbers
    rewards, bad = validate_rewards([None, np.float32(0.5), torch.tensor(2), 3], 4, "f")
    assert math.isnan(rewards[0]) and rewards[1:].tolist() == [0.5, 2.0, 3.0]
    assert rewards.dtype == torch.float32 and not bad.any()
    rewards, bad = validate_rewards(torch.tensor([1.0, -1.0]), 2, "f")
    assert rewards.tolist() == [1.0, -1.0] and not bad.any()
    rewards, _ = validate_rewards(np.array([0.25, 4.0]), 2, "f")
    assert rewards.tolist() == [0.25, 4.0]


def test_drop_marks_bad_entries_and_keeps_the_rest(caplog):
    caplog.set_level(logging.WARNING, logger="alignlab.rollout.rewards")
    rewards, bad = validate_rewards([1.0, "x", None, math.inf], 4, "f.py:g", on_error="drop")
    assert rewards[0] == 1.0 and all(math.isnan(v) for v in rewards[1:].tolist())
    assert bad.tolist() == [False, True, False, True]  # None (row 2) is not bad
    assert "reward function f.py:g returned 'x' for completion 1 (2 of 4 bad)" in caplog.text
    rewards, bad = validate_rewards([1.0], 3, "f.py:g", on_error="drop")  # wrong count: every row
    assert bad.tolist() == [True] * 3 and torch.isnan(rewards).all()
    with pytest.raises(ValueError, match="on_error"):
        validate_rewards([1.0], 1, "f", on_error="ignore")


def test_a_raising_function_is_named_by_its_spec_on_one_line(funcs_file):
    def multi_line(prompts, completions, **kw):
        raise RuntimeError("first line\nsecond line")

    with pytest.raises(UserError, match=r"^reward function my.py:multi_line raised RuntimeError: first line$"):
        call_reward_func(multi_line, "my.py:multi_line", ["a"], ["x"])
    rewards, bad = run_reward_func(multi_line, "my.py:multi_line", ["a", "b"], ["x", "y"], on_error="drop")
    assert bad.tolist() == [True, True] and torch.isnan(rewards).all()

    spec = f"{funcs_file}:boom"
    sources = build_reward_sources([f"{funcs_file}:length", spec], None, with_reward_model=False)
    assert sources[1].spec == spec and sources[1].name == "boom"
    with pytest.raises(UserError, match=f"^reward function {re.escape(spec)} raised KeyError: 'answer'$"):
        compute_rewards(sources, prompts=["p"], completions=["abc"], completion_ids=[[1]], columns={})


def test_compute_rewards_drop_makes_the_total_nan_only_where_a_function_failed(funcs_file):
    sources = build_reward_sources(
        [f"{funcs_file}:length", f"{funcs_file}:half_bad", f"{funcs_file}:maybe"], None, with_reward_model=False
    )
    first_bad = re.escape(f"reward function {funcs_file}:half_bad returned nan for completion 1")
    with pytest.raises(UserError, match=first_bad):
        compute_rewards(sources, prompts=["p", "q"], completions=["abc", "skip"], completion_ids=[[1], [2]], columns={})
    total, per = compute_rewards(
        sources, prompts=["p", "q", "r"], completions=["abc", "skip", "de"], completion_ids=[[1], [2], [3]],
        columns={}, on_error="drop",
    )
    # completion 0: 3 + 2 + 1 = 6; completion 1: half_bad dropped -> NaN (maybe's None alone would count 0);
    # completion 2: 2 + 2 + 1 = 5
    assert total[0] == 6.0 and math.isnan(total[1]) and total[2] == 5.0
    assert per["length"].tolist() == [3.0, 4.0, 2.0] and math.isnan(per["half_bad"][1])


@pytest.mark.parametrize("conversational", [True, False])
def test_a_reward_model_reads_completions_as_it_was_trained(tiny_model_dir, tiny_tokenizer, tmp_path, conversational):
    """The reward model's input for a sampled completion is the rendering ``alignlab reward`` trains on (the
    prompt and the completion as a finished turn), even for a completion cut mid-sentence, and every reward
    model gets it, not only one whose vocabulary differs from the policy's."""
    from types import SimpleNamespace

    from alignlab.data.preference import PreferencePair, tokenize_pair
    from alignlab.models import load_reward_model
    from alignlab.rollout.experience import reward_model_inputs
    from alignlab.rollout.scoring import attach_reward_model

    tok = tiny_tokenizer
    cut = "Once upon a time a small fox wanted to"  # a completion stopped by the length limit
    if conversational:
        prompt = [{"role": "user", "content": "Tell me a story."}]
        pair = PreferencePair(prompt, [{"role": "assistant", "content": cut}], [{"role": "assistant", "content": "No."}])
    else:
        prompt = "Tell me a story."
        pair = PreferencePair(prompt, cut, "No.")
    trained_on = tokenize_pair(pair, tok)
    expected = trained_on["prompt_ids"] + trained_on["chosen_ids"]
    got = reward_model_inputs(tok, [{"prompt": prompt}], [cut])
    n = int(got["attention_mask"][0].sum())
    assert got["input_ids"][0, :n].tolist() == expected
    # the score is read after the end-of-turn marker, not at the completion's own last word
    assert tok.eos_token_id in expected[-2:] and expected[-1] != tok(cut, add_special_tokens=False).input_ids[-1]

    rm_dir = tmp_path / "rm"
    load_reward_model(tiny_model_dir, pad_token_id=tok.pad_token_id).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    sources = build_reward_sources(None, None, with_reward_model=True)
    config = SimpleNamespace(reward_model_path=str(rm_dir), trust_remote_code=False)
    rtok = attach_reward_model(sources, config, SimpleNamespace(frozen_model=lambda m: m))
    assert rtok is not None and rtok.get_vocab() == tok.get_vocab() and sources[-1].model is not None

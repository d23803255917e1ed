"""Built-in tasks: their splits, the rows() / get_task() interface, and the rule-based rewards, checked against
hand-worked numbers (no model is loaded)."""

import re

import pytest
import textstat

from alignlab.errors import UserError
from alignlab.rollout.rewards import call_reward_func, load_reward_func
from alignlab.tasks import TASKS, get_task
from alignlab.tasks.arithmetic import arithmetic_reward, arithmetic_score
from alignlab.tasks.kid_stories import (
    ending_score,
    length_score,
    readability_score,
    repetition_fraction,
    story_reward,
)


def _words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def _content(row: dict) -> str:
    (message,) = row["prompt"]
    assert message["role"] == "user"
    return message["content"]


# --- kid-stories reward components -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, expected",
    [(0, 0.0), (5, 0.0), (10, 0.0), (15, 0.5), (19, 0.9), (20, 1.0), (30, 1.0), (45, 1.0), (60, 0.5), (75, 0.0), (90, 0.0)],
)
def test_length_score_window_and_falloff(n, expected):
    # window 20..45 words; 0 at 10 words (10 below) and at 75 words (30 above)
    assert length_score(_words(n)) == pytest.approx(expected)


def test_length_counts_words_not_punctuation():
    assert length_score("Hi , there ! " * 10) == length_score(_words(20)) == 1.0
    assert length_score("don't " * 15) == pytest.approx(0.5)  # an inner apostrophe keeps one word


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The end.", 1.0),
        ("They all went home!  \n", 1.0),
        ("Was it a dream?", 1.0),
        ('He said, "Goodbye."', 1.0),
        ("She smiled. “Thank you!”", 1.0),
        ("(The end.)", 1.0),
        ("And then the", 0.0),
        ("Once upon a time,", 0.0),
        ('"Wait', 0.0),
        ("", 0.0),
    ],
)
def test_ending_score(text, expected):
    assert ending_score(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("the cat sat the cat sat", 1 / 4),  # the-cat-sat, cat-sat-the, sat-the-cat, the-cat-sat (repeat)
        ("The cat sat. The CAT, sat!", 1 / 4),  # case and punctuation do not matter
        ("go go go go go", 2 / 3),  # three go-go-go trigrams, two repeats
        ("a small red fox ran home", 0.0),
        ("two words", 0.0),
        ("", 0.0),
    ],
)
def test_repetition_fraction(text, expected):
    assert repetition_fraction(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "grade, age, expected",
    [
        (3.0, 8, 1.0),  # target 8 - 5 = 3
        (3.0, 6, 0.5),  # target 1: 1 - 2/4
        (3.0, None, 0.5),  # no age: 6
        (3.0, 4, 0.25),  # target max(0, -1) = 0: 1 - 3/4
        (-1.0, 5, 0.75),  # target 0: 1 - 1/4
        (9.0, 6, 0.0),  # 8 grades away: clipped at 0
        (5.0, 10, 1.0),
    ],
)
def test_readability_formula_with_a_stubbed_grade(monkeypatch, grade, age, expected):
    monkeypatch.setattr(textstat, "flesch_kincaid_grade", lambda text: grade)
    assert readability_score(_words(12), age) == pytest.approx(expected)


def test_readability_is_zero_under_ten_words(monkeypatch):
    monkeypatch.setattr(textstat, "flesch_kincaid_grade", lambda text: 1.0)
    assert readability_score(_words(9), 6) == 0.0
    assert readability_score(_words(10), 6) == 1.0


def test_readability_with_the_real_textstat():
    assert isinstance(textstat.flesch_kincaid_grade("The cat sat on the mat."), float)
    simple = "The cat sat on the mat. The dog ran to the cat. They had fun in the sun all day."
    hard = (
        "Notwithstanding considerable meteorological uncertainty, the administrative committee unanimously "
        "authorized comprehensive infrastructural modernization initiatives throughout the municipality."
    )
    assert readability_score(simple, 5) > 0.5
    assert readability_score(hard, 5) == 0.0


def test_story_reward_combines_the_components(monkeypatch):
    monkeypatch.setattr(textstat, "flesch_kincaid_grade", lambda text: 1.0)
    text = "the cat sat the cat sat on a mat and then it went to bed."
    # 15 words: length (15 - 10) / 10 = 0.5; ends with '.': 1; 13 trigrams, 1 repeat; grade 1 = target for 6
    expected = 0.4 * 1.0 + 0.3 * 0.5 + 0.3 * 1.0 - 1 / 13
    assert story_reward(["p"], [text], age=[6]) == pytest.approx([expected])
    assert story_reward(["p"], [text]) == pytest.approx([expected])  # no age column: 6
    # a 10-year-old's target is grade 5: readability 1 - 4/4 = 0
    assert story_reward(["p"], [text], age=[10]) == pytest.approx([expected - 0.4])
    cut = "the cat sat the cat sat on a mat and then it went to"
    # cut off: 14 words, length 0.4, no ending, 12 trigrams with 1 repeat
    assert story_reward(["p"], [cut], age=[6]) == pytest.approx([0.4 + 0.3 * 0.4 - 1 / 12])


def test_story_reward_bounds():
    assert story_reward(["p"], [""], age=[6]) == [0.0]
    looping = " ".join(["and then"] * 40)
    (value,) = story_reward(["p"], [looping], age=[6])
    assert -1.0 < value < 0.0


def test_story_reward_checks_the_age_column():
    with pytest.raises(ValueError, match="2 ages for 1 completions"):
        story_reward(["p"], ["x"], age=[6, 7])


# --- arithmetic reward -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("42", 42, 1.2),  # correct and just the number
        (" 42.\n", 42, 1.2),  # a trailing full stop is allowed
        ("The answer is 42.", 42, 1.0),  # correct, not just the number
        ("42 apples", 42, 1.0),
        ("41", 42, 0.2),  # wrong but well formatted
        ("I think it is 41.", 42, 0.0),
        ("12 + 30 = 42", 42, 0.0),  # the first number counts
        ("-23", -23, 1.2),
        ("−23", -23, 1.2),  # a Unicode minus sign
        ("It is -23.", -23, 1.0),
        ("23", -23, 0.2),
        ("1,234", 1234, 1.2),
        ("That makes 1,234 in all", 1234, 1.0),
        ("42.0", 42, 1.2),
        ("42.5", 42, 0.2),
        ("forty-two", 42, 0.0),
        ("", 42, 0.0),
    ],
)
def test_arithmetic_score(completion, answer, expected):
    assert arithmetic_score(completion, answer) == pytest.approx(expected)


def test_arithmetic_reward_columns():
    assert arithmetic_reward(["p", "q"], ["7", "8"], answer=[7, None], completion_ids=[[1], [2]]) == [
        pytest.approx(1.2),
        None,
    ]
    with pytest.raises(ValueError, match="needs the rows' 'answer' column"):
        arithmetic_reward(["p"], ["7"])
    with pytest.raises(ValueError, match="1 answers for 2 completions"):
        arithmetic_reward(["p", "q"], ["7", "8"], answer=[7])


# --- both tasks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, completions, columns, expected",
    [
        ("arithmetic", ["12", "no idea"], {"answer": [12, 5]}, [1.2, 0.0]),
        ("kid-stories", ["", "and then the"], {"age": [6, 9]}, [0.0, 0.0]),
    ],
)
def test_rewards_accept_strings_and_message_lists(name, completions, columns, expected):
    (spec,) = get_task(name).reward_funcs
    fn = load_reward_func(spec)
    prompts = [[{"role": "user", "content": "q"}]] * len(completions)
    as_messages = [[{"role": "assistant", "content": c}] for c in completions]
    extra = {"completion_ids": [[1, 2]] * len(completions), "unknown_column": ["x"] * len(completions)}
    from_strings = fn(["q"] * len(completions), completions, **columns, **extra)
    from_messages = fn(prompts, as_messages, **columns, **extra)
    assert from_strings == from_messages == pytest.approx(expected)
    assert all(isinstance(v, float) for v in from_messages)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_rewards_run_through_the_reward_pipeline_on_the_tasks_rows(name):
    task = get_task(name)
    rows = task.rows("test", 8)
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    completions = [[{"role": "assistant", "content": "The end."}] for _ in rows]
    for spec in task.reward_funcs:
        values = call_reward_func(
            load_reward_func(spec), spec, [r["prompt"] for r in rows], completions,
            completion_ids=[[1]] * len(rows), **columns,
        )
        assert values.shape == (len(rows),)


def test_task_settings():
    assert sorted(TASKS) == ["arithmetic", "kid-stories"]
    stories, arithmetic = get_task("kid-stories"), get_task("arithmetic")
    assert stories.name == "kid-stories" and stories.max_new_tokens == 64
    assert stories.reward_funcs == ("alignlab.tasks.kid_stories:story_reward",)
    assert arithmetic.name == "arithmetic" and arithmetic.max_new_tokens == 16
    assert arithmetic.reward_funcs == ("alignlab.tasks.arithmetic:arithmetic_reward",)
    for task in TASKS.values():
        assert task.reward_weights is None
        assert len(task.description) > 100 and "\n" not in task.description


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_deterministic_disjoint_and_sized(name):
    task = get_task(name)
    train, test = task.build(0)
    assert (len(train), len(test)) == (400, 100)
    assert task.build(0) == (train, test)
    assert task.build(1) != (train, test)
    train_prompts, test_prompts = {_content(r) for r in train}, {_content(r) for r in test}
    assert len(train_prompts) == 400 and len(test_prompts) == 100
    assert not train_prompts & test_prompts


def test_kid_stories_rows():
    train, test = get_task("kid-stories").build(0)
    pattern = re.compile(
        r"Write a short story for an? (\d+)-year-old about (.+) who (.+)\. Keep it under 40 words\."
    )
    ideas = set()
    for row in train + test:
        assert set(row) == {"prompt", "age"}
        match = pattern.fullmatch(_content(row))
        assert match and int(match.group(1)) == row["age"] and 4 <= row["age"] <= 10
        assert ("an 8-year-old" in _content(row)) == (row["age"] == 8)
        ideas.add(match.group(2, 3))
    assert len(ideas) == 500  # no story idea repeats, even at another age
    assert {row["age"] for row in test} == set(range(4, 11))


def test_arithmetic_rows_have_the_right_answers():
    train, test = get_task("arithmetic").build(0)
    pattern = re.compile(r"What is (\d+) ([-+×]) (\d+)\? Reply with only the number\.")
    ops = set()
    for row in train + test:
        assert set(row) == {"prompt", "answer"} and isinstance(row["answer"], int)
        a, op, b = pattern.fullmatch(_content(row)).groups()
        a, b = int(a), int(b)
        assert 10 <= b <= 99 and (2 <= a <= 9 if op == "×" else 10 <= a <= 99)
        assert row["answer"] == {"+": a + b, "-": a - b, "×": a * b}[op]
        ops.add(op)
    assert ops == {"+", "-", "×"}
    assert any(row["answer"] < 0 for row in train)


def test_rows():
    task = get_task("arithmetic")
    train, test = task.build(3)
    assert task.rows("test", seed=3) == test
    assert task.rows("train", 10, seed=3) == train[:10]
    assert task.rows("test", 0) == []
    assert task.rows("test", 100) == task.build(0)[1]
    with pytest.raises(UserError, match="no split 'validation'"):
        task.rows("validation")
    with pytest.raises(UserError, match="asked for 101 rows of the test split, which has only 100"):
        task.rows("test", 101)
    with pytest.raises(UserError, match="asked for -1 rows"):
        task.rows("train", -1)


def test_get_task_names_the_available_tasks():
    with pytest.raises(UserError) as info:
        get_task("x")
    assert str(info.value) == "--task: no built-in task 'x'; available: arithmetic, kid-stories"

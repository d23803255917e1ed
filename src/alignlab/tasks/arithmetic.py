"""The ``arithmetic`` task: two-digit sums and differences and one-digit by two-digit products, with an exact
answer reward.

Prompts: ``"What is {a} {op} {b}? Reply with only the number."`` with ``op`` drawn uniformly from ``+``, ``-``
and ``×``: for ``+`` and ``-`` both operands are two-digit (10 to 99; differences may be negative), for ``×``
``a`` is one-digit (2 to 9) and ``b`` two-digit. Rows carry the ``answer`` column (int), which reaches
:func:`arithmetic_reward` as a keyword list.

Reward (:func:`arithmetic_reward`), per completion: ``1.0`` if the first number in it equals the answer (a
leading minus sign and thousands commas are read: ``-12``, ``1,234``), else 0; plus ``0.2`` if the stripped
completion is nothing but a number (optionally with a trailing full stop). Values: 1.2, 1.0, 0.2 or 0.
"""

from __future__ import annotations

import random
import re

MAX_NEW_TOKENS = 16
TRAIN_SIZE = 400
TEST_SIZE = 100

CORRECT_REWARD = 1.0
FORMAT_BONUS = 0.2

DESCRIPTION = (
    "arithmetic: answer 'What is a op b?' with only the number, for sums and differences of two-digit numbers "
    "(differences may be negative) and products of a one-digit by a two-digit number. The rule-based reward is "
    "1 when the first number in the reply equals the answer (a minus sign and thousands commas are read) plus "
    "0.2 when the reply is just the number, so 1.2 is the best score; the 16-token budget leaves no room for "
    "working. It measures exact answers and following a format instruction."
)

PROMPT = "What is {a} {op} {b}? Reply with only the number."
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}

_NUMBER = r"[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_FIRST_NUMBER = re.compile(rf"(?<![\d.,]){_NUMBER}")
_JUST_A_NUMBER = re.compile(rf"{_NUMBER}\.?")


def _question(rng: random.Random) -> tuple[int, str, int]:
    op = rng.choice(list(OPERATIONS))
    a = rng.randint(2, 9) if op == "×" else rng.randint(10, 99)
    return a, op, rng.randint(10, 99)


def build(seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, test)``: 400 and 100 rows ``{"prompt": [{"role": "user", "content": ...}], "answer": int}``.

    Deterministic for ``seed`` (``random.Random(seed)``); every question is distinct, so no prompt is in both
    splits.
    """
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < TRAIN_SIZE + TEST_SIZE:
        a, op, b = _question(rng)
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        content = PROMPT.format(a=a, op=op, b=b)
        rows.append({"prompt": [{"role": "user", "content": content}], "answer": OPERATIONS[op](a, b)})
    return rows[:TRAIN_SIZE], rows[TRAIN_SIZE:]


def first_number(text: str) -> float | None:
    """The first number in ``text`` (a leading ``-`` or ``−``, thousands commas and a decimal part are read:
    ``"-1,234.0"`` is -1234.0), or None when it has none. Digits glued to a preceding digit, point or comma do
    not start a number."""
    match = _FIRST_NUMBER.search(text)
    if match is None:
        return None
    return float(match.group().replace("−", "-").replace(",", ""))


def is_just_a_number(text: str) -> bool:
    """Whether the stripped text is a single number, optionally with a trailing full stop (``"42"``,
    ``"-7."``, ``"1,234"``)."""
    return _JUST_A_NUMBER.fullmatch(text.strip()) is not None


def arithmetic_score(text: str, answer: int) -> float:
    """``1.0 * (first number == answer) + 0.2 * (text is just a number)``: 1.2, 1.0, 0.2 or 0. A number with
    a fractional part counts only when it equals the answer (``"42.0"`` is 42)."""
    value = first_number(text)
    correct = value is not None and value == answer
    return CORRECT_REWARD * correct + FORMAT_BONUS * is_just_a_number(text)


def _completion_text(completion) -> str:
    if isinstance(completion, list):
        return " ".join(str(m.get("content", "")) for m in completion)
    return str(completion)


def arithmetic_reward(prompts, completions, answer=None, **kwargs) -> list[float | None]:
    """TRL reward function for the arithmetic task: :func:`arithmetic_score` of every completion.

    Args:
        prompts: unused (strings or message lists).
        completions: strings, or message lists ``[{"role": "assistant", "content": text}]``.
        answer: the rows' ``answer`` column, one int per completion; a None entry gives None ("does not
            apply", counted as 0 in the weighted sum).
        **kwargs: ``completion_ids`` and the other columns, ignored.

    Returns:
        One float (or None) per completion.

    Raises:
        ValueError: no ``answer`` column, or one of a different length than ``completions``.
    """
    if answer is None:
        raise ValueError("arithmetic_reward needs the rows' 'answer' column (the arithmetic task's prompts have it)")
    answers = list(answer)
    if len(answers) != len(completions):
        raise ValueError(f"arithmetic_reward: {len(answers)} answers for {len(completions)} completions")
    return [
        None if a is None else arithmetic_score(_completion_text(c), int(a)) for c, a in zip(completions, answers)
    ]

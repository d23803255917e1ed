"""Built-in tasks: a prompt set with a train and a test split, and the rule-based reward that scores it.

A task bundles everything ``alignlab evaluate`` / ``alignlab compare`` need to train and judge models on the
same footing without user files: deterministic seeded splits with disjoint prompts, the reward functions (as
``--reward_funcs`` specs, TRL's signature ``fn(prompts, completions, **kwargs) -> list[float]``) and the
completion budget the reward is designed for.

Rows are conversational, ``{"prompt": [{"role": "user", "content": ...}], <extra columns>}``; the extra
columns (``age``, ``answer``) reach the reward functions as keyword lists, one entry per completion.

Tasks:

* ``kid-stories`` (:mod:`alignlab.tasks.kid_stories`): very short stories for a child of a given age, scored
  on readability for the age, length, a finished last sentence and no repetition;
* ``arithmetic`` (:mod:`alignlab.tasks.arithmetic`): two-digit sums and differences and one-digit by
  two-digit products, scored on the exact answer and a bare-number format.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignlab.errors import UserError
from alignlab.registry import Registry
from alignlab.tasks import arithmetic, kid_stories

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Task:
    """A built-in task.

    Attributes:
        name: the ``--task`` name, e.g. ``"kid-stories"``.
        description: one paragraph for humans (shown in reports).
        reward_funcs: ``--reward_funcs`` specs, ``"module:function"``.
        reward_weights: one weight per reward function; ``None`` means all 1.
        max_new_tokens: the completion budget (tokens) the reward is designed for.
        build: ``seed -> (train_rows, test_rows)``, deterministic for a seed, no prompt in both splits.
    """

    name: str
    description: str
    reward_funcs: tuple[str, ...]
    reward_weights: tuple[float, ...] | None
    max_new_tokens: int
    build: Callable[[int], tuple[list[dict], list[dict]]]

    def rows(self, split: str, n: int | None = None, seed: int = 0) -> list[dict]:
        """The first ``n`` rows of the ``"train"`` or ``"test"`` split built with ``seed`` (all when ``n`` is
        None). The rows are fresh dicts on every call: callers may modify them.

        Raises:
            UserError: a split other than train/test, a negative ``n``, or ``n`` larger than the split.
        """
        if split not in SPLITS:
            raise UserError(f"task {self.name!r}: no split {split!r}; the splits are train and test")
        train, test = self.build(seed)
        rows = train if split == "train" else test
        if n is None:
            return rows
        if n < 0:
            raise UserError(f"task {self.name!r}: asked for {n} rows of the {split} split; give 0 or more")
        if n > len(rows):
            raise UserError(
                f"task {self.name!r}: asked for {n} rows of the {split} split, which has only {len(rows)}"
            )
        return rows[:n]


TASKS: Registry[Task] = Registry("task", error=UserError, sort_choices=True,
                                message="--task: no built-in task {name}; available: {choices}")
"""``--task`` name -> :class:`Task`."""
for _name, _module, _reward in (("arithmetic", arithmetic, "arithmetic_reward"),
                                ("kid-stories", kid_stories, "story_reward")):
    TASKS.add(_name, Task(name=_name, description=_module.DESCRIPTION,
                          reward_funcs=(f"{_module.__name__}:{_reward}",), reward_weights=None,
                          max_new_tokens=_module.MAX_NEW_TOKENS, build=_module.build))


def get_task(name: str) -> Task:
    """The built-in task called ``name``.

    Raises:
        UserError: no built-in task has that name (the message lists the available ones).
    """
    return TASKS.get(name)


@dataclass
class PromptSet:
    """Prompt rows with the reward that goes with them."""

    rows: list[tuple[str, dict[str, Any]]]
    """``(location, row)`` pairs, as :func:`alignlab.data.io.read_rows` gives them."""
    reward_funcs: list[str] | None
    reward_weights: list[float] | None
    max_new_tokens: int
    description: str


def resolve_task(task: str, split: str, *, reward_funcs: list[str] | None = None,
                 reward_weights: list[float] | None = None, seed: int = 0) -> PromptSet:
    """The ``split`` ("train" or "test") rows of a built-in task with its reward functions (the user's
    ``reward_funcs`` win when given), or, when ``task`` is a file, all its rows with the user's reward functions.

    Raises:
        UserError: neither a built-in task nor an existing file, or a file without ``reward_funcs`` /
            reward model.
    """
    if task in TASKS:
        t = get_task(task)
        rows = [(f"task {task}, {split} split, row {i + 1}", row) for i, row in enumerate(t.rows(split, seed=seed))]
        return PromptSet(rows, list(reward_funcs or t.reward_funcs),
                         list(reward_weights) if reward_funcs else (list(t.reward_weights) if t.reward_weights else None),
                         t.max_new_tokens, t.description)
    from alignlab.data.io import read_rows

    if not os.path.exists(os.path.expanduser(task)):
        raise UserError(f"--task: {task!r} is neither a built-in task ({', '.join(sorted(TASKS))}) nor a file")
    return PromptSet(read_rows(os.path.expanduser(task)), reward_funcs, reward_weights, 64,
                     f"prompts from {task}")

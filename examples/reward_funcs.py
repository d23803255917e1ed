"""Example reward functions for ``alignlab ppo`` (and later GRPO / Online DPO), TRL's signature:
``fn(prompts, completions, **kwargs) -> list[float]``. Use with ``--reward_funcs examples/reward_funcs.py:NAME``.
"""

from __future__ import annotations

TARGET_WORDS = 20


def _text(completion) -> str:
    """The completion's text: a string, or the content of a ``[{"role": "assistant", ...}]`` list."""
    if isinstance(completion, list):
        return " ".join(m.get("content", "") for m in completion)
    return completion


def target_length(prompts, completions, **kwargs) -> list[float]:
    """1 for an answer of exactly TARGET_WORDS words, falling linearly to 0 at 0 or 2 * TARGET_WORDS words and
    below 0 beyond (-1 at 3 * TARGET_WORDS): rewards concise answers of a target length."""
    return [1.0 - abs(len(_text(c).split()) - TARGET_WORDS) / TARGET_WORDS for c in completions]


def ends_with_period(prompts, completions, **kwargs) -> list[float]:
    """1 if the answer ends with a full stop, else 0."""
    return [1.0 if _text(c).rstrip().endswith(".") else 0.0 for c in completions]

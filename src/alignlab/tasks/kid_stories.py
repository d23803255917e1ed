"""The ``kid-stories`` task: very short stories for a child of a given age, with a rule-based reward.

Prompts ask for a story for a ``{age}``-year-old (4 to 10) about a character with a problem in a place, built
from the lists below (30 characters x 22 problems x 16 places = 10,560 story ideas; each row draws a distinct
idea and an age). Rows carry the ``age`` column, which reaches :func:`story_reward` as a keyword list.

Reward (:func:`story_reward`), per completion with text ``t`` for a child of age ``a``::

    reward = 0.4 * readability_score(t, a) + 0.3 * length_score(t) + 0.3 * ending_score(t)
             - repetition_fraction(t)

* ``readability_score``: ``max(0, 1 - |FK(t) - max(0, a - 5)| / 4)``, ``FK`` the Flesch-Kincaid grade level
  (Kincaid et al. 1975), 0 for a text under 10 words;
* ``length_score``: 1 for 20 to 45 words, falling linearly to 0 at 10 words and at 75 words;
* ``ending_score``: 1 if the text ends with ``.``, ``!`` or ``?`` (optionally followed by closing quotes or a
  bracket), else 0;
* ``repetition_fraction``: the fraction of the text's word trigrams that repeat an earlier trigram.

The reward lies in ``(-1, 1]``: 1 for a finished, non-repetitive story of 20 to 45 words at the child's
reading level. The task's completion budget is 64 tokens (a 45-word story with its punctuation takes about 55
tokens of a BPE vocabulary such as SmolLM2's), so a story must end within budget to earn the ending term.
"""

from __future__ import annotations

import random
import re

import textstat

MAX_NEW_TOKENS = 64
TRAIN_SIZE = 400
TEST_SIZE = 100

AGES = range(4, 11)
DEFAULT_AGE = 6

LENGTH_WINDOW = (20, 45)
"""Words for a full length score (both ends included)."""
LENGTH_FALLOFF = (10, 30)
"""Words below / above the window at which the length score has fallen linearly to 0."""
MIN_READABILITY_WORDS = 10
"""Fewer words than this score 0 on readability: the grade of a few words is noise, and a one-word answer
must not collect readability credit."""
READABILITY_TOLERANCE = 4.0
"""Grade levels away from the target at which the readability score reaches 0."""
WEIGHTS = {"readability": 0.4, "length": 0.3, "ending": 0.3, "repetition": 1.0}

DESCRIPTION = (
    "kid-stories: write a very short story (under 40 words) for a child aged 4 to 10 about a character with a "
    "problem in a place, e.g. a shy hedgehog who lost a red balloon in a snowy forest. The rule-based reward "
    "is 0.4 x readability (Flesch-Kincaid grade within 4 levels of the target grade, age - 5) + 0.3 x length "
    "(full for 20 to 45 words, zero below 10 or above 75) + 0.3 x a finished last sentence - the fraction of "
    "repeated word trigrams; it lies in (-1, 1] and a completion cut off by the 64-token budget loses the "
    "ending term. It rewards concise, complete, age-appropriate stories without loops."
)

CHARACTERS = (
    "a shy hedgehog", "a little robot", "a sleepy dragon", "a curious kitten", "a brave mouse",
    "a grumpy bear cub", "a tiny turtle", "a clumsy giraffe", "a friendly ghost", "a young astronaut",
    "a lonely snowman", "a silly penguin", "a baby owl", "a helpful rabbit", "a nervous puppy",
    "a small dinosaur", "a cheerful frog", "a forgetful wizard", "a girl named Mia", "a boy named Leo",
    "a busy squirrel", "a gentle elephant", "a lost duckling", "a proud rooster", "a quiet fox",
    "a playful dolphin", "a tired bee", "a kind pirate", "a tiny fairy", "an old tortoise",
)
PROBLEMS = (
    "lost a red balloon", "was afraid of the dark", "could not find the way home",
    "wanted to make a new friend", "broke a favourite toy", "was too small to reach the apples",
    "forgot a friend's birthday", "could not fall asleep", "was scared of thunder",
    "had to share the last cookie", "wanted to learn to swim", "lost a shiny key", "got stuck in the mud",
    "was late for the big race", "could not whistle", "found a mysterious egg", "missed the school bus",
    "had a wobbly tooth", "wanted to fly like a bird", "spilled paint everywhere",
    "heard a strange noise at night", "could not find a lost sock",
)
PLACES = (
    "in a snowy forest", "at the seaside", "on a busy farm", "in a big city", "at school",
    "in a quiet library", "on a tall mountain", "in a deep cave", "on the moon", "in a sunny garden",
    "at the zoo", "under the sea", "in a hot desert", "at a birthday party", "in a rainy town",
    "on a pirate ship",
)
PROMPT = "Write a short story for {article} {age}-year-old about {character} who {problem} {place}. Keep it under 40 words."

_WORD = re.compile(r"[a-z0-9]+(?:['’][a-z0-9]+)*")
_ENDING = re.compile(r"[.!?][\"'”’)\]]*$")


def prompt_text(age: int, character: str, problem: str, place: str) -> str:
    """The user message asking for one story (``"an 8-year-old"``, ``"a 6-year-old"``)."""
    article = "an" if str(age).startswith("8") or age in (11, 18) else "a"
    return PROMPT.format(article=article, age=age, character=character, problem=problem, place=place)


def build(seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, test)``: 400 and 100 rows ``{"prompt": [{"role": "user", "content": ...}], "age": int}``.

    Deterministic for ``seed`` (``random.Random(seed)``). Every row has a distinct (character, problem,
    place) idea, so no prompt text, and no story idea at another age, is in both splits.
    """
    rng = random.Random(seed)
    n_ideas = len(CHARACTERS) * len(PROBLEMS) * len(PLACES)
    rows = []
    for index in rng.sample(range(n_ideas), TRAIN_SIZE + TEST_SIZE):
        index, place = divmod(index, len(PLACES))
        character, problem = divmod(index, len(PROBLEMS))
        age = rng.choice(AGES)
        content = prompt_text(age, CHARACTERS[character], PROBLEMS[problem], PLACES[place])
        rows.append({"prompt": [{"role": "user", "content": content}], "age": age})
    return rows[:TRAIN_SIZE], rows[TRAIN_SIZE:]


def words(text: str) -> list[str]:
    """The text's words, lowercased, punctuation stripped: runs of letters and digits, with inner apostrophes
    (``"don't"`` is one word, ``"well-known"`` two)."""
    return _WORD.findall(text.lower())


def readability_score(text: str, age: int | None) -> float:
    """How well the text's reading level fits a child of ``age`` years, in [0, 1].

    ``max(0, 1 - |grade - target| / 4)`` with ``grade`` the Flesch-Kincaid grade level of the text
    (Kincaid, Fishburne, Rogers & Chissom 1975: ``0.39 * words/sentences + 11.8 * syllables/words - 15.59``,
    computed by ``textstat.flesch_kincaid_grade``) and ``target = max(0, age - 5)``: US school grade 1 starts
    at about age 6, so a 6-year-old reads at grade 1 and children of 5 or younger at grade 0 or below. The
    score reaches 0 four grade levels away. ``age`` None means 6. A text under 10 words scores 0: the grade
    of a few words is noise.
    """
    if len(words(text)) < MIN_READABILITY_WORDS:
        return 0.0
    target = max(0, (DEFAULT_AGE if age is None else int(age)) - 5)
    grade = float(textstat.flesch_kincaid_grade(text))
    return max(0.0, 1.0 - abs(grade - target) / READABILITY_TOLERANCE)


def length_score(text: str) -> float:
    """1 for 20 to 45 words (:func:`words`), falling linearly to 0 at 10 words and at 75 words, in [0, 1].

    The window suits a story of three to five short sentences, which fits in the task's 64-token budget with
    room to finish the last sentence; the longer falloff above it lets a budget larger than the task's judge
    slightly long stories gently. An empty text scores 0.
    """
    n = len(words(text))
    (low, high), (below, above) = LENGTH_WINDOW, LENGTH_FALLOFF
    if n < low:
        return max(0.0, (n - (low - below)) / below)
    if n > high:
        return max(0.0, ((high + above) - n) / above)
    return 1.0


def ending_score(text: str) -> float:
    """1 if the stripped text ends with ``.``, ``!`` or ``?``, optionally followed by closing quotes or
    brackets (``."`` ``!”`` ``?)``), else 0: a story cut off mid-sentence by the token budget has no ending."""
    return 1.0 if _ENDING.search(text.strip()) else 0.0


def repetition_fraction(text: str) -> float:
    """The fraction of the text's word trigrams (:func:`words`, lowercased, punctuation stripped) that repeat
    an earlier trigram of the text, in [0, 1); 0 for fewer than three words. Degenerate loops ("and then and
    then and then") approach 1; ordinary prose repeats almost none."""
    w = words(text)
    trigrams = list(zip(w, w[1:], w[2:]))
    if not trigrams:
        return 0.0
    seen, repeats = set(), 0
    for trigram in trigrams:
        if trigram in seen:
            repeats += 1
        seen.add(trigram)
    return repeats / len(trigrams)


def _completion_text(completion) -> str:
    """A completion's text: a string, or the contents of a message list ``[{"role": "assistant", ...}]``."""
    if isinstance(completion, list):
        return " ".join(str(m.get("content", "")) for m in completion)
    return str(completion)


def story_score(text: str, age: int | None = None) -> float:
    """The kid-stories reward of one text for a child of ``age`` (None: 6), in (-1, 1]:
    ``0.4 * readability + 0.3 * length + 0.3 * ending - repetition`` (see the module docstring)."""
    return (
        WEIGHTS["readability"] * readability_score(text, age)
        + WEIGHTS["length"] * length_score(text)
        + WEIGHTS["ending"] * ending_score(text)
        - WEIGHTS["repetition"] * repetition_fraction(text)
    )


def story_reward(prompts, completions, age=None, **kwargs) -> list[float]:
    """TRL reward function for the kid-stories task: :func:`story_score` of every completion.

    Args:
        prompts: unused (strings or message lists).
        completions: strings, or message lists ``[{"role": "assistant", "content": text}]``.
        age: the rows' ``age`` column, one int per completion; None (no column) or a None entry means 6.
        **kwargs: ``completion_ids`` and the other columns, ignored.

    Returns:
        One float per completion, in (-1, 1].

    Raises:
        ValueError: ``age`` has a different length than ``completions``.
    """
    ages = [None] * len(completions) if age is None else list(age)
    if len(ages) != len(completions):
        raise ValueError(f"story_reward: {len(ages)} ages for {len(completions)} completions")
    return [story_score(_completion_text(c), a) for c, a in zip(completions, ages)]

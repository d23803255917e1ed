#!/usr/bin/env python3
"""Build the ``builtin:concise`` preference dataset shipped with alignlab.

The dataset teaches one clear preference: a short, correct, direct answer is
better than a rambling one, a wrong one, or one that is both.

Everything here is written for the project: the fact tables, the answer
templates and the filler sentences.  Numeric answers (arithmetic, unit
conversions, letter counts, calendar questions, Roman numerals, ...) are
computed by Python rather than typed in by hand.

The script uses only the standard library and a seeded ``random.Random``, so
running it twice produces byte-identical output.

Usage (from the repository root)::

    python scripts/build_builtin_concise.py
    python scripts/build_builtin_concise.py --out /tmp/concise.jsonl --seed 1234
"""

from __future__ import annotations

import argparse
import calendar
import json
import statistics
import string
from collections import Counter
from fractions import Fraction
from pathlib import Path
from random import Random

SEED = 20240613
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "alignlab" / "data" / "builtin" / "concise.jsonl"

KINDS = ("rambling", "wrong", "rambling_wrong")
CHOSEN_MAX_WORDS = 25
RAMBLE_MIN_WORDS = 50
RAMBLE_MAX_WORDS = 120

NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "eleven", "twelve",
]
ORDINALS = [
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh",
    "eighth", "ninth", "tenth", "eleventh", "twelfth",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = list(calendar.month_name)[1:]


def words(text: str) -> int:
    return len(text.split())


def times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def fmt_num(x) -> str:
    """Format an int or an exact Fraction without float noise."""
    if isinstance(x, Fraction):
        if x.denominator == 1:
            x = x.numerator
        else:
            # only used for values with a short exact decimal form (e.g. 98.6)
            as_float = float(x)
            text = f"{as_float:.1f}"
            assert Fraction(text) == x, (x, text)
            return text
    return f"{x:,}" if abs(x) >= 1000 else str(x)


def roman(n: int) -> str:
    table = [
        (1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
        (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"),
    ]
    out = []
    for value, sym in table:
        while n >= value:
            out.append(sym)
            n -= value
    return "".join(out)


def is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def smallest_factor(n: int) -> int:
    return next(d for d in range(2, n + 1) if n % d == 0)


# ---------------------------------------------------------------------------
# Filler material for the rambling answers.  Every sentence here is either an
# opinion, a pleasantry or a true, very general statement, so a "rambling but
# correct" answer really is correct -- it is only padded.
# ---------------------------------------------------------------------------

OPENERS = [
    "Great question!",
    "Oh, what a fun question to think about.",
    "Well, let me think about this for a moment.",
    "That is a really interesting question, and I am glad you asked it.",
    "Hmm, okay, so let me see.",
    "Thanks so much for asking me this!",
    "Alright, this is something a lot of people wonder about.",
    "Sure thing, I would be happy to help with that.",
    "Okay, so, first of all, I just want to say that I love this kind of question.",
    "Ah, good one.",
    "What a wonderful thing to be curious about!",
    "Oh, I know this one, or at least I think I do.",
    "Well, well, well, this is a classic.",
    "Absolutely, let me help you out with this.",
    "So, this is a question I get asked quite often.",
    "Ooh, I like this one.",
]

RESTATES = [
    'You asked, "{q}"',
    'So the question is: "{q}"',
    'Let me repeat the question to make sure I have it right: "{q}"',
    'Your question was "{q}", and that is a very reasonable thing to ask.',
    'If I understand you correctly, you want to know this: "{q}"',
    'Okay, so "{q}" is what we are looking at here.',
    'Just to be clear, the question is "{q}"',
    'Let me restate that in my own head first: "{q}"',
]

HEDGES = [
    "Now, I am not completely sure, but I will do my best.",
    "I could be wrong, so you might want to double-check this somewhere else.",
    "Please keep in mind that I am just an AI and I can make mistakes.",
    "I think I know the answer, although I am not a hundred percent certain.",
    "As far as I can remember, this is how it goes.",
    "Take this with a grain of salt, but here is what I believe.",
    "I don't want to say anything wrong, so let me be careful here.",
    "If I remember correctly, the answer is something like this.",
    "To the best of my knowledge, this should be right.",
    "It is possible that I am mistaken, but I will give it a try.",
]

PADDING = [
    "Let me think about how best to explain this.",
    "There are a few different ways to think about it.",
    "This is actually something a lot of people get curious about.",
    "I want to make sure I give you a good answer here.",
    "Before I answer, I should say that it is always good to ask questions.",
    "I will try to keep this simple, but there is a little bit to say.",
    "It is one of those things that is surprisingly easy to forget.",
    "Honestly, I find this kind of thing really interesting.",
    "Let me just gather my thoughts for a second.",
    "There is no such thing as a silly question, after all.",
    "Learning little facts like this is a great way to keep your mind active.",
    "It is always a good idea to check things in a book or with a teacher, too.",
    "This might seem simple, but it is worth thinking about carefully.",
    "I remember that people often mix this up, so it is good you asked.",
]

TANGENTS = {
    "math": [
        "Numbers like these show up all the time in everyday life, like when you go shopping or cook.",
        "Some people find it helpful to check their work by doing the calculation a second way.",
        "Mental math gets easier with practice, so it is good to try problems like this often.",
        "People have been studying numbers for thousands of years.",
        "It can also help to write the numbers down on a piece of paper.",
    ],
    "units": [
        "Converting between units is really handy in the kitchen, in science class and when travelling.",
        "Different countries sometimes use different units, which can be a little confusing.",
        "It helps to remember a few basic conversions so you do not have to look them up every time.",
        "Measuring things carefully is important in lots of jobs, from baking to building.",
    ],
    "geography": [
        "Maps and atlases are a great way to learn more about places like this.",
        "Every country has its own history, food and traditions, which is pretty amazing when you think about it.",
        "Lots of people enjoy learning about countries and cities before they travel.",
        "Geography is a big subject, and there is always more to discover.",
    ],
    "language": [
        "English has borrowed words from many other languages, which is one reason it can be confusing.",
        "Reading a lot is one of the best ways to get better with words.",
        "A dictionary is always a good place to check things like this.",
        "Words can be tricky, and even adults mix them up sometimes.",
        "Spelling and grammar rules in English have quite a few exceptions.",
    ],
    "science": [
        "Science is all about asking questions and testing ideas.",
        "Scientists have learned a lot about this over many years of careful study.",
        "The natural world is full of interesting things to learn about.",
        "If you enjoy facts like this, a science museum can be a fun place to visit.",
    ],
    "animals": [
        "Animals are amazing, and every species has its own special way of living.",
        "Many people love watching nature documentaries to learn about animals.",
        "Zoos, farms and nature parks are good places to see animals up close.",
        "There are so many different kinds of animals in the world.",
    ],
    "time": [
        "Calendars have been used by people for a very long time to keep track of the days.",
        "Keeping track of dates can be surprisingly tricky sometimes.",
        "Planners and calendars make it much easier to remember what comes next.",
        "Some people like to say the days or months out loud in order to check.",
    ],
    "colors": [
        "Colors are everywhere around us, and many people feel they can even affect our mood.",
        "Artists think about colors very carefully when they paint.",
        "Different people sometimes describe the same color in slightly different ways.",
    ],
    "howto": [
        "Everyone has their own way of doing things, and that is perfectly okay.",
        "It might take a few tries to get it just right, and that is normal.",
        "Little everyday skills like this can make life a bit easier.",
        "There are also lots of videos online that show how to do this kind of thing.",
    ],
    "general": [
        "History and culture are full of fascinating stories.",
        "There is always more to learn, no matter how much you already know.",
        "Trivia questions like this can be fun to share with friends.",
    ],
}

LEADINS = [
    "",
    "",
    "Here is the answer: ",
    "So, the short version is this: ",
    "Putting it all together: ",
    "Anyway, here is what I can tell you: ",
    "Okay, so here goes: ",
    "And now, the answer: ",
]

SUMMARIES = [
    "So, just to repeat myself: {a}",
    "In other words, once more: {a}",
    "To sum it all up: {a}",
    "So yes, like I said: {a}",
    "Again, the main point is this: {a}",
]

CLOSERS = [
    "I hope this helps!",
    "Let me know if you have any other questions.",
    "Feel free to ask me anything else!",
    "Anyway, that is my answer, for what it is worth.",
    "Hopefully that clears things up a little.",
    "Have a wonderful day!",
    "I hope that was useful to you in some way.",
    "Thanks again for such a great question!",
    "If you need more details, just ask and I will explain further.",
    "Happy learning!",
    "And that is pretty much everything I can think of to say about it.",
    "Good luck with whatever you are working on!",
]

# Slot layouts for the rambling answers; "answer" is always present.
LAYOUTS = [
    ["opener", "restate", "hedge", "tangent", "answer", "closer"],
    ["opener", "tangent", "padding", "answer", "summary", "closer"],
    ["restate", "padding", "hedge", "answer", "tangent", "closer"],
    ["opener", "restate", "tangent", "padding", "answer", "summary"],
    ["hedge", "opener", "restate", "answer", "tangent", "summary", "closer"],
    ["opener", "padding", "restate", "tangent", "answer", "closer"],
    ["restate", "opener", "hedge", "answer", "tangent", "summary", "closer"],
]


def ramble(rng: Random, question: str, answer: str, topic: str) -> str:
    """Wrap ``answer`` in filler until it is 50-120 words long."""
    topic_pool = list(TANGENTS[topic])
    generic_pool = list(PADDING)
    rng.shuffle(topic_pool)
    rng.shuffle(generic_pool)
    used: set[str] = set()

    def take(pool: list[str]) -> str:
        for s in pool:
            if s not in used:
                used.add(s)
                return s
        raise RuntimeError("filler pool exhausted")

    def extra() -> str:
        # extra padding alternates between topical tangents and generic filler
        if rng.random() < 0.5 and any(s not in used for s in topic_pool):
            return take(topic_pool)
        return take(generic_pool)

    parts: list[tuple[str, str]] = []
    for slot in rng.choice(LAYOUTS):
        if slot == "opener":
            parts.append((slot, rng.choice(OPENERS)))
        elif slot == "restate":
            parts.append((slot, rng.choice(RESTATES).format(q=question)))
        elif slot == "hedge":
            parts.append((slot, rng.choice(HEDGES)))
        elif slot == "tangent":
            parts.append((slot, take(topic_pool)))
        elif slot == "padding":
            parts.append((slot, take(generic_pool)))
        elif slot == "answer":
            parts.append((slot, rng.choice(LEADINS) + answer))
        elif slot == "summary":
            parts.append((slot, rng.choice(SUMMARIES).format(a=answer)))
        elif slot == "closer":
            parts.append((slot, rng.choice(CLOSERS)))

    def total() -> int:
        return sum(words(t) for _, t in parts)

    target = rng.randint(58, 100)
    while total() < target:
        idx = next(i for i, (slot, _) in enumerate(parts) if slot == "answer")
        where = rng.choice([idx, idx + 1, len(parts)])  # before/after answer or at the end
        if where == len(parts) and parts[-1][0] == "closer":
            where -= 1
        parts.insert(where, ("extra", extra()))
    # trim optional pieces if it got too long (long restated questions)
    for slot in ("extra", "summary", "padding", "tangent", "hedge"):
        while total() > RAMBLE_MAX_WORDS and any(s == slot for s, _ in parts):
            i = max(i for i, (s, _) in enumerate(parts) if s == slot)
            del parts[i]
    text = " ".join(t for _, t in parts)
    n = words(text)
    assert RAMBLE_MIN_WORDS <= n <= RAMBLE_MAX_WORDS, (n, text)
    return text


# ---------------------------------------------------------------------------
# Fact tables and generators.  Each generator calls ``add(topic, prompt,
# chosen, wrong)`` where ``wrong`` is a concise answer in the same style as
# ``chosen`` but factually incorrect.
# ---------------------------------------------------------------------------


class Builder:
    def __init__(self, rng: Random):
        self.rng = rng
        self.items: list[dict] = []
        self.prompts: set[str] = set()

    def add(self, topic: str, prompt: str, chosen: str, wrong: str, group: str,
            may_repeat: bool = False) -> bool:
        """Record one fact; returns False for a repeated prompt when ``may_repeat``."""
        if prompt in self.prompts:
            if may_repeat:  # randomly generated questions just draw again
                return False
            raise ValueError(f"duplicate prompt: {prompt}")
        assert chosen != wrong, (prompt, chosen)
        assert words(chosen) <= CHOSEN_MAX_WORDS, chosen
        assert words(wrong) <= CHOSEN_MAX_WORDS + 5, wrong
        assert topic in TANGENTS, topic
        chosen, wrong = tidy(chosen), tidy(wrong)
        self.prompts.add(prompt)
        self.items.append(
            {"topic": topic, "group": group, "prompt": prompt, "chosen": chosen, "wrong": wrong}
        )
        return True

    def pick(self, options):
        return self.rng.choice(options)

    def other(self, options, correct):
        """A random element of ``options`` that differs from ``correct``."""
        choices = [o for o in options if o != correct]
        return self.rng.choice(choices)

    def near(self, correct: int, deltas=(-10, -2, -1, 1, 2, 10), minimum: int = 0) -> int:
        choices = [correct + d for d in deltas if correct + d >= minimum and d != 0]
        return self.rng.choice(choices)


def gen_arithmetic(b: Builder, per_op: int = 15) -> None:
    rng = b.rng
    ops = ["add", "sub", "mul", "div"]
    for op in ops:
        made = 0
        while made < per_op:
            if op == "add":
                x, y = rng.randint(11, 89), rng.randint(11, 89)
                res = x + y
                prompt = b.pick([f"What is {x} + {y}?", f"What is {x} plus {y}?", f"Add {x} and {y}."])
                fmt = b.pick(["{x} + {y} = {r}.", "{x} plus {y} is {r}.", "The answer is {r}."])
            elif op == "sub":
                x = rng.randint(30, 99)
                y = rng.randint(5, x - 1)
                res = x - y
                prompt = b.pick([f"What is {x} - {y}?", f"What is {x} minus {y}?", f"Subtract {y} from {x}."])
                fmt = b.pick(["{x} - {y} = {r}.", "{x} minus {y} is {r}.", "The answer is {r}."])
            elif op == "mul":
                if rng.random() < 0.6:
                    x, y = rng.randint(2, 12), rng.randint(2, 12)
                else:
                    x, y = rng.randint(11, 30), rng.randint(2, 9)
                res = x * y
                prompt = b.pick([f"What is {x} times {y}?", f"What is {x} x {y}?", f"Multiply {x} by {y}."])
                fmt = b.pick(["{x} times {y} is {r}.", "{x} x {y} = {r}.", "The answer is {r}."])
            else:
                y, res = rng.randint(2, 12), rng.randint(2, 15)
                x = y * res
                prompt = b.pick([f"What is {x} divided by {y}?", f"What is {x} / {y}?", f"Divide {x} by {y}."])
                fmt = b.pick(["{x} divided by {y} is {r}.", "{x} / {y} = {r}.", "The answer is {r}."])
            wrong_res = b.near(res)
            chosen = fmt.format(x=x, y=y, r=res)
            wrong = fmt.format(x=x, y=y, r=wrong_res)
            if b.add("math", prompt, chosen, wrong, f"arithmetic_{op}", may_repeat=True):
                made += 1


def gen_number_facts(b: Builder) -> None:
    rng = b.rng
    # even / odd
    for n in rng.sample(range(11, 200), 8):
        parity = "even" if n % 2 == 0 else "odd"
        other = "odd" if parity == "even" else "even"
        b.add("math", f"Is {n} even or odd?", f"{n} is {parity}.", f"{n} is {other}.", "even_odd")
    # larger of two (digit swaps make it a little tricky)
    for _ in range(6):
        while True:
            a, c = rng.randint(1, 9), rng.randint(1, 9)
            if a != c:
                break
        x, y = 10 * a + c, 10 * c + a
        big, small = max(x, y), min(x, y)
        b.add("math", f"Which is larger, {x} or {y}?", f"{big} is larger than {small}.",
              f"{small} is larger than {big}.", "larger", may_repeat=True)
    # half / double
    for n in rng.sample(range(12, 98, 2), 6):
        b.add("math", f"What is half of {n}?", f"Half of {n} is {n // 2}.",
              f"Half of {n} is {b.near(n // 2, (-2, -1, 1, 2))}.", "half")
    for n in rng.sample(range(13, 60), 6):
        b.add("math", f"What is double {n}?", f"Double {n} is {2 * n}.",
              f"Double {n} is {b.near(2 * n, (-2, -1, 1, 2, 10))}.", "double")
    # squares and square roots
    for n in rng.sample(range(2, 16), 6):
        b.add("math", f"What is {n} squared?", f"{n} squared is {n * n}.",
              f"{n} squared is {b.other([2 * n, n * n + n, n * n - 1, n * n + 1], n * n)}.", "square")
    for n in rng.sample(range(2, 13), 6):
        b.add("math", f"What is the square root of {n * n}?", f"The square root of {n * n} is {n}.",
              f"The square root of {n * n} is {b.other([n + 1, n - 1, n * 2, (n * n) // 2], n)}.", "sqrt")
    # percentages with exact integer answers
    for _ in range(6):
        pct = b.pick([10, 20, 25, 50])
        base = rng.randint(2, 20) * 20
        res = base * pct // 100
        assert res * 100 == base * pct
        wrong = b.other([base * pct // 10, res + 5, res * 2, base - res], res)
        b.add("math", f"What is {pct}% of {base}?", f"{pct}% of {base} is {res}.",
              f"{pct}% of {base} is {wrong}.", "percent", may_repeat=True)
    # rounding (never a 5 in the units digit, so no tie-breaking questions)
    for _ in range(6):
        while True:
            n = rng.randint(12, 988)
            if n % 10 not in (0, 5):
                break
        r = 10 * round(n / 10)
        wrong = r - 10 if r > n else r + 10
        b.add("math", f"Round {n} to the nearest ten.", f"{n} rounded to the nearest ten is {r}.",
              f"{n} rounded to the nearest ten is {wrong}.", "rounding", may_repeat=True)
    # number sequences
    for _ in range(6):
        start, step = rng.randint(1, 20), rng.randint(2, 9)
        seq = [start + i * step for i in range(4)]
        nxt = start + 4 * step
        b.add("math", f"What number comes next: {', '.join(map(str, seq))}?",
              f"The next number is {nxt}.", f"The next number is {b.near(nxt, (-1, 1, step))}.", "sequence",
              may_repeat=True)
    # primes
    for n in rng.sample(range(11, 100), 8):
        if is_prime(n):
            chosen = f"Yes, {n} is a prime number."
            wrong = f"No, {n} is not a prime number."
        else:
            f = smallest_factor(n)
            chosen = f"No, {n} is not prime because it is divisible by {f}."
            wrong = f"Yes, {n} is a prime number."
        b.add("math", f"Is {n} a prime number?", chosen, wrong, "prime")
    # Roman numerals, both directions
    for n in rng.sample(range(4, 100), 8):
        r = roman(n)
        wrong = roman(b.near(n, (-1, 1, 10, -10), minimum=1))
        b.add("math", f"What is {n} in Roman numerals?", f"{n} in Roman numerals is {r}.",
              f"{n} in Roman numerals is {wrong}.", "roman")
    for n in rng.sample(range(4, 100), 6):
        r = roman(n)
        b.add("math", f"What number is the Roman numeral {r}?", f"The Roman numeral {r} is {n}.",
              f"The Roman numeral {r} is {b.near(n, (-1, 1, 10, -10), minimum=1)}.", "roman_reverse")


UNITS = [
    # (big singular, big plural, article, small plural, factor, wrong factors, sample counts)
    ("kilometer", "kilometers", "a", "meters", 1000, [100, 10000], (2, 3, 5, 7)),
    ("meter", "meters", "a", "centimeters", 100, [10, 1000], (2, 4, 6)),
    ("centimeter", "centimeters", "a", "millimeters", 10, [100, 1000], (3, 8)),
    ("kilogram", "kilograms", "a", "grams", 1000, [100, 10000], (2, 4, 5)),
    ("liter", "liters", "a", "milliliters", 1000, [100, 10], (2, 3)),
    ("metric ton", "metric tons", "a", "kilograms", 1000, [100, 10000], (2,)),
    ("hour", "hours", "an", "minutes", 60, [100, 30], (2, 3, 5)),
    ("minute", "minutes", "a", "seconds", 60, [100, 30], (2, 4, 10)),
    ("hour", "hours", "an", "seconds", 3600, [360, 600], (2,)),
    ("day", "days", "a", "hours", 24, [12, 20], (2, 3, 7)),
    ("week", "weeks", "a", "days", 7, [10, 5], (2, 4, 6)),
    ("year", "years", "a", "months", 12, [10, 52], (2, 5)),
    ("foot", "feet", "a", "inches", 12, [10, 3], (2, 3, 6)),
    ("yard", "yards", "a", "feet", 3, [12, 4], (2, 5)),
    ("mile", "miles", "a", "feet", 5280, [1000, 3000], (2,)),
    ("pound", "pounds", "a", "ounces", 16, [12, 10], (2, 3)),
    ("gallon", "gallons", "a", "quarts", 4, [2, 8], (2, 3)),
    ("decade", "decades", "a", "years", 10, [100, 12], (2, 3)),
    ("century", "centuries", "a", "years", 100, [1000, 10], (2, 3)),
    ("dozen", "dozen", "a", "eggs", 12, [10, 20], (2, 3, 5)),
]


def gen_units(b: Builder) -> None:
    for big, bigs, art, smalls, factor, wrong_factors, counts in UNITS:
        # the single-unit question ("How many minutes are in an hour?")
        wf = b.pick(wrong_factors)
        if big == "dozen":
            b.add("units", "How many eggs are in a dozen?", "A dozen is 12 eggs.",
                  f"A dozen is {wf} eggs.", "unit_one")
        else:
            prompt = b.pick([f"How many {smalls} are in {art} {big}?",
                             f"How many {smalls} are there in {art} {big}?"])
            b.add("units", prompt, f"There are {fmt_num(factor)} {smalls} in {art} {big}.",
                  f"There are {fmt_num(wf)} {smalls} in {art} {big}.", "unit_one")
        for n in counts:
            wf = b.pick(wrong_factors)
            prompt = b.pick([f"How many {smalls} are in {n} {bigs}?",
                             f"How many {smalls} are there in {n} {bigs}?",
                             f"Convert {n} {bigs} to {smalls}."])
            chosen = f"{n} {bigs} is {fmt_num(n * factor)} {smalls}."
            wrong = f"{n} {bigs} is {fmt_num(n * wf)} {smalls}."
            b.add("units", prompt, chosen, wrong, "unit_n")


def gen_temperature(b: Builder) -> None:
    for c in [-40, -10, 0, 10, 20, 25, 30, 35, 37, 40, 100]:
        f = Fraction(c) * 9 / 5 + 32
        wrong = b.other([Fraction(c * 2 + 32), Fraction(c + 32), f + 10], f)
        b.add("units", f"What is {c} degrees Celsius in Fahrenheit?",
              f"{c} degrees Celsius is {fmt_num(f)} degrees Fahrenheit.",
              f"{c} degrees Celsius is {fmt_num(wrong)} degrees Fahrenheit.", "c_to_f")
    for f in [-4, 14, 32, 50, 68, 86, 104, 212]:
        c = (Fraction(f) - 32) * 5 / 9
        wrong = b.other([Fraction(f - 32), Fraction(f) / 2, c + 10], c)
        b.add("units", f"What is {f} degrees Fahrenheit in Celsius?",
              f"{f} degrees Fahrenheit is {fmt_num(c)} degrees Celsius.",
              f"{f} degrees Fahrenheit is {fmt_num(wrong)} degrees Celsius.", "f_to_c")


# (country, capital, plausible-but-wrong city in the same country or None)
CAPITALS = [
    ("France", "Paris", "Lyon"),
    ("Germany", "Berlin", "Munich"),
    ("Italy", "Rome", "Milan"),
    ("Spain", "Madrid", "Barcelona"),
    ("Portugal", "Lisbon", "Porto"),
    ("the United Kingdom", "London", "Manchester"),
    ("Ireland", "Dublin", "Cork"),
    ("Belgium", "Brussels", "Antwerp"),
    ("Switzerland", "Bern", "Zurich"),
    ("Austria", "Vienna", "Salzburg"),
    ("Poland", "Warsaw", "Krakow"),
    ("Sweden", "Stockholm", "Gothenburg"),
    ("Norway", "Oslo", "Bergen"),
    ("Denmark", "Copenhagen", "Aarhus"),
    ("Finland", "Helsinki", "Tampere"),
    ("Iceland", "Reykjavik", None),
    ("Greece", "Athens", "Thessaloniki"),
    ("Hungary", "Budapest", None),
    ("the Czech Republic", "Prague", "Brno"),
    ("Ukraine", "Kyiv", "Odesa"),
    ("Russia", "Moscow", "Saint Petersburg"),
    ("Turkey", "Ankara", "Istanbul"),
    ("Egypt", "Cairo", "Alexandria"),
    ("Kenya", "Nairobi", "Mombasa"),
    ("Nigeria", "Abuja", "Lagos"),
    ("Morocco", "Rabat", "Casablanca"),
    ("Ethiopia", "Addis Ababa", None),
    ("Ghana", "Accra", "Kumasi"),
    ("China", "Beijing", "Shanghai"),
    ("Japan", "Tokyo", "Osaka"),
    ("South Korea", "Seoul", "Busan"),
    ("India", "New Delhi", "Mumbai"),
    ("Pakistan", "Islamabad", "Karachi"),
    ("Thailand", "Bangkok", "Chiang Mai"),
    ("Vietnam", "Hanoi", "Ho Chi Minh City"),
    ("the Philippines", "Manila", "Cebu"),
    ("Australia", "Canberra", "Sydney"),
    ("New Zealand", "Wellington", "Auckland"),
    ("Canada", "Ottawa", "Toronto"),
    ("the United States", "Washington, D.C.", "New York City"),
    ("Mexico", "Mexico City", "Guadalajara"),
    ("Brazil", "Brasília", "Rio de Janeiro"),
    ("Argentina", "Buenos Aires", "Córdoba"),
    ("Chile", "Santiago", "Valparaíso"),
    ("Peru", "Lima", "Cusco"),
    ("Colombia", "Bogotá", "Medellín"),
    ("Cuba", "Havana", None),
    ("Iran", "Tehran", "Isfahan"),
    ("Saudi Arabia", "Riyadh", "Jeddah"),
]


def cap_first(s: str) -> str:
    return s[0].upper() + s[1:]


def a_an(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def tidy(sentence: str) -> str:
    """Collapse the double full stop left by names such as "Washington, D.C."."""
    return sentence.replace("..", ".")


def gen_capitals(b: Builder) -> None:
    all_caps = [c for _, c, _ in CAPITALS]
    for country, capital, decoy in CAPITALS:
        wrong_city = decoy if decoy and b.rng.random() < 0.75 else b.other(all_caps, capital)
        prompt = b.pick([f"What is the capital of {country}?",
                         f"What is the capital city of {country}?",
                         f"Which city is the capital of {country}?",
                         f"Name the capital of {country}."])
        if b.rng.random() < 0.5:
            chosen = f"The capital of {country} is {capital}."
            wrong = f"The capital of {country} is {wrong_city}."
        else:
            chosen = f"{capital} is the capital of {country}."
            wrong = f"{wrong_city} is the capital of {country}."
        b.add("geography", prompt, chosen, wrong, "capital")
    # reverse direction for a subset
    countries = [c for c, _, _ in CAPITALS]
    for country, capital, _ in b.rng.sample(CAPITALS, 20):
        wrong_country = b.other(countries, country)
        b.add("geography", f"{capital} is the capital of which country?",
              f"{capital} is the capital of {country}.",
              f"{capital} is the capital of {wrong_country}.", "capital_reverse")


# (prompt, chosen, wrong)
GEOGRAPHY = [
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth.",
     "The Atlantic Ocean is the largest ocean on Earth."),
    ("What is the largest continent?", "Asia is the largest continent.", "Africa is the largest continent."),
    ("What is the tallest mountain in the world?",
     "Mount Everest is the tallest mountain in the world above sea level.",
     "Mount Kilimanjaro is the tallest mountain in the world above sea level."),
    ("How many continents are there?", "There are seven continents.", "There are twelve continents."),
    ("What is the largest hot desert in the world?", "The Sahara is the largest hot desert in the world.",
     "The Gobi is the largest hot desert in the world."),
    ("Which continent is Egypt in?", "Egypt is in Africa.", "Egypt is in South America."),
    ("Which continent is Brazil in?", "Brazil is in South America.", "Brazil is in Africa."),
    ("Which continent is Japan in?", "Japan is in Asia.", "Japan is in Europe."),
    ("Which continent is Canada in?", "Canada is in North America.", "Canada is in Europe."),
    ("Which continent is Kenya in?", "Kenya is in Africa.", "Kenya is in Asia."),
    ("Which continent is Germany in?", "Germany is in Europe.", "Germany is in Asia."),
    ("What is the largest country by area?", "Russia is the largest country by area.",
     "Brazil is the largest country by area."),
    ("Which ocean lies between Europe and North America?",
     "The Atlantic Ocean lies between Europe and North America.",
     "The Indian Ocean lies between Europe and North America."),
    ("Which country is shaped like a boot?", "Italy is shaped like a boot.", "Spain is shaped like a boot."),
    ("What is the coldest continent?", "Antarctica is the coldest continent.", "Europe is the coldest continent."),
    ("What is the equator?", "The equator is an imaginary line around the middle of the Earth.",
     "The equator is a line around the Earth that passes through the North Pole."),
    ("Which country is Sydney in?", "Sydney is in Australia.", "Sydney is in Canada."),
    ("Which country is Toronto in?", "Toronto is in Canada.", "Toronto is in Australia."),
]


SCIENCE = [
    ("What gas do plants take in for photosynthesis?",
     "Plants take in carbon dioxide for photosynthesis.", "Plants take in helium for photosynthesis."),
    ("What gas do humans need to breathe in to live?", "Humans need oxygen to live.",
     "Humans need carbon dioxide to live."),
    ("What is H2O?", "H2O is the chemical formula for water.", "H2O is the chemical formula for salt."),
    ("At what temperature does water freeze in Celsius?", "Water freezes at 0 degrees Celsius.",
     "Water freezes at 10 degrees Celsius."),
    ("At what temperature does water boil in Celsius?",
     "At sea level, water boils at 100 degrees Celsius.", "At sea level, water boils at 50 degrees Celsius."),
    ("At what temperature does water freeze in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit.",
     "Water freezes at 0 degrees Fahrenheit."),
    ("At what temperature does water boil in Fahrenheit?",
     "At sea level, water boils at 212 degrees Fahrenheit.",
     "At sea level, water boils at 100 degrees Fahrenheit."),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth.",
     "The North Star is the closest star to Earth."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system.",
     "Saturn is the largest planet in our solar system."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun.",
     "Venus is the planet closest to the Sun."),
    ("How many planets are in our solar system?", "There are eight planets in our solar system.",
     "There are eleven planets in our solar system."),
    ("Which planet is called the Red Planet?", "Mars is called the Red Planet.",
     "Jupiter is called the Red Planet."),
    ("Which planet is famous for its big rings?", "Saturn is famous for its big rings.",
     "Mars is famous for its big rings."),
    ("What does the Earth orbit?", "The Earth orbits the Sun.", "The Earth orbits the Moon."),
    ("How long does it take the Earth to go around the Sun?",
     "It takes the Earth about 365 days, or one year, to go around the Sun.",
     "It takes the Earth about 30 days to go around the Sun."),
    ("How long does it take the Earth to spin once?", "The Earth spins once about every 24 hours.",
     "The Earth spins once about every seven days."),
    ("What causes day and night?", "Day and night happen because the Earth spins on its axis.",
     "Day and night happen because the Sun goes around the Earth every day."),
    ("What force pulls things toward the ground?", "Gravity pulls things toward the ground.",
     "Magnetism pulls things toward the ground."),
    ("What is the hardest natural material?", "Diamond is the hardest natural material.",
     "Gold is the hardest natural material."),
    ("Which organ pumps blood around the body?", "The heart pumps blood around the body.",
     "The liver pumps blood around the body."),
    ("Which organs do we use to breathe?", "We breathe with our lungs.", "We breathe with our stomach."),
    ("What is the largest organ of the human body?", "The skin is the largest organ of the human body.",
     "The brain is the largest organ of the human body."),
    ("How many bones are in an adult human body?", "An adult human body has 206 bones.",
     "An adult human body has 150 bones."),
    ("What are the three common states of matter?",
     "The three common states of matter are solid, liquid, and gas.",
     "The three common states of matter are solid, liquid, and metal."),
    ("What is the main gas in the air we breathe?", "Nitrogen is the main gas in the air.",
     "Oxygen is the main gas in the air."),
    ("How fast does light travel?", "Light travels at about 300,000 kilometers per second.",
     "Light travels at about 300 kilometers per second."),
    ("Which travels faster, light or sound?", "Light travels much faster than sound.",
     "Sound travels much faster than light."),
    ("Does sound travel faster in air or in water?", "Sound travels faster in water than in air.",
     "Sound travels faster in air than in water."),
    ("What is the center of an atom called?", "The center of an atom is called the nucleus.",
     "The center of an atom is called the electron."),
    ("What does a thermometer measure?", "A thermometer measures temperature.", "A thermometer measures weight."),
    ("Which metal is strongly attracted to a magnet?", "Iron is strongly attracted to a magnet.",
     "Gold is strongly attracted to a magnet."),
    ("What do you call frozen water?", "Frozen water is called ice.", "Frozen water is called steam."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths.",
     "Caterpillars turn into bees."),
    ("What do bees make?", "Bees make honey and beeswax.", "Bees make milk and silk."),
    ("Which blood cells carry oxygen?", "Red blood cells carry oxygen.", "White blood cells carry oxygen."),
    ("Which vitamin does your skin make from sunlight?", "Your skin makes vitamin D from sunlight.",
     "Your skin makes vitamin C from sunlight."),
    ("What is the Moon?", "The Moon is Earth's natural satellite.", "The Moon is a small star."),
    ("Is a tomato a fruit or a vegetable?", "In botany, a tomato is a fruit.",
     "In botany, a tomato is a root vegetable."),
    ("What color is chlorophyll?", "Chlorophyll is green.", "Chlorophyll is purple."),
    ("How many teeth does an adult usually have?",
     "An adult usually has 32 teeth, including the wisdom teeth.",
     "An adult usually has 20 teeth, including the wisdom teeth."),
    ("How many baby teeth does a child usually have?", "A child usually has 20 baby teeth.",
     "A child usually has 32 baby teeth."),
    ("How many senses do humans traditionally have?",
     "Humans traditionally have five senses: sight, hearing, smell, taste, and touch.",
     "Humans traditionally have three senses: sight, hearing, and touch."),
    ("How do fish breathe?", "Fish breathe using their gills.", "Fish breathe using lungs, like people."),
    ("What do plants need to grow?", "Plants need light, water, air, and nutrients to grow.",
     "Plants need only darkness to grow."),
]

ELEMENTS = [
    ("gold", "Au", "Go"), ("silver", "Ag", "Si"), ("iron", "Fe", "Ir"), ("copper", "Cu", "Co"),
    ("lead", "Pb", "Le"), ("sodium", "Na", "So"), ("potassium", "K", "P"), ("oxygen", "O", "Ox"),
    ("hydrogen", "H", "Hy"), ("carbon", "C", "Ca"), ("nitrogen", "N", "Ni"), ("helium", "He", "H"),
    ("neon", "Ne", "N"), ("calcium", "Ca", "C"), ("tin", "Sn", "Ti"), ("mercury", "Hg", "Me"),
    ("zinc", "Zn", "Z"), ("chlorine", "Cl", "C"),
]


def gen_science(b: Builder) -> None:
    for prompt, chosen, wrong in SCIENCE:
        b.add("science", prompt, chosen, wrong, "science_fact")
    for name, sym, wrong in ELEMENTS:
        prompt = b.pick([f"What is the chemical symbol for {name}?", f"What is the symbol for {name}?"])
        b.add("science", prompt, f"The chemical symbol for {name} is {sym}.",
              f"The chemical symbol for {name} is {wrong}.", "element")


# (word, meaning, wrong meaning); meanings complete "X means ..."
WORD_MEANINGS = [
    ("enormous", "very large", "very small"),
    ("tiny", "very small", "very large"),
    ("ancient", "very old", "brand new"),
    ("fragile", "easily broken", "very strong and hard to break"),
    ("generous", "happy to give or share", "unwilling to share anything"),
    ("brave", "willing to face danger or fear", "easily frightened"),
    ("curious", "eager to learn or know about something", "not interested in anything"),
    ("exhausted", "extremely tired", "full of energy"),
    ("furious", "extremely angry", "very calm"),
    ("rapid", "very fast", "very slow"),
    ("silent", "making no sound", "very loud"),
    ("transparent", "clear enough to see through", "impossible to see through"),
    ("humid", "warm and damp", "very dry"),
    ("vacant", "empty or not in use", "full and crowded"),
    ("delighted", "very pleased", "very disappointed"),
    ("famished", "very hungry", "completely full"),
    ("timid", "shy and easily frightened", "bold and confident"),
    ("soggy", "wet and soft", "dry and crisp"),
    ("purchase", "to buy something", "to sell something"),
    ("vanish", "to disappear suddenly", "to appear suddenly"),
    ("giggle", "to laugh in a light, silly way", "to cry quietly"),
    ("glance", "to look at something quickly", "to stare at something for a long time"),
    ("predict", "to say what will happen in the future", "to remember what happened in the past"),
    ("nocturnal", "active at night", "active only during the day"),
]

# (prompt, chosen, wrong) for concept definitions
CONCEPTS = [
    ("What is a noun?", "A noun is a word that names a person, place, or thing.",
     "A noun is a word that describes an action."),
    ("What is a verb?", "A verb is a word for an action or a state, like run or be.",
     "A verb is a word that names a place, like London or park."),
    ("What is an adjective?", "An adjective is a word that describes a noun, like big or red.",
     "An adjective is a word that joins two sentences, like and or but."),
    ("What is a synonym?", "A synonym is a word with the same or a similar meaning as another word.",
     "A synonym is a word with the opposite meaning of another word."),
    ("What is an antonym?", "An antonym is a word with the opposite meaning of another word.",
     "An antonym is a word with the same meaning as another word."),
    ("What is a herbivore?", "A herbivore is an animal that eats only plants.",
     "A herbivore is an animal that eats only meat."),
    ("What is a carnivore?", "A carnivore is an animal that eats mainly meat.",
     "A carnivore is an animal that eats only plants."),
    ("What is an omnivore?", "An omnivore is an animal that eats both plants and meat.",
     "An omnivore is an animal that eats only grass."),
    ("What is photosynthesis?",
     "Photosynthesis is how plants use sunlight, water, and carbon dioxide to make their own food.",
     "Photosynthesis is how animals digest food in their stomachs."),
    ("What is evaporation?", "Evaporation is when a liquid turns into a gas.",
     "Evaporation is when a gas turns into a solid."),
    ("What is condensation?", "Condensation is when a gas cools and turns into a liquid.",
     "Condensation is when a solid melts into a liquid."),
    ("What is a mammal?", "A mammal is a warm-blooded animal with hair or fur that feeds its babies milk.",
     "A mammal is a cold-blooded animal with scales that lives only in water."),
    ("What is a peninsula?", "A peninsula is land surrounded by water on three sides.",
     "A peninsula is land with no water anywhere near it."),
    ("What is an island?", "An island is land completely surrounded by water.",
     "An island is a large lake in the middle of a desert."),
    ("What is a prime number?",
     "A prime number is a whole number greater than 1 that can only be divided evenly by 1 and itself.",
     "A prime number is any number that can be divided evenly by 2."),
    ("What is a fraction?", "A fraction is a number that shows part of a whole, like one half.",
     "A fraction is a number bigger than one hundred."),
    ("What is the perimeter of a shape?", "The perimeter is the total distance around the outside of a shape.",
     "The perimeter is the amount of space inside a shape."),
    ("What is the area of a shape?", "The area is the amount of flat space inside a shape.",
     "The area is the distance around the outside of a shape."),
    ("What is a palindrome?", "A palindrome is a word that reads the same forwards and backwards, like level.",
     "A palindrome is a word that has no vowels, like level."),
    ("What is an acronym?", "An acronym is a word made from the first letters of other words, like NASA.",
     "An acronym is a word that sounds exactly like another word, like NASA."),
    ("What is a haiku?", "A haiku is a short poem with three lines of five, seven, and five syllables.",
     "A haiku is a long poem with fourteen lines that always rhyme."),
    ("What is a volcano?", "A volcano is an opening in the Earth where melted rock, ash, and gas come out.",
     "A volcano is a deep valley that is always filled with ice."),
]


def gen_definitions(b: Builder) -> None:
    for word, meaning, wrong in WORD_MEANINGS:
        prompt = b.pick([f"What does {word} mean?", f"What is the meaning of {word}?",
                         f"What does the word {word} mean?", f"Define {word}."])
        b.add("language", prompt, f'"{cap_first(word)}" means {meaning}.',
              f'"{cap_first(word)}" means {wrong}.', "word_meaning")
    for prompt, chosen, wrong in CONCEPTS:
        topic = "science" if any(k in prompt for k in ("vore", "photo", "evap", "conden", "mammal", "volcano")) \
            else "geography" if any(k in prompt for k in ("peninsula", "island")) \
            else "math" if any(k in prompt for k in ("prime", "fraction", "perimeter", "area")) \
            else "language"
        b.add(topic, prompt, chosen, wrong, "concept")


# (word, opposite, wrong answer that is close to the word itself, not its opposite)
OPPOSITES = [
    ("hot", "cold", "warm"), ("big", "small", "large"), ("happy", "sad", "glad"),
    ("fast", "slow", "quick"), ("tall", "short", "high"), ("early", "late", "soon"),
    ("full", "empty", "packed"), ("wet", "dry", "damp"), ("loud", "quiet", "noisy"),
    ("strong", "weak", "powerful"), ("rich", "poor", "wealthy"), ("young", "old", "youthful"),
    ("begin", "end", "start"), ("push", "pull", "shove"), ("win", "lose", "succeed"),
    ("buy", "sell", "purchase"), ("remember", "forget", "recall"), ("arrive", "leave", "come"),
    ("brave", "cowardly", "bold"), ("always", "never", "forever"), ("inside", "outside", "within"),
    ("day", "night", "morning"), ("north", "south", "up"), ("east", "west", "sunrise"),
    ("clean", "dirty", "tidy"), ("heavy", "light", "bulky"), ("ancient", "modern", "old"),
    ("true", "false", "correct"), ("top", "bottom", "peak"), ("laugh", "cry", "giggle"),
    ("accept", "refuse", "agree"), ("increase", "decrease", "grow"), ("asleep", "awake", "sleepy"),
    ("smooth", "rough", "silky"), ("friend", "enemy", "buddy"), ("question", "answer", "query"),
]

# (singular, plural, wrong plural)
PLURALS = [
    ("mouse", "mice", "mouses"), ("child", "children", "childs"), ("tooth", "teeth", "tooths"),
    ("foot", "feet", "foots"), ("goose", "geese", "gooses"), ("man", "men", "mans"),
    ("woman", "women", "womans"), ("ox", "oxen", "oxes"), ("knife", "knives", "knifes"),
    ("wolf", "wolves", "wolfs"), ("box", "boxes", "boxs"), ("city", "cities", "citys"),
    ("baby", "babies", "babys"), ("sheep", "sheep", "sheeps"), ("deer", "deer", "deers"),
    ("potato", "potatoes", "potatos"), ("church", "churches", "churchs"), ("half", "halves", "halfs"),
    ("loaf", "loaves", "loafs"), ("life", "lives", "lifes"), ("dish", "dishes", "dishs"),
    ("story", "stories", "storys"), ("hero", "heroes", "heros"), ("moose", "moose", "mooses"),
]

# (verb, past tense, wrong past tense)
PAST_TENSES = [
    ("go", "went", "goed"), ("eat", "ate", "eated"), ("run", "ran", "runned"), ("see", "saw", "seed"),
    ("write", "wrote", "writed"), ("swim", "swam", "swimmed"), ("sing", "sang", "singed"),
    ("drink", "drank", "drinked"), ("take", "took", "taked"), ("give", "gave", "gived"),
    ("buy", "bought", "buyed"), ("think", "thought", "thinked"), ("catch", "caught", "catched"),
    ("teach", "taught", "teached"), ("fly", "flew", "flyed"), ("drive", "drove", "drived"),
    ("speak", "spoke", "speaked"), ("break", "broke", "breaked"), ("choose", "chose", "choosed"),
    ("begin", "began", "beginned"), ("bring", "brought", "bringed"), ("fall", "fell", "falled"),
    ("forget", "forgot", "forgetted"), ("know", "knew", "knowed"), ("sleep", "slept", "sleeped"),
    ("sit", "sat", "sitted"), ("find", "found", "finded"), ("keep", "kept", "keeped"),
    ("sell", "sold", "selled"), ("tell", "told", "telled"), ("throw", "threw", "throwed"),
    ("draw", "drew", "drawed"), ("grow", "grew", "growed"), ("ride", "rode", "rided"),
    ("build", "built", "builded"),
]

# (correct spelling, common misspelling)
SPELLINGS = [
    ("necessary", "necesary"), ("separate", "seperate"), ("definitely", "definately"),
    ("receive", "recieve"), ("beautiful", "beutiful"), ("Wednesday", "Wensday"),
    ("February", "Febuary"), ("friend", "freind"), ("because", "becuase"), ("believe", "beleive"),
    ("tomorrow", "tommorow"), ("library", "libary"), ("calendar", "calender"), ("address", "adress"),
    ("accommodate", "acommodate"), ("government", "goverment"), ("restaurant", "restarant"),
    ("weird", "wierd"), ("business", "buisness"), ("different", "diffrent"), ("knowledge", "knowlege"),
    ("environment", "enviroment"), ("surprise", "suprise"), ("embarrass", "embarass"),
    ("rhythm", "rythm"), ("until", "untill"), ("truly", "truely"), ("argument", "arguement"),
    ("occurred", "occured"), ("piece", "peice"), ("vacuum", "vaccum"), ("guarantee", "garantee"),
]


def gen_language(b: Builder) -> None:
    for word, opp, wrong in OPPOSITES:
        prompt = b.pick([f"What is the opposite of {word}?", f"What is the opposite of the word {word}?",
                         f"What word means the opposite of {word}?"])
        b.add("language", prompt, f'The opposite of "{word}" is "{opp}".',
              f'The opposite of "{word}" is "{wrong}".', "opposite")
    for sing, plur, wrong in PLURALS:
        prompt = b.pick([f"What is the plural of {sing}?", f"What is the plural of the word {sing}?",
                         f"What do you call more than one {sing}?"])
        if sing == plur:
            chosen = f'The plural of "{sing}" is also "{plur}".'
        else:
            chosen = f'The plural of "{sing}" is "{plur}".'
        b.add("language", prompt, chosen, f'The plural of "{sing}" is "{wrong}".', "plural")
    for verb, past, wrong in PAST_TENSES:
        prompt = b.pick([f"What is the past tense of {verb}?", f"What is the past tense of the verb {verb}?"])
        b.add("language", prompt, f'The past tense of "{verb}" is "{past}".',
              f'The past tense of "{verb}" is "{wrong}".', "past_tense")
    for word, wrong in SPELLINGS:
        assert word.lower() != wrong.lower()
        prompt = b.pick([f"How do you spell {word}?", f"What is the correct spelling of {word}?",
                         f"Can you spell {word} for me?"])
        if b.rng.random() < 0.5:
            chosen = f"It is spelled {'-'.join(word.upper())}."
            bad = f"It is spelled {'-'.join(wrong.upper())}."
        else:
            chosen = f'The correct spelling is "{word}".'
            bad = f'The correct spelling is "{wrong}".'
        b.add("language", prompt, chosen, bad, "spelling")


LETTER_WORDS = [
    "elephant", "banana", "strawberry", "possession", "apple", "butterfly", "computer", "giraffe",
    "pineapple", "chocolate", "umbrella", "kangaroo", "balloon", "bookkeeper", "committee",
    "penguin", "tomato", "hippopotamus", "rainbow", "dinosaur", "volcano", "grasshopper",
    "coffee", "cheese", "bubble", "pepper", "assessment", "parallel", "raccoon", "mammal",
]


def gen_letters(b: Builder) -> None:
    rng = b.rng
    for word in LETTER_WORDS[:18]:
        n = len(word)
        prompt = b.pick([f"How many letters are in the word {word}?", f"How many letters does {word} have?"])
        b.add("language", prompt, f'The word "{word}" has {n} letters.',
              f'The word "{word}" has {b.near(n, (-2, -1, 1, 2), minimum=1)} letters.', "letter_count")
    for word in LETTER_WORDS:
        counts = Counter(word)
        repeated = sorted(ch for ch, c in counts.items() if c >= 2)
        letter = rng.choice(repeated) if repeated and rng.random() < 0.8 else rng.choice(sorted(counts))
        n = word.count(letter)
        prompt = f"How many times does the letter {letter} appear in {word}?"
        wrong_n = b.near(n, (-1, 1, 2), minimum=1)
        b.add("language", prompt, f'The letter "{letter}" appears {times(n)} in "{word}".',
              f'The letter "{letter}" appears {times(wrong_n)} in "{word}".', "letter_occurrence")
    for word in ["elephant", "banana", "computer", "umbrella", "dinosaur", "potato", "tiger", "orange",
                 "pencil", "calendar"]:
        vowels = [ch for ch in word if ch in "aeiou"]
        assert "y" not in word  # avoid words where y might count as a vowel
        n = len(vowels)
        b.add("language", f"How many vowels are in the word {word}?",
              f'The word "{word}" has {n} vowels: {", ".join(vowels)}.',
              f'The word "{word}" has {b.near(n, (-1, 1, 2), minimum=1)} vowels.', "vowel_count")
    letters = string.ascii_uppercase
    for ch in rng.sample(letters[1:-1], 8):
        i = letters.index(ch)
        nxt = letters[i + 1]
        b.add("language", f"What letter comes after {ch} in the alphabet?",
              f"The letter after {ch} is {nxt}.",
              f"The letter after {ch} is {b.other([letters[i - 1], letters[(i + 2) % 26]], nxt)}.",
              "alphabet_next")
    for ch in rng.sample(letters[1:-1], 6):
        i = letters.index(ch)
        prev = letters[i - 1]
        b.add("language", f"What letter comes before {ch} in the alphabet?",
              f"The letter before {ch} is {prev}.",
              f"The letter before {ch} is {b.other([letters[i + 1], letters[max(i - 2, 0)]], prev)}.",
              "alphabet_prev")
    for pos in rng.sample(range(1, 13), 5):
        ch = letters[pos - 1]
        b.add("language", f"What is the {ORDINALS[pos - 1]} letter of the alphabet?",
              f"The {ORDINALS[pos - 1]} letter of the alphabet is {ch}.",
              f"The {ORDINALS[pos - 1]} letter of the alphabet is {letters[pos]}.", "alphabet_pos")
    b.add("language", "How many letters are in the English alphabet?",
          "The English alphabet has 26 letters.", "The English alphabet has 24 letters.", "alphabet_size")


def gen_calendar(b: Builder) -> None:
    rng = b.rng
    for i, d in enumerate(DAYS):
        nxt, prev = DAYS[(i + 1) % 7], DAYS[(i - 1) % 7]
        b.add("time", b.pick([f"What day comes after {d}?", f"What day of the week comes after {d}?"]),
              f"{nxt} comes after {d}.", f"{b.other([prev, DAYS[(i + 2) % 7]], nxt)} comes after {d}.",
              "day_after")
        b.add("time", b.pick([f"What day comes before {d}?", f"What day of the week comes before {d}?"]),
              f"{prev} comes before {d}.", f"{b.other([nxt, DAYS[(i - 2) % 7]], prev)} comes before {d}.",
              "day_before")
    for i, m in enumerate(MONTHS):
        nxt, prev = MONTHS[(i + 1) % 12], MONTHS[(i - 1) % 12]
        b.add("time", f"What month comes after {m}?", f"{nxt} comes after {m}.",
              f"{b.other([prev, MONTHS[(i + 2) % 12]], nxt)} comes after {m}.", "month_after")
        b.add("time", f"What month comes before {m}?", f"{prev} comes before {m}.",
              f"{b.other([nxt, MONTHS[(i - 2) % 12]], prev)} comes before {m}.", "month_before")
        b.add("time", f"What is the {ORDINALS[i]} month of the year?",
              f"The {ORDINALS[i]} month of the year is {m}.",
              f"The {ORDINALS[i]} month of the year is {MONTHS[(i + 1) % 12]}.", "month_pos")
        days = calendar.monthrange(2023, i + 1)[1]  # 2023 is not a leap year
        prompt = b.pick([f"How many days are in {m}?", f"How many days does {m} have?"])
        if m == "February":
            chosen = "February has 28 days, or 29 in a leap year."
            wrong = "February has 30 days, or 31 in a leap year."
        else:
            chosen = f"{m} has {days} days."
            wrong = f"{m} has {61 - days} days."  # swaps 30 <-> 31
        b.add("time", prompt, chosen, wrong, "month_days")
    for _ in range(6):
        a, c = rng.sample(range(12), 2)
        first = MONTHS[min(a, c)]
        last = MONTHS[max(a, c)]
        b.add("time", f"Which month comes first in the year, {MONTHS[a]} or {MONTHS[c]}?",
              f"{first} comes before {last}.", f"{last} comes before {first}.", "month_order",
              may_repeat=True)
    facts = [
        ("How many days are in a year?", "A normal year has 365 days, and a leap year has 366.",
         "A normal year has 360 days, and a leap year has 361."),
        ("How many days are in a leap year?", "A leap year has 366 days.", "A leap year has 365 days."),
        ("How many weeks are in a year?", "A year has about 52 weeks.", "A year has about 48 weeks."),
        ("How many months have 31 days?", "Seven months have 31 days.", "Six months have 31 days."),
        ("Which month has the fewest days?", "February has the fewest days.", "April has the fewest days."),
        ("How often is there a leap year?", "A leap year usually comes every four years.",
         "A leap year usually comes every ten years."),
        ("What is the first day of the weekend?", "Saturday is usually the first day of the weekend.",
         "Wednesday is usually the first day of the weekend."),
    ]
    assert sum(1 for k in range(1, 13) if calendar.monthrange(2023, k)[1] == 31) == 7
    for prompt, chosen, wrong in facts:
        b.add("time", prompt, chosen, wrong, "time_fact")


SHAPES = [("triangle", 3), ("square", 4), ("rectangle", 4), ("pentagon", 5), ("hexagon", 6),
          ("heptagon", 7), ("octagon", 8), ("nonagon", 9), ("decagon", 10)]


def gen_shapes(b: Builder) -> None:
    for shape, n in SHAPES:
        art = "an" if shape[0] in "aeiou" else "a"
        b.add("math", f"How many sides does {art} {shape} have?",
              f"{cap_first(art)} {shape} has {NUMBER_WORDS[n]} sides.",
              f"{cap_first(art)} {shape} has {NUMBER_WORDS[b.near(n, (-1, 1, 2), minimum=3)]} sides.", "shape_sides")
    for shape, n in SHAPES:
        if shape in ("square", "rectangle"):
            continue
        wrong = b.other([s for s, k in SHAPES if k != n], shape)
        wart = "an" if wrong[0] in "aeiou" else "a"
        art = "an" if shape[0] in "aeiou" else "a"
        b.add("math", f"What do you call a shape with {NUMBER_WORDS[n]} sides?",
              f"A shape with {NUMBER_WORDS[n]} sides is called {art} {shape}.",
              f"A shape with {NUMBER_WORDS[n]} sides is called {wart} {wrong}.", "shape_name")
    facts = [
        ("How many degrees are in a right angle?", "A right angle is 90 degrees.", "A right angle is 100 degrees."),
        ("What do the angles in a triangle add up to?", "The angles in a triangle add up to 180 degrees.",
         "The angles in a triangle add up to 360 degrees."),
        ("How many degrees are in a full circle?", "A full circle has 360 degrees.", "A full circle has 180 degrees."),
        ("How many corners does a cube have?", "A cube has eight corners.", "A cube has six corners."),
        ("How many faces does a cube have?", "A cube has six faces.", "A cube has eight faces."),
        ("Does a circle have any corners?", "No, a circle has no corners.", "Yes, a circle has four corners."),
    ]
    for prompt, chosen, wrong in facts:
        b.add("math", prompt, chosen, wrong, "shape_fact")


def gen_colors(b: Builder) -> None:
    mixes = [("red", "yellow", "orange"), ("blue", "yellow", "green"), ("red", "blue", "purple"),
             ("red", "white", "pink"), ("black", "white", "gray")]
    results = [r for _, _, r in mixes]
    for x, y, res in mixes:
        for c1, c2 in ((x, y), (y, x)):
            wrong = b.other(results + ["brown"], res)
            b.add("colors", f"What color do you get when you mix {c1} and {c2} paint?",
                  f"Mixing {c1} and {c2} paint makes {res}.", f"Mixing {c1} and {c2} paint makes {wrong}.",
                  "color_mix")
    things = [
        ("the sky on a clear day", "blue", "green"), ("grass", "green", "blue"),
        ("a ripe banana", "yellow", "purple"), ("fresh snow", "white", "gray"), ("coal", "black", "white"),
        ("a ripe tomato", "red", "blue"), ("a carrot", "orange", "blue"), ("a lemon", "yellow", "red"),
        ("milk", "white", "yellow"), ("a flamingo", "pink", "green"), ("a stop sign", "red", "green"),
        ("an emerald", "green", "red"), ("a pumpkin", "orange", "blue"), ("most tree leaves in summer", "green", "red"),
    ]
    for thing, col, wrong in things:
        verb = "are" if thing.startswith("most") else "is"
        b.add("colors", f"What color {verb} {thing}?", f"{cap_first(thing)} {verb} usually {col}.",
              f"{cap_first(thing)} {verb} usually {wrong}.", "color_of")
    facts = [
        ("How many colors are in a rainbow?",
         "A rainbow is usually described as having seven colors.",
         "A rainbow is usually described as having four colors."),
        ("What are the colors of the rainbow in order?",
         "The rainbow colors are red, orange, yellow, green, blue, indigo, and violet.",
         "The rainbow colors are red, green, yellow, orange, pink, brown, and black."),
        ("What are the three primary colors of paint?",
         "The traditional primary colors of paint are red, yellow, and blue.",
         "The traditional primary colors of paint are green, orange, and purple."),
        ("What are the three primary colors of light?", "The primary colors of light are red, green, and blue.",
         "The primary colors of light are black, white, and gray."),
        ("What does a red traffic light mean?", "A red traffic light means stop.",
         "A red traffic light means go."),
        ("What does a green traffic light mean?", "A green traffic light means go.",
         "A green traffic light means stop."),
        ("What color do you get when you mix all the colors of light?",
         "Mixing all the colors of light makes white light.", "Mixing all the colors of light makes black."),
    ]
    for prompt, chosen, wrong in facts:
        b.add("colors", prompt, chosen, wrong, "color_fact")


BABY_ANIMALS = [
    ("cat", "kitten"), ("dog", "puppy"), ("cow", "calf"), ("sheep", "lamb"), ("horse", "foal"),
    ("goat", "kid"), ("duck", "duckling"), ("frog", "tadpole"), ("kangaroo", "joey"), ("bear", "cub"),
    ("lion", "cub"), ("deer", "fawn"), ("swan", "cygnet"), ("goose", "gosling"), ("owl", "owlet"),
    ("pig", "piglet"), ("chicken", "chick"), ("eagle", "eaglet"),
]
# (animal, sound, a sound that animal clearly does not make)
ANIMAL_SOUNDS = [
    ("cow", "moos", "quacks"), ("dog", "barks", "moos"), ("cat", "meows", "oinks"), ("duck", "quacks", "moos"),
    ("sheep", "baas", "barks"), ("lion", "roars", "quacks"), ("pig", "oinks", "meows"),
    ("horse", "neighs", "quacks"), ("owl", "hoots", "moos"), ("snake", "hisses", "barks"),
    ("bee", "buzzes", "moos"), ("donkey", "brays", "meows"), ("frog", "croaks", "neighs"),
    ("mouse", "squeaks", "roars"), ("wolf", "howls", "quacks"),
]
ANIMAL_LEGS = [
    ("spider", 8), ("ant", 6), ("bee", 6), ("dog", 4), ("chicken", 2), ("horse", 4), ("cat", 4),
    ("duck", 2), ("butterfly", 6), ("cow", 4), ("frog", 4), ("beetle", 6), ("ostrich", 2),
    ("scorpion", 8), ("penguin", 2), ("elephant", 4),
]
# (animals, group name, a group name that is wrong for them)
ANIMAL_GROUPS = [
    ("lions", "a pride", "a school"), ("wolves", "a pack", "a herd"), ("fish", "a school", "a pride"),
    ("bees", "a swarm", "a pack"), ("cows", "a herd", "a murder"), ("birds", "a flock", "a pride"),
    ("crows", "a murder", "a school"), ("ants", "a colony", "a pack"),
]
ANIMAL_CLASSES = [
    ("whale", "a fish", "a mammal", "mammal"), ("bat", "a bird", "a mammal", "mammal"),
    ("penguin", "a bird", "a mammal", "bird"), ("frog", "a reptile", "an amphibian", "amphibian"),
    ("dolphin", "a fish", "a mammal", "mammal"), ("shark", "a fish", "a mammal", "fish"),
    ("turtle", "a reptile", "an amphibian", "reptile"), ("crocodile", "a reptile", "a mammal", "reptile"),
    ("seal", "a fish", "a mammal", "mammal"), ("ostrich", "a bird", "a mammal", "bird"),
]
ANIMAL_FACTS = [
    ("What is the fastest land animal?", "The cheetah is the fastest land animal.",
     "The tortoise is the fastest land animal."),
    ("What is the largest animal on Earth?", "The blue whale is the largest animal on Earth.",
     "The African elephant is the largest animal on Earth."),
    ("What is the tallest animal?", "The giraffe is the tallest animal.", "The camel is the tallest animal."),
    ("Which animal has a long trunk?", "The elephant has a long trunk.", "The giraffe has a long trunk."),
    ("Which animal has black and white stripes?", "The zebra has black and white stripes.",
     "The tiger has black and white stripes."),
    ("What is the largest bird?", "The ostrich is the largest bird.", "The sparrow is the largest bird."),
    ("Which animal carries its baby in a pouch?", "The kangaroo carries its baby in a pouch.",
     "The horse carries its baby in a pouch."),
    ("Which mammal can truly fly?", "The bat is the only mammal that can truly fly.",
     "The squirrel is the only mammal that can truly fly."),
    ("What do pandas mostly eat?", "Pandas mostly eat bamboo.", "Pandas mostly eat fish."),
    ("Is a spider an insect?", "No, a spider is an arachnid, not an insect.", "Yes, a spider is an insect."),
    ("How many hearts does an octopus have?", "An octopus has three hearts.", "An octopus has one heart."),
    ("How many arms does an octopus have?", "An octopus has eight arms.", "An octopus has six arms."),
    ("Where do honeybees live?", "Honeybees live in a hive.", "Honeybees live in a hole in the sand."),
    ("Where does a bear sleep through the winter?", "A bear sleeps through the winter in a den.",
     "A bear sleeps through the winter in a nest."),
    ("What do spiders spin?", "Spiders spin webs.", "Spiders spin cocoons of wool."),
]


def gen_animals(b: Builder) -> None:
    # wrong names come from the other class (mammal babies for birds and frogs,
    # bird/frog babies for mammals), and never "chick", which can fit any bird
    birdlike = {"duck", "swan", "goose", "owl", "chicken", "eagle", "frog"}
    mammal_babies = sorted({baby for a, baby in BABY_ANIMALS if a not in birdlike})
    bird_babies = sorted({baby for a, baby in BABY_ANIMALS if a in birdlike} - {"chick"})
    for animal, baby in BABY_ANIMALS:
        prompt = b.pick([f"What is a baby {animal} called?", f"What do you call a baby {animal}?"])
        wrong = b.other(mammal_babies if animal in birdlike else bird_babies, baby)
        b.add("animals", prompt, f"A baby {animal} is called {a_an(baby)}.",
              f"A baby {animal} is called {a_an(wrong)}.", "baby_animal")
    for animal, sound, wrong in ANIMAL_SOUNDS:
        prompt = b.pick([f"What sound does {a_an(animal)} make?", f"What noise does {a_an(animal)} make?"])
        b.add("animals", prompt, f"{cap_first(a_an(animal))} {sound}.", f"{cap_first(a_an(animal))} {wrong}.",
              "animal_sound")
    for animal, n in ANIMAL_LEGS:
        art = "an" if animal[0] in "aeiou" else "a"
        wrong = b.other([2, 4, 6, 8, 10], n)
        b.add("animals", f"How many legs does {art} {animal} have?",
              f"{cap_first(art)} {animal} has {NUMBER_WORDS[n]} legs.",
              f"{cap_first(art)} {animal} has {NUMBER_WORDS[wrong]} legs.", "animal_legs")
    b.add("animals", "How many legs does a snake have?", "A snake has no legs.", "A snake has four legs.",
          "animal_legs")
    for animals, group, wrong in ANIMAL_GROUPS:
        b.add("animals", f"What is a group of {animals} called?",
              f"A group of {animals} is called {group}.",
              f"A group of {animals} is called {wrong}.", "animal_group")
    for animal, opt1, opt2, answer in ANIMAL_CLASSES:
        art = "an" if animal[0] in "aeiou" else "a"
        correct_opt = opt1 if opt1.endswith(answer) else opt2
        wrong_opt = opt2 if correct_opt == opt1 else opt1
        b.add("animals", f"Is {art} {animal} {opt1} or {opt2}?",
              f"{cap_first(art)} {animal} is {correct_opt}.", f"{cap_first(art)} {animal} is {wrong_opt}.",
              "animal_class")
    for prompt, chosen, wrong in ANIMAL_FACTS:
        b.add("animals", prompt, chosen, wrong, "animal_fact")


HOWTO = [
    ("How do I boil an egg?",
     "Put the egg in boiling water for about 8 to 10 minutes for a hard-boiled egg.",
     "Put the egg in cold water for about 30 seconds for a hard-boiled egg."),
    ("How do I make a cup of tea?",
     "Pour hot water over a tea bag, let it steep for 3 to 5 minutes, then take the bag out.",
     "Pour hot water over a tea bag, let it steep for two hours, then take the bag out."),
    ("How do I wash my hands properly?",
     "Wet your hands, scrub them with soap for at least 20 seconds, rinse, and dry them.",
     "Rinse your hands with water for two seconds; soap is not needed."),
    ("How do I save a file on a computer?", "Press Ctrl+S on Windows or Cmd+S on a Mac.",
     "Press Ctrl+P on Windows or Cmd+P on a Mac."),
    ("How do I copy text on a computer?", "Select the text and press Ctrl+C on Windows or Cmd+C on a Mac.",
     "Select the text and press Ctrl+V on Windows or Cmd+V on a Mac."),
    ("How do I paste text on a computer?", "Press Ctrl+V on Windows or Cmd+V on a Mac.",
     "Press Ctrl+C on Windows or Cmd+C on a Mac."),
    ("How do I undo a mistake on a computer?", "Press Ctrl+Z on Windows or Cmd+Z on a Mac.",
     "Press Ctrl+Q on Windows or Cmd+Q on a Mac."),
    ("How do I plant a seed?",
     "Push the seed into moist soil, about twice as deep as the seed is wide, then water it and give it light.",
     "Keep the seed in a dark, dry drawer and never water it."),
    ("How can I fall asleep more easily?",
     "Keep a regular bedtime, avoid screens before bed, and keep your room dark and quiet.",
     "Drink strong coffee and look at a bright screen right before bed."),
    ("How should I brush my teeth?", "Brush gently with fluoride toothpaste for two minutes, twice a day.",
     "Brush hard for ten seconds, once a week."),
    ("How do I make toast?", "Put a slice of bread in a toaster and toast it for one to three minutes.",
     "Put a slice of bread in the freezer for one to three minutes."),
    ("How do I convert Celsius to Fahrenheit?", "Multiply the Celsius temperature by 9/5, then add 32.",
     "Multiply the Celsius temperature by 5/9, then subtract 32."),
    ("How do I find the area of a rectangle?", "Multiply its length by its width.", "Add its length and its width."),
    ("How do I find the perimeter of a square?", "Multiply the length of one side by four.",
     "Multiply the length of one side by itself."),
    ("How do I find the average of some numbers?",
     "Add the numbers together, then divide by how many numbers there are.",
     "Add the numbers together, then multiply by how many numbers there are."),
    ("How do I turn a fraction into a percentage?",
     "Divide the top number by the bottom number, then multiply by 100.",
     "Multiply the top number by the bottom number, then add 100."),
    ("How do I keep cut apples from turning brown?", "Brush or sprinkle them with a little lemon juice.",
     "Leave them out in the warm sun."),
    ("How can I cool down a hot drink quickly?", "Stir it, pour it into a wider cup, or add an ice cube.",
     "Put a lid on it and wrap it in a warm towel."),
    ("How can I tell if an egg is fresh?",
     "Put it in a bowl of water: fresh eggs sink and lie flat, old eggs float.",
     "Put it in a bowl of water: fresh eggs float, old eggs sink and lie flat."),
    ("How do I stop a nosebleed?",
     "Sit up, lean forward, and pinch the soft part of your nose for about 10 minutes.",
     "Lie flat, tilt your head far back, and let the blood run down your throat."),
    ("How do I put words in alphabetical order?",
     "Sort them by their first letter from A to Z, then by the next letter when the first letters match.",
     "Sort them from the shortest word to the longest word."),
    ("How do I check if a number is divisible by 3?",
     "Add up its digits; if that sum is divisible by 3, so is the number.",
     "Look at its last digit; if that digit is 3, the number is divisible by 3."),
    ("How do I check if a number is even?", "Look at the last digit: if it is 0, 2, 4, 6, or 8, the number is even.",
     "Look at the first digit: if it is 1, 3, 5, 7, or 9, the number is even."),
    ("How do I water a houseplant?",
     "Water it when the top of the soil feels dry, until a little water drains from the bottom.",
     "Pour a full bucket of water on it every hour, even if the soil is wet."),
    ("How do I keep bread fresh longer?", "Keep it in a sealed bag in a cool, dry place, or freeze it.",
     "Leave it uncovered next to a hot oven."),
]

GENERAL = [
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.",
     "Charles Dickens wrote Romeo and Juliet."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa.",
     "Vincent van Gogh painted the Mona Lisa."),
    ("Who was the first person to walk on the Moon?",
     "Neil Armstrong was the first person to walk on the Moon, in 1969.",
     "Buzz Aldrin was the first person to walk on the Moon, in 1959."),
    ("Who was the first President of the United States?",
     "George Washington was the first President of the United States.",
     "Abraham Lincoln was the first President of the United States."),
    ("Who discovered penicillin?", "Alexander Fleming discovered penicillin in 1928.",
     "Isaac Newton discovered penicillin in 1928."),
    ("Who came up with the theory of relativity?", "Albert Einstein came up with the theory of relativity.",
     "Charles Darwin came up with the theory of relativity."),
    ("In what year did World War II end?", "World War II ended in 1945.", "World War II ended in 1951."),
    ("What language is mainly spoken in Brazil?", "Portuguese is the main language of Brazil.",
     "Spanish is the main language of Brazil."),
    ("What language is mainly spoken in Mexico?", "Spanish is the main language of Mexico.",
     "Portuguese is the main language of Mexico."),
    ("What language is mainly spoken in Japan?", "Japanese is the main language of Japan.",
     "Chinese is the main language of Japan."),
    ("What language is mainly spoken in Egypt?", "Arabic is the main language of Egypt.",
     "Greek is the main language of Egypt."),
    ("What currency is used in Japan?", "Japan uses the yen.", "Japan uses the won."),
    ("What currency is used in the United Kingdom?", "The United Kingdom uses the pound sterling.",
     "The United Kingdom uses the euro."),
    ("What currency is used in Germany?", "Germany uses the euro.", "Germany uses the mark."),
    ("What currency is used in the United States?", "The United States uses the US dollar.",
     "The United States uses the peso."),
    ("What currency is used in India?", "India uses the rupee.", "India uses the yen."),
    ("What currency is used in Mexico?", "Mexico uses the Mexican peso.", "Mexico uses the US dollar."),
    ("What currency is used in Switzerland?", "Switzerland uses the Swiss franc.", "Switzerland uses the euro."),
    ("How many players are on a soccer team on the field?",
     "A soccer team has 11 players on the field.", "A soccer team has 9 players on the field."),
    ("How many strings does a standard guitar have?", "A standard guitar has six strings.",
     "A standard guitar has four strings."),
    ("How many keys does a standard piano have?", "A standard piano has 88 keys.",
     "A standard piano has 100 keys."),
]


def gen_howto_general(b: Builder) -> None:
    for prompt, chosen, wrong in HOWTO:
        b.add("howto", prompt, chosen, wrong, "howto")
    for prompt, chosen, wrong in GENERAL:
        b.add("general", prompt, chosen, wrong, "general_fact")
    for prompt, chosen, wrong in GEOGRAPHY:
        b.add("geography", prompt, chosen, wrong, "geography_fact")


GENERATORS = [
    gen_arithmetic, gen_number_facts, gen_units, gen_temperature, gen_capitals, gen_science,
    gen_definitions, gen_language, gen_letters, gen_calendar, gen_shapes, gen_colors, gen_animals,
    gen_howto_general,
]


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = Random(seed)
    b = Builder(rng)
    for gen in GENERATORS:
        gen(b)
    items = b.items
    rng.shuffle(items)
    # assign rejected kinds evenly within each group, starting at a random offset,
    # so every fact family gets a mix of rambling / wrong / rambling+wrong
    offsets: dict[str, int] = {}
    rows, meta = [], []
    for it in items:
        g = it["group"]
        if g not in offsets:
            offsets[g] = rng.randrange(3)
        kind = KINDS[offsets[g] % 3]
        offsets[g] += 1
        if kind == "rambling":
            rejected = ramble(rng, it["prompt"], it["chosen"], it["topic"])
        elif kind == "wrong":
            rejected = it["wrong"]
        else:
            rejected = ramble(rng, it["prompt"], it["wrong"], it["topic"])
        assert rejected != it["chosen"]
        rows.append({"prompt": it["prompt"], "chosen": it["chosen"], "rejected": rejected})
        meta.append({"kind": kind, "topic": it["topic"], "group": g})
    return rows, meta


def describe(values: list[int]) -> str:
    return (f"min {min(values)}, median {statistics.median(values):g}, "
            f"mean {statistics.mean(values):.1f}, max {max(values)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .jsonl path")
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed (default {SEED})")
    args = parser.parse_args()

    rows, meta = build(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            # Conversational format: the chat template is applied in training as it is in generation.
            record = {
                "prompt": [{"role": "user", "content": row["prompt"]}],
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            }
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    kinds = Counter(m["kind"] for m in meta)
    topics = Counter(m["topic"] for m in meta)
    print(f"wrote {len(rows)} pairs to {args.out}")
    print("rejected kinds: " + ", ".join(f"{k}={kinds[k]}" for k in KINDS))
    print("topics: " + ", ".join(f"{t}={n}" for t, n in sorted(topics.items())))
    print("chosen words:   " + describe([words(r["chosen"]) for r in rows]))
    for k in KINDS:
        vals = [words(r["rejected"]) for r, m in zip(rows, meta) if m["kind"] == k]
        print(f"rejected words ({k}): " + describe(vals))
    fillers = OPENERS + RESTATES + HEDGES + PADDING + LEADINS + SUMMARIES + CLOSERS
    fillers += [s for pool in TANGENTS.values() for s in pool]
    print(f"distinct filler sentences/templates: {len(set(f for f in fillers if f))}")


if __name__ == "__main__":
    main()

"""The tiny-math world: a deterministic generator of grade-school math word problems.

Every problem has a question, a step-by-step worked solution and an integer answer. Solutions end in
``#### <answer>`` (the GSM8K convention), so :func:`extract_answer` and :func:`answer_accuracy` work on
any model output that follows it. Numbers stay small (operands mostly below 20, results below 200)
so a model of a few million parameters can learn the arithmetic.

A problem is a pure function of ``(split, index)``: the same call gives the same problem on every
machine. Train and held-out problems come from different seed streams, and :func:`problems` drops any
train problem whose question also occurs in the held-out set.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lightning_mtp.errors import UserInputError

__all__ = [
    "Problem",
    "PROMPT_TEMPLATE",
    "SPLITS",
    "make_problem",
    "problems",
    "format_prompt",
    "extract_answer",
    "answer_accuracy",
]

SPLITS = ("train", "validation", "test")
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"

_NAMES = [
    ("Tom", "he", "his"), ("Ann", "she", "her"), ("Sam", "he", "his"), ("Mia", "she", "her"),
    ("Ben", "he", "his"), ("Lily", "she", "her"), ("Max", "he", "his"), ("Zoe", "she", "her"),
    ("Leo", "he", "his"), ("Ava", "she", "her"), ("Jack", "he", "his"), ("Emma", "she", "her"),
    ("Noah", "he", "his"), ("Ella", "she", "her"), ("Liam", "he", "his"), ("Nora", "she", "her"),
]
_ITEMS = ["apples", "pens", "books", "cards", "stickers", "marbles", "cookies", "shells", "stamps", "toys",
          "eggs", "flowers", "coins", "balls", "pencils", "candies"]
_CONTAINERS = ["box", "bag", "jar", "basket", "pack", "crate"]
_PRICED = [("pencil", "pencils"), ("book", "books"), ("cake", "cakes"), ("toy car", "toy cars"),
           ("notebook", "notebooks"), ("kite", "kites"), ("ball", "balls"), ("cup", "cups")]


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str
    answer: int

    @property
    def prompt(self) -> str:
        return format_prompt(self.question)

    @property
    def response(self) -> str:
        """The worked solution as the model should write it after the prompt (leading space included)."""
        return " " + self.solution


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


def _buy_and_give(r: random.Random) -> Problem:
    name, he, _ = r.choice(_NAMES)
    item = r.choice(_ITEMS)
    a, b = r.randint(3, 20), r.randint(2, 15)
    c = r.randint(1, a + b - 1)
    he_cap = he.capitalize()
    q = (f"{name} has {a} {item}. {he_cap} buys {b} more {item}. Then {he} gives {c} {item} to a friend. "
         f"How many {item} does {name} have now?")
    s1, s2 = a + b, a + b - c
    sol = (f"{name} starts with {a} {item}.\nAfter buying {b} more, {he} has {a} + {b} = {s1} {item}.\n"
           f"After giving away {c}, {he} has {s1} - {c} = {s2} {item}.\n#### {s2}")
    return Problem(q, sol, s2)


def _boxes(r: random.Random) -> Problem:
    name, _, _ = r.choice(_NAMES)
    item, box = r.choice(_ITEMS), r.choice(_CONTAINERS)
    per, n, loose = r.randint(2, 9), r.randint(2, 9), r.randint(1, 12)
    q = f"A {box} holds {per} {item}. {name} buys {n} {box}s and {loose} loose {item}. How many {item} does {name} have?"
    s1 = n * per
    sol = (f"{n} {box}s hold {n} * {per} = {s1} {item}.\nWith {loose} more {item}, {name} has {s1} + {loose} = "
           f"{s1 + loose} {item}.\n#### {s1 + loose}")
    return Problem(q, sol, s1 + loose)


def _shopping(r: random.Random) -> Problem:
    name, he, _ = r.choice(_NAMES)
    (a1, aN), (b1, bN) = r.sample(_PRICED, 2)
    pa, pb = r.randint(2, 9), r.randint(2, 12)
    na, nb = r.randint(2, 6), r.randint(1, 4)
    q = (f"A {a1} costs {pa} dollars and a {b1} costs {pb} dollars. {name} buys {na} {aN} and {nb} "
         f"{bN if nb > 1 else b1}. How many dollars does {name} spend?")
    ca, cb = na * pa, nb * pb
    sol = (f"The {aN} cost {na} * {pa} = {ca} dollars.\nThe {bN if nb > 1 else b1} cost {nb} * {pb} = {cb} dollars.\n"
           f"In total {he} spends {ca} + {cb} = {ca + cb} dollars.\n#### {ca + cb}")
    return Problem(q, sol, ca + cb)


def _sharing(r: random.Random) -> Problem:
    name, he, _ = r.choice(_NAMES)
    item = r.choice(_ITEMS)
    friends, each, extra = r.randint(2, 6), r.randint(2, 9), r.randint(1, 9)
    total = friends * each
    he_cap = he.capitalize()
    q = (f"{name} has {total} {item}. {he_cap} shares them equally among {friends} friends. Then each friend finds "
         f"{extra} more {item}. How many {item} does each friend have?")
    sol = (f"Each friend gets {total} / {friends} = {each} {item}.\nWith {extra} more, each friend has "
           f"{each} + {extra} = {each + extra} {item}.\n#### {each + extra}")
    return Problem(q, sol, each + extra)


def _ages(r: random.Random) -> Problem:
    name, _, his = r.choice(_NAMES)
    age, diff, later = r.randint(3, 15), r.randint(2, 9), r.randint(2, 10)
    sib, she = r.choice([("sister", "she"), ("brother", "he")])
    q = f"{name} is {age} years old. {his.capitalize()} {sib} is {diff} years older. How old will the {sib} be in {later} years?"
    s1 = age + diff
    sol = (f"The {sib} is {age} + {diff} = {s1} years old.\nIn {later} years {she} will be {s1} + {later} = "
           f"{s1 + later} years old.\n#### {s1 + later}")
    return Problem(q, sol, s1 + later)


def _trips(r: random.Random) -> Problem:
    vehicle, what = r.choice([("bus", "people"), ("boat", "people"), ("truck", "boxes"), ("van", "bags")])
    per, morning, afternoon = r.randint(3, 12), r.randint(1, 5), r.randint(1, 5)
    q = (f"A {vehicle} carries {per} {what} on each trip. It makes {morning} trips in the morning and {afternoon} "
         f"trips in the afternoon. How many {what} does it carry in all?")
    trips = morning + afternoon
    sol = (f"It makes {morning} + {afternoon} = {trips} trips.\nIt carries {trips} * {per} = {trips * per} {what}.\n"
           f"#### {trips * per}")
    return Problem(q, sol, trips * per)


def _savings(r: random.Random) -> Problem:
    name, he, _ = r.choice(_NAMES)
    start, weekly, weeks, spent = r.randint(2, 20), r.randint(2, 9), r.randint(2, 6), 0
    s1 = weekly * weeks
    spent = r.randint(1, start + s1 - 1)
    q = (f"{name} has {start} dollars. {he.capitalize()} saves {weekly} dollars every week for {weeks} weeks. "
         f"Then {he} spends {spent} dollars on a gift. How many dollars does {name} have left?")
    s2 = start + s1
    sol = (f"{name} saves {weekly} * {weeks} = {s1} dollars.\nThen {he} has {start} + {s1} = {s2} dollars.\n"
           f"After the gift {he} has {s2} - {spent} = {s2 - spent} dollars.\n#### {s2 - spent}")
    return Problem(q, sol, s2 - spent)


def _garden(r: random.Random) -> Problem:
    name, he, _ = r.choice(_NAMES)
    rows, per, eaten = r.randint(2, 9), r.randint(2, 9), 0
    total = rows * per
    eaten = r.randint(1, total - 1)
    q = (f"{name} plants {rows} rows of flowers with {per} flowers in each row. Rabbits eat {eaten} flowers. "
         f"How many flowers are left?")
    sol = (f"{name} plants {rows} * {per} = {total} flowers.\nAfter the rabbits, {total} - {eaten} = "
           f"{total - eaten} flowers are left.\n#### {total - eaten}")
    del he
    return Problem(q, sol, total - eaten)


PROBLEM_TYPES: tuple[Callable[[random.Random], Problem], ...] = (
    _buy_and_give, _boxes, _shopping, _sharing, _ages, _trips, _savings, _garden,
)


def _seed(split: str, index: int) -> int:
    digest = hashlib.sha256(f"tiny-math/{split}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def make_problem(split: str, index: int) -> Problem:
    """The problem number ``index`` of ``split`` (a pure function of both)."""
    if split not in SPLITS:
        raise UserInputError(f"unknown tiny-math split {split!r}; choose one of {list(SPLITS)}")
    r = random.Random(_seed(split, index))
    return r.choice(PROBLEM_TYPES)(r)


def problems(split: str, n: int, start: int = 0) -> list[Problem]:
    """``n`` problems of ``split``. Train and validation problems never repeat a test question."""
    if n < 0:
        raise UserInputError(f"n must be >= 0, got {n}")
    held_out = set() if split == "test" else {p.question for p in _test_questions()}
    out: list[Problem] = []
    i = start
    while len(out) < n:
        p = make_problem(split, i)
        i += 1
        if p.question not in held_out:
            out.append(p)
    return out


_TEST_CACHE: list[Problem] = []


def _test_questions(n: int = 1000) -> list[Problem]:
    """The first 1000 test problems: the pool every held-out evaluation draws from."""
    if not _TEST_CACHE:
        _TEST_CACHE.extend(make_problem("test", i) for i in range(n))
    return _TEST_CACHE


_ANSWER_RE = re.compile(r"####\s*(-?\d+)")


def extract_answer(text: str) -> int | None:
    """The integer after the first ``####`` in ``text``, or None when there is none."""
    m = _ANSWER_RE.search(text)
    return int(m.group(1)) if m else None


def answer_accuracy(outputs: Iterable[str], answers: Iterable[int]) -> float:
    """Exact-answer accuracy: the fraction of outputs whose ``#### n`` equals the answer."""
    outputs, answers = list(outputs), list(answers)
    if len(outputs) != len(answers):
        raise UserInputError(f"got {len(outputs)} outputs for {len(answers)} answers")
    if not outputs:
        return 0.0
    return sum(extract_answer(o) == a for o, a in zip(outputs, answers, strict=True)) / len(outputs)

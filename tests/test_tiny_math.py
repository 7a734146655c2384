"""The tiny-math world: deterministic, split-disjoint, answers consistent with the worked solutions."""

from __future__ import annotations

import re

import pytest

from lightning_mtp.data import tiny_math
from lightning_mtp.data.tiny_math import answer_accuracy, extract_answer, make_problem, problems


def test_problems_are_a_pure_function_of_split_and_index():
    assert make_problem("train", 17) == make_problem("train", 17)
    assert make_problem("train", 17) != make_problem("train", 18)
    assert make_problem("train", 3) != make_problem("test", 3)


def test_every_solution_step_is_correct_arithmetic_and_ends_in_the_answer():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    for p in problems("train", 300):
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", p.solution)
        assert len(steps) >= 2, p.solution  # multi-step
        for a, op, b, c in steps:
            assert ops[op](int(a), int(b)) == int(c), p.solution
        assert int(steps[-1][3]) == p.answer
        assert p.solution.endswith(f"#### {p.answer}")
        assert 0 <= p.answer < 1000


def test_several_problem_types_occur():
    firsts = {p.question.split(".")[0].split()[-1] for p in problems("train", 400)}
    kinds = {fn.__name__ for fn in tiny_math.PROBLEM_TYPES}
    assert len(kinds) >= 6
    assert len(firsts) > 10


def test_train_never_contains_a_held_out_question():
    held_out = {p.question for p in problems("test", 1000)}
    assert not held_out & {p.question for p in problems("train", 3000)}
    assert not held_out & {p.question for p in problems("validation", 500)}


def test_extract_answer_and_accuracy():
    assert extract_answer("so 3 + 4 = 7.\n#### 7") == 7
    assert extract_answer("#### -3 and #### 5") == -3
    assert extract_answer("no answer here") is None
    assert answer_accuracy(["#### 7", "#### 8", "nothing"], [7, 9, 1]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 outputs for 1 answers"):
        answer_accuracy(["#### 1", "#### 2"], [1])


def test_unknown_split_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tiny-math split 'dev'"):
        make_problem("dev", 0)

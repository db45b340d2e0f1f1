"""The calculator walks the syntax tree: arithmetic works, everything else and oversized work is refused."""

from __future__ import annotations

import pytest

from agents import CalculatorError, calculator, evaluate
from agents.calculator import MAX_EXPRESSION_LENGTH, MAX_INTEGER_BITS


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("2+3", 5),
        ("2 * (3 + 4)", 14),
        ("7 // 2", 3),
        ("7 % 3", 1),
        ("-2 ** 2", -4),
        ("(-2) ** 2", 4),
        ("2 ** 10", 1024),
        ("+5 - -5", 10),
        ("1 / 4", 0.25),
        ("2 ** -1", 0.5),
        ("1.5 * 4", 6.0),
        ("2 ** 4000 // 2 ** 3999", 2),
        ("123456789 * 987654321", 121932631112635269),
    ],
)
def test_arithmetic(expression: str, value: float) -> None:
    assert evaluate(expression) == value
    assert type(evaluate(expression)) is type(value)


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",
        "abs(-1)",
        "x + 1",
        "[1, 2]",
        "'a' * 3",
        "True + 1",
        "1 if 1 else 2",
        "(1).real",
        "1 < 2",
        "1 & 3",
        "lambda: 1",
        "1j * 2",
        "",
        "2 +",
    ],
)
def test_anything_but_arithmetic_is_refused(expression: str) -> None:
    with pytest.raises(CalculatorError):
        evaluate(expression)


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    "expression",
    [
        "9**9**9",
        "10 ** 10 ** 10",
        f"2 ** {MAX_INTEGER_BITS + 1}",
        "(2 ** 4000) * (2 ** 4000)",
        "1e308 * 10",
        "10.0 ** 400",
        "2 ** 4000 + 0.5",
        "(-8) ** 0.5",
        "1 / 0",
        "1 // 0",
        "1 % 0",
        "0 ** -1",
        "(" * 300 + "1" + ")" * 300,
        "1+" * (MAX_EXPRESSION_LENGTH // 2) + "1",
    ],
)
def test_oversized_or_undefined_results_are_refused_at_once(expression: str) -> None:
    with pytest.raises(CalculatorError):
        evaluate(expression)


def test_the_tool_function_returns_text() -> None:
    assert calculator("6 * 7") == "42"
    assert calculator("10 / 4") == "2.5"

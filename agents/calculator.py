"""Arithmetic on untrusted input, by walking the expression's syntax tree (never ``eval``).

Allowed: numbers, parentheses, ``+ - * / // % **`` and unary ``+ -``. Sizes are bounded before
anything is computed, so ``9**9**9`` is refused at once instead of running for hours.
"""

from __future__ import annotations

import ast
import math
from typing import Any

from agents.exceptions import CalculatorError

__all__ = ["MAX_EXPRESSION_LENGTH", "MAX_INTEGER_BITS", "evaluate"]

MAX_EXPRESSION_LENGTH = 1000
# About 1,200 decimal digits: far beyond any honest use, and cheap to compute and print.
MAX_INTEGER_BITS = 4096

Number = int | float


def _check_size(value: Number) -> Number:
    if isinstance(value, int) and value.bit_length() > MAX_INTEGER_BITS:
        raise CalculatorError(f"result too large (more than {MAX_INTEGER_BITS} bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not a finite number")
    return value


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        # |base ** exponent| has at most bit_length(base) * exponent bits: check before computing.
        if abs(base) > 1 and (abs(base).bit_length() - 1) * exponent > MAX_INTEGER_BITS:
            raise CalculatorError(f"result too large (more than {MAX_INTEGER_BITS} bits)")
        return int(base**exponent)
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero")
    try:
        result: Any = float(base) ** float(exponent)
    except OverflowError as e:
        raise CalculatorError("result too large") from e
    if isinstance(result, complex):
        raise CalculatorError("result is not a real number")
    return float(result)


def _binary(op: ast.operator, left: Number, right: Number) -> Number:
    try:
        if isinstance(op, ast.Add):
            return left + right
        if isinstance(op, ast.Sub):
            return left - right
        if isinstance(op, ast.Mult):
            return left * right
        if isinstance(op, ast.Div):
            return left / right
        if isinstance(op, ast.FloorDiv):
            return left // right
        if isinstance(op, ast.Mod):
            return left % right
        if isinstance(op, ast.Pow):
            return _power(left, right)
    except ZeroDivisionError as e:
        raise CalculatorError("division by zero") from e
    except OverflowError as e:
        raise CalculatorError("result too large") from e
    raise CalculatorError(f"operator {type(op).__name__} is not allowed")


def _walk(node: ast.AST) -> Number:
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant):
        # bool is an int subclass; True + True is not arithmetic anyone asked for.
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise CalculatorError(f"only numbers are allowed, not {node.value!r}")
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        operand = _walk(node.operand)
        return operand if isinstance(node.op, ast.UAdd) else -operand
    if isinstance(node, ast.BinOp):
        return _check_size(_binary(node.op, _walk(node.left), _walk(node.right)))
    raise CalculatorError(f"{type(node).__name__} is not allowed in an expression")


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression, or ``CalculatorError`` saying why not."""
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as e:
        raise CalculatorError(
            f"not an arithmetic expression: {e.msg if isinstance(e, SyntaxError) else e}"
        ) from e
    except RecursionError as e:  # deeply nested parentheses
        raise CalculatorError("expression nested too deeply") from e
    try:
        return _walk(tree)
    except RecursionError as e:
        raise CalculatorError("expression nested too deeply") from e

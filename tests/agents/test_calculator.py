"""The built-in calculator: arithmetic by walking the syntax tree, everything else refused."""

import pytest

from kimi_jax.agents.tools import calculate, calculator


@pytest.mark.parametrize("expression, value", [
    ("(17 + 25) * 3 / 7", "18"), ("2 ** 10", "1024"), ("2^10", "1024"), ("1 / 3", "0.333333333333"),
    ("-7 // 2", "-4"), ("17 % 5", "2"), ("sqrt(16) + abs(-2)", "6"), ("round(pi, 3)", "3.142"),
    ("max(3, 9, 4) - min(2, 8)", "7"), ("factorial(20)", "2432902008176640000"), ("12345678901234567890 * 10", "123456789012345678900"),
])
def test_values(expression, value):
    assert calculator(expression=expression) == value


@pytest.mark.parametrize("expression, error", [
    ("__import__('os').system('true')", "unsupported"), ("(1).__class__", "unsupported"), ("'a' * 3", "unsupported"),
    ("x + 1", "unsupported"), ("[1, 2]", "unsupported"), ("9 ** 9 ** 9", "digits"), ("factorial(10000)", "digits"),
    ("1 / 0", "division by zero"), ("sqrt(-1)", "math error"), ("2 +", "not an arithmetic expression"),
    ("1" * 1001, "longer than"), ("10.0 ** 400", "range"),
])
def test_refusals(expression, error):
    with pytest.raises(ValueError, match=error):
        calculate(expression)


def test_declaration():
    function = calculator.schema["function"]
    assert function["name"] == "calculator"
    assert function["parameters"]["required"] == ["expression"]
    assert function["parameters"]["properties"]["expression"]["type"] == "string"
    assert calculator.validate({"expression": 3}) == "expression: 3 is not of type 'string'"
    assert "'expression' is a required property" in calculator.validate({})

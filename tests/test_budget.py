import math

import numpy as np
import pytest

from vtc import parse_budget, resolve_budget, validate_budget


@pytest.mark.parametrize("bad", [0, -1, -64, 0.0, -0.5, 1.5, 2.0, math.nan, math.inf, -math.inf])
def test_bad_values_raise_value_error_naming_the_forms(bad):
    with pytest.raises(ValueError, match="int >= 1.*float in \\(0, 1\\]"):
        validate_budget(bad)


@pytest.mark.parametrize("bad", [True, False, "64", None, [64], (0.5,), object()])
def test_bad_types_raise_type_error(bad):
    with pytest.raises(TypeError, match="budget must be"):
        validate_budget(bad)


def test_ratio_above_one_suggests_an_int():
    with pytest.raises(ValueError, match="pass an int"):
        validate_budget(64.0)


@pytest.mark.parametrize(
    "budget, n, expected",
    [(64, 576, 64), (576, 576, 576), (1000, 576, 576), (1, 576, 1), (1.0, 576, 576), (0.5, 576, 288),
     (0.111, 576, 64), (0.0001, 576, 1), (np.int64(8), 16, 8), (np.float32(0.25), 16, 4),
     # Python round is half-to-even, as the reference code: 0.125 * 20 = 2.5 -> 2, 0.175 * 10 = 1.75 -> 2
     (0.125, 20, 2), (0.25, 10, 2)],
)
def test_resolve(budget, n, expected):
    assert resolve_budget(budget, n) == expected


def test_int_one_and_float_one_differ():
    assert resolve_budget(1, 100) == 1 and resolve_budget(1.0, 100) == 100


@pytest.mark.parametrize("text, expected", [("64", 64), (" 0.25 ", 0.25), ("1.0", 1.0), ("1", 1), ("25%", 0.25), ("1e-1", 0.1)])
def test_parse(text, expected):
    value = parse_budget(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text", ["abc", "", "0", "-3", "1.5", "nan"])
def test_parse_rejects(text):
    with pytest.raises(ValueError):
        parse_budget(text)


def test_describe_budget_reads_as_a_person_would():
    from vtc.budget import describe_budget

    assert describe_budget(0.25, 196) == "25 % of 196 = 49 tokens per image"
    assert describe_budget(1.0, 196) == "100 % of 196 = 196 tokens per image"  # not "budget 1 = 196 tokens"
    assert describe_budget(64, 196) == "64 tokens per image"
    assert describe_budget(300, 196) == "300 tokens per image (the image has 196: all kept)"  # capped, and said
    assert describe_budget(0.25, 1568, "video") == "25 % of 1568 = 392 tokens per video"
    with pytest.raises(ValueError):
        describe_budget(0, 196)

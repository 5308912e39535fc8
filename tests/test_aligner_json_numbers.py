"""The compiled JSON number conversion (aligner/json_numbers.py) against Python's `float` and
msgspec, bit for bit: every number it converts equals both; the ones it leaves to the
fallback are exactly the kinds the module names; what is not a JSON number is INVALID."""
import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specialize.aligner.json_numbers import FALLBACK, INVALID, OK, parse_numbers

_FLOATS = msgspec.json.Decoder(list[float])


def check_against_references(texts):
    values, status = parse_numbers(texts)
    ref = np.array([float(t) for t in texts], np.float64)
    ok = status == OK
    finite = np.isfinite(ref)  # msgspec refuses what overflows (1e309); those stay with the fallback
    assert not (ok & ~finite).any()
    via_msgspec = np.full(len(texts), np.nan)
    via_msgspec[finite] = _FLOATS.decode(("[" + ",".join(np.array(texts)[finite]) + "]").encode())
    np.testing.assert_array_equal(values[ok].view(np.int64), ref[ok].view(np.int64))
    np.testing.assert_array_equal(values[ok].view(np.int64), via_msgspec[ok].view(np.int64))
    assert (status != INVALID).all()
    return status


@settings(max_examples=400, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=50))
def test_repr_of_doubles(xs):
    texts = [repr(x) for x in xs]
    status = check_against_references(texts)
    # only zeros, subnormals (below 2.2250738585072014e-308) and 16+ digit ints are left over
    for x, s in zip(xs, status):
        assert s == OK or x == 0 or abs(x) < 2.2250738585072014e-308 or "e" not in repr(x) and "." not in repr(x)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False, max_value=0), min_size=1, max_size=50))
def test_repr_of_float32_logprobs(xs):  # what an HF teacher writes: float32 values as Python floats
    status = check_against_references([repr(x) for x in xs])
    assert all(s == OK for x, s in zip(xs, status) if x != 0 and abs(x) >= 2.2250738585072014e-308)


json_decimal = st.builds(
    lambda sign, int_digits, frac, exp: sign + int_digits + frac + exp,
    st.sampled_from(["", "-"]),
    st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,24}", fullmatch=True)),
    st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,25}", fullmatch=True)),
    st.one_of(st.just(""), st.builds(lambda e, s, n: e + s + str(n), st.sampled_from("eE"), st.sampled_from(["", "+", "-"]),
                                     st.integers(0, 400))))


@settings(max_examples=500, deadline=None)
@given(st.lists(json_decimal, min_size=1, max_size=40))
def test_json_decimal_strings(texts):
    status = check_against_references(texts)
    assert set(status.tolist()) <= {OK, FALLBACK}


@pytest.mark.parametrize("text", [
    "0.1", "-0.0031282704", "-0.31326165795326233", "1e23", "-8.988465674311579e307", "1.7976931348623157e308",
    "9007199254740993.0",   # 2^53 + 1: exactly halfway, rounds to even
    "9007199254740995.0",   # 2^53 + 3: halfway, rounds up to even
    "2.2250738585072014e-308",  # the smallest normal double
    "7.2057594037927933e16", "123456789012345678e-5", "-1E+2", "-2.5e-3", "0.000001", "1e-22", "1e22",
])
def test_hard_cases_converted_exactly(text):
    (value,), (status,) = parse_numbers([text])
    assert status == OK and value.tobytes() == np.float64(float(text)).tobytes()


@pytest.mark.parametrize("text", ["0", "-0", "-0.0", "0e5", "-1e-400", "4.9e-324", "2.2250738585072011e-308",
                                  "1e309", "-12345678901234567890123", "1234567890123456", "-0.12345678901234567890"])
def test_left_to_the_fallback(text):
    assert parse_numbers([text])[1].tolist() == [FALLBACK]


@pytest.mark.parametrize("text", ["", "-", "01", "-01", "1.", ".5", "--1", "1e", "1e+", "+1", "1.e3", "0x1", "NaN", "1-2"])
def test_not_json_numbers(text):
    assert parse_numbers([text])[1].tolist() == [INVALID]

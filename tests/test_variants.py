import pytest
from hypothesis import given, strategies as st

from pipeline.variants import POOLINGS, SpecError, Variant, make_variants, parse_layers, parse_poolings


@pytest.mark.parametrize("spec, expected", [
    ("0", [0]), (3, [3]), ("-1", [30]), ("-31", [0]), ("50%", [15]), ("100%", [30]), ("0%", [0]),
    ("8:12", [8, 9, 10, 11, 12]), ("-3:-1", [28, 29, 30]), ("25%:30%", [8, 9]), (":2", [0, 1, 2]),
    ("28:", [28, 29, 30]), ("all", list(range(31))), ("5,1,5,-1", [1, 5, 30]), ([3, "50%"], [3, 15]),
])
def test_layer_specs(spec, expected):
    assert parse_layers(spec, 30) == expected


@pytest.mark.parametrize("spec, fragment", [
    ("31", "out of range"), ("-32", "out of range"), ("abc", "expected an integer"), ("120%", "percentage"),
    ("10:5", "empty"), ("", "empty layer spec"), ([], "empty layer spec"), ("1:2:3", "expected 'a:b'"),
])
def test_bad_layer_specs_name_the_problem(spec, fragment):
    with pytest.raises(SpecError, match=fragment):
        parse_layers(spec, 30)


def test_out_of_range_message_gives_the_depth():
    with pytest.raises(SpecError, match=r"layers 0\.\.30"):
        parse_layers(40, 30)


def test_poolings():
    assert parse_poolings("mean, last,mean") == ["mean", "last"]
    with pytest.raises(SpecError, match="unknown pooling 'avg'"):
        parse_poolings("mean,avg")
    with pytest.raises(SpecError, match="empty pooling list"):
        parse_poolings([])


def test_variant_names_and_columns_round_trip():
    vs = make_variants("15,-1", "mean_nosink,last", 30)
    assert [v.name for v in vs] == ["L15.mean_nosink", "L15.last", "L30.mean_nosink", "L30.last"]
    assert vs[0].column == "emb_15_mean_nosink"
    for v in vs:
        assert Variant.parse(v.name) == v == Variant.parse(v.column)
    with pytest.raises(SpecError):
        Variant.parse("L15.avg")


@given(n=st.integers(1, 80), a=st.integers(-200, 200), b=st.integers(-200, 200))
def test_layer_parser_properties(n, a, b):
    """Any accepted spec resolves inside 0..n; negatives mirror positives; ranges are inclusive."""
    for tok in (a, f"{a}:{b}"):
        try:
            got = parse_layers(str(tok), n)
        except SpecError:
            continue
        assert got == sorted(set(got)) and all(0 <= x <= n for x in got)
    if 0 <= a <= n:
        assert parse_layers(str(a - n - 1), n) == [a]
        if 0 <= b <= n and a <= b:
            assert parse_layers(f"{a}:{b}", n) == list(range(a, b + 1))


@given(st.lists(st.sampled_from(POOLINGS), min_size=1))
def test_pooling_lists_keep_order_without_duplicates(names):
    assert parse_poolings(names) == list(dict.fromkeys(names))

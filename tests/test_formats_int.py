import math

import pytest
import torch

from mixbits.errors import FormatError
from mixbits.formats import IntFormat, parse_format
from mixbits.formats import CLIP_GRID
from mixbits.solvers import round_to_nearest
from mixbits.solvers.rtn import magnitude_importance


@pytest.mark.parametrize("name", ["int4:g128:asym", "int3:g64:sym", "int8:ch:sym", "int2:tensor:asym",
                                  "int5:g7:sym", "int4:g64:asym:scale=bf16", "int8:ch:sym:scale=fp32"])
def test_format_string_round_trips(name):
    assert str(parse_format(name)) == name
    assert parse_format(str(parse_format(name))) == parse_format(name)


def test_a_spelled_out_default_prints_back_and_equals_the_short_form():
    assert str(parse_format("int4:g64:asym:scale=fp16")) == "int4:g64:asym:scale=fp16"
    assert parse_format("int4:g64:asym:scale=fp16") == parse_format("int4:g64:asym")


@pytest.mark.parametrize("name, message", [
    ("int9:g64:asym", "1 to 8 bits"),
    ("int0:g64:sym", "1 to 8 bits"),
    ("int4:g0:asym", "group size must be 1 to 65536"),
    ("int4:g-3:asym", "group size must be 1 to 65536"),
    ("int4:g3000000000000:asym", "group size must be 1 to 65536"),
    ("int4:g64", "needs a granularity and sym|asym"),
    ("int4:g64:both", "expected sym or asym"),
    ("int4:block:sym", "unknown granularity"),
    ("int4:g64:sym:scale=fp8", "unknown scale dtype"),
    ("int4:g64:sym:zero=2", "unknown option"),
    ("itn4:g64:asym", "did you mean"),
])
def test_bad_format_strings_are_rejected(name, message):
    with pytest.raises(FormatError, match=message):
        parse_format(name)


def test_bits_count_partial_groups_exactly():
    fmt = parse_format("int4:g128:asym")
    # 576 = 4 * 128 + 64: five groups per row, the last one partial.
    assert fmt.bits(576, 576) == 576 * 576 * 4 + 576 * 5 * (16 + 4)
    assert fmt.bits_per_weight(576, 576) == pytest.approx(4 + 5 * 20 / 576)
    assert parse_format("int3:g64:sym").bits(192, 576) == 192 * 576 * 3 + 192 * 9 * 16
    assert parse_format("int8:ch:sym").bits(10, 20) == 200 * 8 + 10 * 16
    assert parse_format("int8:tensor:asym:scale=fp32").bits(10, 20) == 200 * 8 + 32 + 8


def test_symmetric_maps_the_largest_magnitude_to_the_most_negative_code():
    fmt = parse_format("int4:ch:sym")
    weight = torch.tensor([[1.0, -2.0, 0.5, 0.25], [3.0, 1.5, -0.375, 0.0]])
    q = fmt.quantize(weight)
    # Row 0: extreme -2 -> scale 0.25; row 1: extreme 3 -> scale -0.375.
    assert q.params["scale"].flatten().tolist() == [0.25, -0.375]
    assert q.codes.flatten().tolist() == [4, -8, 2, 1, -8, -4, 1, 0]
    assert torch.equal(q.dequantize(), weight)


def test_rounding_ties_go_to_even():
    q = parse_format("int4:ch:sym").quantize(torch.tensor([[-8.0, 2.5, 0.5, -1.5]]))
    assert q.params["scale"].item() == 1.0
    assert q.codes.flatten().tolist() == [-8, 2, 0, -2]


def test_asymmetric_codes_and_zero_point():
    fmt = parse_format("int2:ch:asym")
    q = fmt.quantize(torch.tensor([[-1.0, 0.0, 1.0, 2.0], [0.5, 1.0, 1.5, 3.0]]))
    assert q.params["scale"].flatten().tolist() == [1.0, 1.0]
    assert q.params["zero"].flatten().tolist() == [1, 0]  # row 1's range is widened down to 0
    assert q.codes.flatten().tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # 0.5 -> 0 (tie to even), 1.5 -> 2
    assert q.dequantize().flatten().tolist() == [-1.0, 0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 3.0]


def test_partial_last_group_is_quantized_on_its_own():
    fmt = parse_format("int4:g3:sym")
    weight = torch.tensor([[1.0, 2.0, -4.0, 100.0]])
    q = fmt.quantize(weight)
    assert q.codes.shape == (1, 2, 3)
    assert q.params["scale"].flatten().tolist() == [0.5, -12.5]
    assert torch.equal(q.dequantize(), weight)


def test_scales_are_stored_exactly_in_their_dtype():
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(0))
    for scale in ("fp16", "bf16"):
        q = round_to_nearest(weight, parse_format(f"int4:g32:asym:scale={scale}"))
        dtype = torch.float16 if scale == "fp16" else torch.bfloat16
        assert torch.equal(q.params["scale"].to(dtype).float(), q.params["scale"])


def test_all_zero_group_stays_zero():
    q = round_to_nearest(torch.zeros(2, 8), parse_format("int3:g4:asym"))
    assert torch.equal(q.dequantize(), torch.zeros(2, 8))


@pytest.mark.parametrize("name", ["int2:g16:asym", "int3:g16:sym", "int4:g32:asym", "int8:ch:sym"])
def test_codes_stay_in_range_and_error_shrinks_with_bits(name):
    weight = torch.randn(32, 80, generator=torch.Generator().manual_seed(1))
    fmt = parse_format(name)
    q = round_to_nearest(weight, fmt)
    low, high = fmt.code_range
    assert q.codes.min() >= low and q.codes.max() <= high
    relative = ((q.dequantize() - weight).norm() / weight.norm()).item()
    # Uniform quantization of a Gaussian: error about range / 2^bits; generous bound.
    assert relative < 3.0 / 2 ** fmt.bits_per_code


def test_clip_search_never_hurts_and_helps_with_outliers():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(64, 128, generator=gen)
    weight[:, ::16] *= 6  # one outlier per group of 16
    ones = torch.ones_like(weight)
    for name in ("int3:g16:asym", "int3:g16:sym", "int4:ch:sym"):
        fmt = parse_format(name)
        plain = (round_to_nearest(weight, fmt, clip_search=False).dequantize() - weight).square().sum()
        searched = (round_to_nearest(weight, fmt, clip_search=True, importance=ones).dequantize() - weight).square().sum()
        assert searched < 0.95 * plain, name


def test_default_search_minimises_magnitude_weighted_error():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    importance = magnitude_importance(weight)
    fmt = parse_format("int3:g16:sym")

    def weighted(q):
        return ((q.dequantize() - weight).square() * importance).sum()

    default = round_to_nearest(weight, fmt)
    assert torch.equal(default.codes, round_to_nearest(weight, fmt, importance=importance).codes)
    assert weighted(default) < 0.97 * weighted(round_to_nearest(weight, fmt, clip_search=False))
    # Weighting protects large weights: the largest weight of each row is kept better than by plain MSE.
    plain_mse = round_to_nearest(weight, fmt, importance=torch.ones_like(weight))
    top = weight.abs().argmax(dim=1, keepdim=True)
    error_at_top = lambda q: (q.dequantize() - weight).gather(1, top).abs().mean()
    assert error_at_top(default) < error_at_top(plain_mse)


def test_clip_search_picks_the_best_ratio_per_group_on_real_values_only():
    # Rows of 6 in groups of 4: the last group holds 2 real values and 2 padded
    # copies of the last one, which must not weigh in the search.
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(200, 6, generator=gen)
    weight[:, 5] *= 5
    fmt = parse_format("int2:g4:asym")
    searched = (round_to_nearest(weight, fmt, importance=torch.ones_like(weight)).dequantize() - weight).square()
    for start, stop in ((0, 4), (4, 6)):
        part = weight[:, start:stop]
        best = torch.stack([
            (parse_format("int2:ch:asym").quantize(part, clip).dequantize() - part).square().sum(1)
            for clip in CLIP_GRID
        ]).amin(0)
        assert torch.allclose(searched[:, start:stop].sum(1), best, rtol=1e-5, atol=1e-7)


def test_int_format_is_hashable_value_object():
    assert parse_format("int4:g64:asym") == IntFormat(4, False, parse_format("int4:g64:asym").granularity)
    assert len({parse_format("int4:g64:asym"), parse_format("int4:g64:asym")}) == 1
    assert math.isclose(parse_format("int4:g64:sym").bits_per_weight(1, 64), 4.25)

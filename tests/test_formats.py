"""The format registry: names, exact bits, and element types checked against ml_dtypes."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixbits.errors import FormatError
from mixbits.formats import catalog, parse_format
from mixbits.formats.elements import E2M1, E2M3, E3M2, E4M3, E5M2, minifloat
from mixbits.formats.granularity import to_groups, ungroup
from mixbits.formats.lut import normal_float_levels
from mixbits.formats.scales import scale_codec
from mixbits.solvers import round_to_nearest

ALL = [str(f) for group in (16, 64) for f in catalog(group)]
ML_DTYPES = [
    (E4M3, ml_dtypes.float8_e4m3fn),
    (E5M2, ml_dtypes.float8_e5m2),
    (E3M2, ml_dtypes.float6_e3m2fn),
    (E2M3, ml_dtypes.float6_e2m3fn),
    (E2M1, ml_dtypes.float4_e2m1fn),
]


def ml_round(values: np.ndarray, dtype) -> np.ndarray:
    return values.astype(np.float32).astype(dtype).astype(np.float64)


@pytest.mark.parametrize("name", ALL + ["fp4_e2m1:g32:scale=fp16", "fp8_e4m3:ch:bias=8:specials=ieee",
                                        "int4:g64:sym:scale=i8", "lut3:ch:table=bf16", "fp6_e3m2:tensor:scale=e8m0"])
def test_every_format_string_round_trips(name):
    fmt = parse_format(name)
    assert str(fmt) == name
    assert parse_format(str(fmt)) == fmt


def test_presets_equal_their_spelled_out_forms():
    assert parse_format("nvfp4") == parse_format("fp4_e2m1:g16:scale=e4m3")
    assert parse_format("nvint4") == parse_format("int4:g16:sym:scale=e4m3")


@pytest.mark.parametrize("name, message", [
    ("nvfp4:g32", "fixed preset"),
    ("mxfp4:g16", "fixed blocks of 32"),
    ("mxfp5", "unknown MX format"),
    ("fp4_e2m2:g32", "is not 4"),
    ("fp8_e4m3:g32:specials=odd", "special-value convention"),
    ("fp8_e4m3:g32:bias=x", "bias must be an integer"),
    ("nf3:g64", "NormalFloat is defined for 4 bits"),
    ("lut9:g64", "1 to 8 bits"),
    ("ternary", "write binary:g64 or ternary:g64"),
    ("int4:g64:asym:scale=fp12", "unknown scale dtype"),
    ("mxfp44", "unknown MX format"),
    ("nvpf4", "did you mean"),
])
def test_invalid_names_are_rejected_with_a_hint(name, message):
    with pytest.raises(FormatError, match=message):
        parse_format(name)


def test_unknown_name_lists_close_valid_names():
    with pytest.raises(FormatError) as error:
        parse_format("mxfp3")
    assert "mxfp4" in str(error.value)


# --- Minifloat element types against ml_dtypes ---------------------------------------------------


@pytest.mark.parametrize("element, dtype", ML_DTYPES, ids=lambda v: getattr(v, "name", str(v)))
def test_every_bit_pattern_has_the_ml_dtypes_value(element, dtype):
    patterns = np.arange(1 << element.width, dtype=np.uint8)
    expected = patterns.view(dtype).astype(np.float64)
    ours = element.table.double().numpy()
    np.testing.assert_array_equal(ours, expected)  # NaN == NaN and inf == inf for this assert


@pytest.mark.parametrize("element, dtype", ML_DTYPES, ids=lambda v: getattr(v, "name", str(v)))
def test_rounding_matches_ml_dtypes_at_every_tie_and_between(element, dtype):
    positive = element.positive.double()
    midpoints = ((positive[1:] + positive[:-1]) / 2).numpy().astype(np.float32)
    near = np.concatenate([midpoints, np.nextafter(midpoints, np.float32(np.inf)),
                           np.nextafter(midpoints, np.float32(-np.inf)), positive.numpy().astype(np.float32)])
    rng = np.random.default_rng(0)
    dense = (rng.uniform(-1, 1, 20000) * element.max).astype(np.float32)
    for sample in (near, -near, dense):
        ours = element.decode(element.encode(torch.from_numpy(sample))).double().numpy()
        np.testing.assert_array_equal(ours, ml_round(sample, dtype))


@pytest.mark.parametrize("element, dtype", ML_DTYPES, ids=lambda v: getattr(v, "name", str(v)))
def test_out_of_range_values_saturate(element, dtype):
    big = np.array([element.max * 1.5, element.max * 1e3, 3e38], dtype=np.float32)
    ours = element.decode(element.encode(torch.from_numpy(np.concatenate([big, -big]))))
    assert ours.tolist() == [element.max] * 3 + [-element.max] * 3
    if dtype in (ml_dtypes.float6_e3m2fn, ml_dtypes.float6_e2m3fn, ml_dtypes.float4_e2m1fn):
        np.testing.assert_array_equal(ml_round(big, dtype), [element.max] * 3)  # ml_dtypes saturates these too


@pytest.mark.parametrize("element, torch_dtype", [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)])
def test_rounding_matches_torch_float8(element, torch_dtype):
    values = torch.randn(50000, generator=torch.Generator().manual_seed(1)) * element.max / 4
    values = values.clamp(-element.max, element.max)
    assert torch.equal(element.decode(element.encode(values)), values.to(torch_dtype).float())


def test_custom_bias_and_specials():
    shifted = minifloat(4, 3, bias=8)
    assert shifted.max == E4M3.max / 2
    ieee = minifloat(4, 3, specials="ieee")
    assert ieee.max == 240.0 and math.isinf(ieee.value_of(0b0_1111_000))
    assert minifloat(4, 3, specials="none").max == 480.0


def test_max_exponent_is_the_spec_emax():
    assert [e.max_exponent for e in (E4M3, E5M2, E3M2, E2M3, E2M1)] == [8, 15, 4, 2, 2]


# --- Scale codecs -------------------------------------------------------------------------------


def test_e8m0_scales_match_ml_dtypes():
    values = np.concatenate([2.0 ** np.arange(-20, 20), 1.5 * 2.0 ** np.arange(-20, 20),
                             np.random.default_rng(2).uniform(1e-6, 1e6, 2000)]).astype(np.float32)
    ours = scale_codec("e8m0").round(torch.from_numpy(values)).double().numpy()
    np.testing.assert_array_equal(ours, ml_round(values, ml_dtypes.float8_e8m0fnu))


def test_cast_scales_match_their_dtypes():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(3)) * 0.01
    assert torch.equal(scale_codec("fp16").round(values), values.half().float())
    assert torch.equal(scale_codec("bf16").round(values), values.bfloat16().float())


def test_e4m3_scales_sit_on_the_e4m3_grid_under_one_tensor_scale():
    scales = torch.rand(8, 5, 1, generator=torch.Generator().manual_seed(4)) * 0.05
    rounded = scale_codec("e4m3").round(scales)
    tensor_scale = scales.abs().max() / 448
    ratio = (rounded / tensor_scale).double().numpy()
    np.testing.assert_allclose(ratio, ml_round(ratio, ml_dtypes.float8_e4m3fn), rtol=1e-6)
    assert rounded.abs().max().item() == pytest.approx(scales.abs().max().item(), rel=1e-6)


def test_int8_scales_are_integer_steps_of_a_row_scale():
    scales = torch.randn(4, 9, 1, generator=torch.Generator().manual_seed(5))
    rounded = scale_codec("i8").round(scales)
    row = (scales.abs().amax(dim=(1, 2), keepdim=True) / 127).half().float()
    steps = rounded / row
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 127


# --- Exact bits --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("mxfp4", 1536 * 576 * 4 + 1536 * 18 * 8),
    ("mxint8", 1536 * 576 * 8 + 1536 * 18 * 8),
    ("nvfp4", 1536 * 576 * 4 + 1536 * 36 * 8 + 32),
    ("fp4_e2m1:g32:scale=fp16", 1536 * 576 * 4 + 1536 * 18 * 16),
    ("nf4:g64", 1536 * 576 * 4 + 1536 * 9 * 16),
    ("lut4:g128", 1536 * 576 * 4 + 1536 * 5 * 16 * 16),
    ("lut3:ch", 1536 * 576 * 3 + 1536 * 8 * 16),
    ("ternary:g64", 1536 * 576 * 2 + 1536 * 9 * 16),
    ("binary:ch", 1536 * 576 * 1 + 1536 * 16),
    ("int4:g64:sym:scale=i8", 1536 * 576 * 4 + 1536 * 9 * 8 + 1536 * 16),
    ("int4:g64:asym:scale=e8m0", 1536 * 576 * 4 + 1536 * 9 * (8 + 4)),
    ("fp8_e4m3:tensor:scale=fp32", 1536 * 576 * 8 + 32),
])
def test_exact_bits(name, expected):
    assert parse_format(name).bits(1536, 576) == expected


def test_partial_mx_block_is_counted():
    assert parse_format("mxfp4").bits(2, 40) == 2 * 40 * 4 + 2 * 2 * 8


# --- Format-specific numerics ---------------------------------------------------------------------


def test_mx_scale_follows_the_spec_and_elements_round_to_even():
    fmt = parse_format("mxfp4")
    block = torch.tensor([[5.0, -3.0, 0.25, 7.5] + [0.0] * 28])
    q = fmt.quantize(block)
    assert q.params["scale"].item() == 1.0  # 2^(floor(log2 7.5) - 2)
    assert q.dequantize()[0, :4].tolist() == [4.0, -3.0, 0.0, 6.0]  # 5 ties to 4 (even), 0.25 ties to 0, 7.5 saturates
    tiny = torch.full((1, 32), 3e-3)
    assert parse_format("mxint8").quantize(tiny).params["scale"].item() == 2.0**-9


def test_nf4_levels_are_qlora_normal_float():
    levels = normal_float_levels(4)
    assert len(levels) == 16 and levels[0] == -1.0 and levels[-1] == 1.0 and 0.0 in levels
    assert levels[1] == pytest.approx(-0.6961928, abs=1e-6)
    assert levels[8] == pytest.approx(0.0795803, abs=1e-6)
    assert levels[14] == pytest.approx(0.7229568, abs=1e-6)


def test_learned_table_recovers_a_small_alphabet_exactly():
    alphabet = torch.tensor([-0.5, -0.125, 0.0625, 0.75])  # exact in fp16
    index = torch.randint(0, 4, (64, 128), generator=torch.Generator().manual_seed(6))
    weight = alphabet[index]
    q = round_to_nearest(weight, parse_format("lut2:g128"))
    assert torch.equal(q.dequantize(), weight)


def test_importance_pulls_learned_levels_toward_important_weights():
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(32, 64, generator=gen)
    importance = torch.ones_like(weight)
    importance[:, 0] = 1000.0
    fmt = parse_format("lut2:ch")
    plain = (round_to_nearest(weight, fmt).dequantize() - weight)[:, 0].abs().mean()
    weighted = (round_to_nearest(weight, fmt, importance=importance).dequantize() - weight)[:, 0].abs().mean()
    assert weighted < 0.2 * plain


def test_binary_scale_is_the_mean_magnitude():
    weight = torch.tensor([[1.0, -3.0, 0.5, -0.5]])
    q = parse_format("binary:ch").quantize(weight)
    assert q.params["scale"].item() == 1.25
    assert q.dequantize().tolist() == [[1.25, -1.25, 1.25, -1.25]]


def test_ternary_search_finds_a_zero_band():
    weight = torch.randn(16, 256, generator=torch.Generator().manual_seed(8))
    q = round_to_nearest(weight, parse_format("ternary:ch"))
    zeros = (q.dequantize() == 0).float().mean().item()
    assert 0.2 < zeros < 0.6  # MSE-optimal ternary zeroes roughly a third of Gaussian weights


def test_nvfp4_and_nvint4_share_the_scaling_and_differ_in_elements():
    weight = torch.randn(64, 576, generator=torch.Generator().manual_seed(9))
    fp = parse_format("nvfp4").quantize(weight)
    integer = parse_format("nvint4").quantize(weight)
    assert fp.codes.shape == integer.codes.shape == (64, 36, 16)
    assert set(E2M1.decode(fp.codes).abs().unique().tolist()) <= {0, .5, 1, 1.5, 2, 3, 4, 6}
    assert integer.codes.min() >= -8 and integer.codes.max() <= 7
    # Each block's largest magnitude lands on the element grid's top (6 for FP4, 8 for INT4) up to E4M3 scale rounding.
    block_max = weight.reshape(64, 36, 16).abs().amax(-1)
    assert torch.allclose(fp.params["scale"].squeeze(-1).abs() * 6, block_max, rtol=0.07)
    assert torch.allclose(integer.params["scale"].squeeze(-1).abs() * 8, block_max, rtol=0.07)


# --- Properties of every format -----------------------------------------------------------------


@pytest.mark.parametrize("name", [str(f) for f in catalog(16)])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_quantize_is_an_idempotent_monotone_projection(name, data):
    fmt = parse_format(name)
    rows = data.draw(st.integers(1, 4))
    # Whole vectors: a vector that runs past the row's end is coded with the padding, which re-encoding the
    # decoded row pads differently.
    cols = data.draw(st.integers(1, 40 // fmt.vector_size)) * fmt.vector_size
    seed = data.draw(st.integers(0, 2**31 - 1))
    scale = data.draw(st.sampled_from([1e-3, 1.0, 30.0]))
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    q = round_to_nearest(weight, fmt)
    grouped = to_groups(q.dequantize(), fmt.granularity)
    # Projection: re-encoding the dequantized values under the same parameters changes nothing (not for residual
    # codebooks, whose greedy stages may code a sum of codewords another way).
    if getattr(fmt, "stages", 1) == 1:
        again = fmt.decode(fmt.encode(grouped.values, q.params), q.params)
        if fmt.vector_size > 1:
            # A codebook learned from fewer vectors than it has codewords holds near-duplicates (1e-4 of the scale
            # apart): dividing a decoded vector by its scale may then land nearer the twin, which decodes alike.
            torch.testing.assert_close(ungroup(again, q.shape), q.dequantize(), rtol=1e-3, atol=1e-3 * scale)
        else:
            assert torch.equal(ungroup(again, q.shape), q.dequantize())
    if fmt.vector_size > 1:
        return
    # Monotone: under fixed parameters, larger inputs never decode to smaller values.
    sweep = torch.linspace(-3, 3, grouped.values.shape[-1]) * weight.abs().max()
    probe = sweep.expand_as(grouped.values).contiguous()
    decoded = fmt.decode(fmt.encode(probe, q.params), q.params)
    assert (decoded[..., 1:] >= decoded[..., :-1]).all()

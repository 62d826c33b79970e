"""GPTQ on single layers with a known Hessian."""

import logging

import pytest
import torch

from mixbits.formats import parse_format
from mixbits.formats.elements import E4M3
from mixbits.formats.granularity import to_groups
from mixbits.solvers import GptqSettings, gptq, gptq_options, round_to_nearest
from mixbits.solvers.gptq import upper_inverse_cholesky
from mixbits.solvers.rtn import fit_affine_group, fit_params
from mixbits.solvers.rtn import output_error as output_error_of


def correlated_layer(rows=128, cols=256, seed=0):
    """A weight matrix and the Hessian of inputs with correlated channels of very different scales."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) * 0.1 + torch.eye(cols)
    x = torch.randn(2048, cols, generator=generator) @ mixing * (torch.rand(cols, generator=generator) * 3)
    weight = torch.randn(rows, cols, generator=generator) * 0.05
    return weight, x.T @ x / len(x)


def output_error(weight, approx, hessian):
    delta = weight - approx
    return float(((delta @ hessian) * delta).sum())


@pytest.mark.parametrize("name", ["int4:g64:asym", "int3:g32:asym", "int2:g64:asym", "nvfp4", "mxfp4", "nf4:g64",
                                  "fp4_e2m1:g32:scale=fp16", "int4:ch:sym", "lut3:g64", "int4:g64:sym:scale=i8"])
def test_gptq_beats_rtn_on_the_output_error(name):
    weight, hessian = correlated_layer()
    fmt = parse_format(name)
    rtn = output_error(weight, round_to_nearest(weight, fmt, hessian=hessian).dequantize(), hessian)
    solved = output_error(weight, gptq(weight, hessian, fmt).dequantize(), hessian)
    # Measured ratios are 0.35-0.55 on this layer; RTN here already uses the output-error clip search.
    assert solved < 0.7 * rtn


def test_act_order_helps_and_without_it_gptq_still_wins():
    weight, hessian = correlated_layer(seed=1)
    fmt = parse_format("int3:g64:asym")
    rtn = output_error(weight, round_to_nearest(weight, fmt, hessian=hessian).dequantize(), hessian)
    ordered = output_error(weight, gptq(weight, hessian, fmt).dequantize(), hessian)
    plain = output_error(weight, gptq(weight, hessian, fmt, settings=GptqSettings(act_order=False)).dequantize(), hessian)
    assert ordered < plain < rtn


@pytest.mark.parametrize("name", ["int3:g48:asym", "nvfp4", "nf4:g64", "lut3:g64", "fp8_e4m3:tensor", "mxfp4"])
def test_result_is_one_consistent_encoding(name):
    """Codes and stored parameters reproduce the weights GPTQ chose, with 100 columns (partial last groups)."""
    weight, hessian = correlated_layer(rows=64, cols=100)
    fmt = parse_format(name)
    quantized = gptq(weight, hessian, fmt)
    approx = quantized.dequantize()
    assert approx.shape == weight.shape
    grouped = to_groups(approx, fmt.granularity)
    # Projecting again under the stored parameters changes nothing: every value is on its group's grid.
    again = fmt.decode(fmt.encode(grouped.values, quantized.params), quantized.params)
    assert torch.equal(again, fmt.decode(quantized.codes, quantized.params))
    for key, value in quantized.params.items():
        assert value.shape[:2] == fmt.fit(to_groups(weight, fmt.granularity))[key].shape[:2]


def test_nvfp4_group_scales_share_one_tensor_scale():
    weight, hessian = correlated_layer()
    scales = gptq(weight, hessian, parse_format("nvfp4")).params["scale"]
    tensor_scale = scales.abs().amax() / 448
    ratio = scales / tensor_scale
    assert torch.equal(E4M3.decode(E4M3.encode(ratio)), ratio)


def test_non_positive_definite_hessian_gets_more_damping(caplog):
    weight, _ = correlated_layer(rows=16, cols=32)
    basis = torch.randn(32, 32, generator=torch.Generator().manual_seed(3))
    eigen = torch.ones(32)
    eigen[0] = -50.0  # strongly indefinite: 1% damping cannot fix it
    hessian = basis @ torch.diag(eigen) @ basis.T / 32 + torch.eye(32)
    with caplog.at_level(logging.WARNING, logger="mixbits.solvers.gptq"):
        quantized = gptq(weight, hessian, parse_format("int4:g16:asym"))
    assert "not positive definite" in caplog.text
    assert torch.isfinite(quantized.dequantize()).all()


def test_inverse_cholesky_factor():
    _, hessian = correlated_layer(rows=4, cols=48)
    upper = upper_inverse_cholesky(hessian.double(), 0.01)
    damped = hessian.double() + 0.01 * hessian.double().diagonal().mean() * torch.eye(48, dtype=torch.float64)
    assert torch.allclose(upper.T @ upper, torch.linalg.inv(damped), rtol=1e-8, atol=1e-10)
    assert torch.equal(upper, upper.triu())


def test_dead_inputs_get_zero_weights():
    weight, hessian = correlated_layer(rows=8, cols=64)
    hessian[5, :] = hessian[:, 5] = 0
    approx = gptq(weight, hessian, parse_format("int4:g16:sym")).dequantize()
    assert torch.all(approx[:, 5] == 0)


def test_hessian_shrunk_to_its_diagonal_is_rounding_under_per_input_importance():
    """At shrink 1 GPTQ has no cross-input terms to correct with: it is RTN under diag(H), bit for bit."""
    torch.manual_seed(0)
    weight = torch.randn(16, 128)
    inputs = torch.randn(512, 128) @ (0.3 * torch.randn(128, 128))
    hessian = inputs.T @ inputs / 512
    fmt = parse_format("int3:g32:asym")
    diagonal = torch.diag(hessian.diagonal())
    shrunk = gptq(weight, hessian, fmt, settings=GptqSettings(shrink=1.0)).dequantize()
    assert torch.equal(shrunk, round_to_nearest(weight, fmt, True, hessian=diagonal).dequantize())

    # On the Hessian it was given, full GPTQ beats half-shrunk, which beats diagonal-only.
    errors = [output_error(weight, gptq(weight, hessian, fmt, settings=GptqSettings(shrink=s)).dequantize(), hessian)
              for s in (0, 0.5, 1)]
    assert errors[0] < errors[1] < errors[2]
    with pytest.raises(ValueError):
        GptqSettings(shrink=1.5)


def test_options_solved_in_one_pass_equal_each_solved_alone():
    """Batched options share the Hessian's factor and the column loop; rows never mix, so each result is the
    single-format solve's bit for bit, integer options (rounded together) and others alike, in any order."""
    weight, hessian = correlated_layer(rows=48, cols=100)
    hessian[7, :] = hessian[:, 7] = 0  # a dead input
    names = ["lut3:ch", "int2:g32:asym", "int4:ch:asym", "nvfp4", "int3:g48:asym", "int4:g64:sym", "fp8_e4m3:tensor",
             "int5:g64:asym", "nf4:g64", "int3:g32:asym", "int4:g32:asym:scale=e8m0", "int2:g64:asym", "int8:g32:asym"]
    batched = gptq_options(weight, hessian, [parse_format(n) for n in names])
    for name, together in zip(names, batched):
        alone = gptq(weight, hessian, parse_format(name))
        assert together.format == alone.format, name
        assert torch.equal(together.codes, alone.codes), name
        assert together.params.keys() == alone.params.keys()
        assert all(torch.equal(together.params[k], alone.params[k]) for k in alone.params), name


@pytest.mark.parametrize("clip_search", [True, False])
def test_integer_formats_fitted_together_get_the_parameters_each_gets_alone(clip_search):
    """fit_affine_group over rows of several asymmetric integer formats: each format's parameters equal
    fit_params' for its rows alone (IntFormat.fit under the same clip search)."""
    weight, hessian = correlated_layer(rows=30, cols=40)
    formats = [parse_format(n) for n in ("int2:g40:asym", "int3:g40:asym", "int5:g40:asym", "int8:g40:asym")]
    parts = [weight * (k + 1) for k in range(len(formats))]  # different values per format
    grouped = to_groups(torch.cat(parts), formats[0].granularity)
    together = fit_affine_group(grouped, formats, output_error_of(hessian, grouped, formats[0]), clip_search)
    for fmt, part, found in zip(formats, parts, together):
        alone = to_groups(part, fmt.granularity)
        expected = fit_params(alone, fmt, torch.ones_like(alone.values), clip_search,
                              output_error_of(hessian, alone, fmt))
        assert found.keys() == expected.keys()
        assert all(torch.equal(found[k], expected[k]) for k in expected), fmt
        assert found["zero"].dtype == torch.uint8


def test_solve_options_splits_stacked_layers_and_passes(monkeypatch):
    """Layers sharing an input under several options, in passes of two options at most: as solved one by one."""
    import mixbits.solvers as solvers

    weight, hessian = correlated_layer(rows=40, cols=64)
    layers = [weight[:24], weight[24:]]
    formats = [parse_format(n) for n in ("int3:g32:asym", "nvfp4", "int4:ch:asym", "lut3:ch")] + [None]
    monkeypatch.setattr(solvers, "BATCH_ELEMENTS", 2 * weight.numel())
    found = solvers.solve_options(layers, formats, "gptq", hessian)
    for fmt, solved in zip(formats, found):
        expected = solvers.solve_many(layers, fmt, "gptq", hessian)
        assert len(solved) == 2
        for a, b in zip(solved, expected):
            assert (a is None and b is None) or torch.equal(a.dequantize(), b.dequantize())

"""Runtime modules compute what the fake-quantized weights compute, from the codes."""

import pytest
import torch

from mixbits.formats import parse_format
from mixbits.runtime import DequantLinear, IntLinear, VectorLinear, quantized_linear
from mixbits.runtime.kernels import native
from mixbits.solvers import gptq, round_to_nearest

KERNEL_FORMATS = ["q4_0", "q4_1", "q4_k", "q8_0", "int4:g128:asym", "int3:g64:asym", "int2:g32:sym", "int8:ch:sym",
                  "int5:g64:asym", "int4:g64:sym:scale=e8m0", "int6:g64:sym:scale=i8"]
OTHER_FORMATS = ["q6_k", "nvfp4", "mxfp4", "nf4:g64", "int4:g48:asym", "lut3:g64"]


def check(module, quantized, bias=None):
    weight = quantized.dequantize()
    for rows in (1, 3, 8, 20):  # the kernel's tiles of 1 to 4 rows, and the dequantize-then-multiply path
        x = torch.randn(2, rows, weight.shape[1])
        expected = x @ weight.T + (0 if bias is None else bias)
        got = module(x)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())


@pytest.mark.skipif(native() is None, reason="integer kernels unavailable (no compiler or no AVX2)")
@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_integer_kernel(fmt):
    torch.manual_seed(0)
    quantized = round_to_nearest(torch.randn(81, 512), parse_format(fmt))  # odd: decode takes weight rows in pairs
    bias = torch.randn(81)
    module = quantized_linear(quantized, bias)
    assert isinstance(module, IntLinear)
    assert torch.equal(module.weight_values(), quantized.dequantize())  # the stored weights, exactly
    check(module, quantized, bias)


@pytest.mark.parametrize("fmt", OTHER_FORMATS)
def test_dequantizing_path(fmt):
    torch.manual_seed(0)
    quantized = round_to_nearest(torch.randn(48, 192), parse_format(fmt))
    module = quantized_linear(quantized)
    assert isinstance(module, DequantLinear)
    check(module, quantized)


@pytest.mark.skipif(native() is None, reason="native kernels unavailable (no compiler or no AVX2)")
@pytest.mark.parametrize("fmt", ["vq2x6:ch", "vq4x8:g64", "vq2x4:g48", "vq4x10:ch", "vq8x8:g64:stages=2",
                                 "vq2x12:ch:stages=2"])
def test_vector_kernel(fmt):
    torch.manual_seed(0)
    weight = torch.randn(81, 200)  # 200 inputs: a partial last group, and vectors not a multiple of 8 per row
    inputs = torch.randn(400, 200)
    quantized = gptq(weight, inputs.T @ inputs / 400, parse_format(fmt))
    bias = torch.randn(81)
    module = quantized_linear(quantized, bias)
    assert isinstance(module, VectorLinear)
    assert torch.equal(module.weight_values(), quantized.dequantize())
    check(module, quantized, bias)

"""Integer-dot kernels: int8 activations times weight codes equal the float product of the two dequantized.

The oracle rounds the activations with the registry's own format (the
kernels must quantize exactly as it does), dequantizes both sides and
multiplies in float64; every instruction set this CPU runs is checked.
"""

import pytest
import torch

from mixbits.activations import fake_quantize, kernel_block, parse_activation
from mixbits.errors import FormatError
from mixbits.formats import parse_format
from mixbits.formats.granularity import ungroup
from mixbits.formats.lut import TableFormat
from mixbits.runtime import IntLinear, quantized_linear
from mixbits.runtime.kernels import native
from mixbits.runtime.linear import TableLinear, with_activation
from mixbits.solvers import round_to_nearest

pytestmark = pytest.mark.skipif(native() is None, reason="integer kernels unavailable (no compiler or no AVX2)")

WEIGHTS = ["q4_0", "q4_1", "q4_k", "q8_0", "int4:g128:asym", "int3:g64:asym", "int2:g32:sym", "int8:ch:sym",
           "int5:g64:asym", "int6:g64:sym:scale=i8", "int7:g32:asym", "int4:g64:sym:scale=e8m0",
           "int4:g16:asym", "int3:g16:sym",  # groups of 16: a run's two halves scaled apart
           "mxfp4", "fp4_e2m1:g32:scale=fp16", "fp4_e2m1:g64:scale=bf16", "nvfp4",  # exact tables
           "nf4:g64", "nf4:g32:scale=fp16", "log4:g64", "log3:g32"]  # tables rounded to 14-bit codes
ACTIVATIONS = ["int8:g32", "int8:g64", "int8:token", "int4:g32",
               "int8:static=0.0625", "int4:static=0.5"]  # static scales: the inputs' largest values are clamped
ISAS = ["avx2", "avxvnni", "avx512vnni"]


@pytest.fixture(params=ISAS)
def isa(request):
    kernels = native()
    before = kernels.qdot_isa()
    try:
        kernels.set_qdot_isa(request.param)
    except RuntimeError:
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    kernels.set_qdot_isa(before)


def activations(rows: int, cols: int) -> torch.Tensor:
    x = torch.randn(rows, cols) * torch.rand(1, cols) * 4  # channels of different sizes, as real inputs have
    x[0, :32] = 0  # an all-zero block: the scale is clamped, not 0
    if rows > 1:
        x[1, 3], x[1, 7] = 5.0, -5.0  # equal magnitudes: the first one sets the scale's sign
    return x


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_codes_and_scales_are_the_registry_formats(isa, act):
    torch.manual_seed(0)
    fmt = parse_activation(act)
    x = activations(9, 256)
    fixed = getattr(fmt, "value", None) or 0.0
    q, d, half_sums = native().quantize_rows(x, kernel_block(fmt, 256), fmt.bits_per_code, fixed)
    expected = fmt.quantize(x)
    assert torch.equal(q.long(), ungroup(expected.codes, expected.shape).long())
    assert torch.equal(d.reshape(-1), expected.params["scale"].reshape(-1).expand(9) if fixed
                       else expected.params["scale"].reshape(-1))
    values = expected.dequantize().double()
    assert torch.allclose(half_sums.double(), values.reshape(9, -1, 16).sum(-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_integer_product_equals_float_product_of_dequantized(isa, weight, act):
    torch.manual_seed(1)
    cols = 256
    quantized = round_to_nearest(torch.randn(37, cols), parse_format(weight))  # 37: tiles of 4, 2 and 1 rows
    fmt = parse_activation(act)
    module = quantized_linear(quantized, torch.randn(37), fmt)
    assert isinstance(module, IntLinear)
    w = quantized.dequantize().double()
    before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rows in (1, 2, 5, 70):  # decode, the 4x2 tiles and their remainders, more than one 64-row panel
            x = activations(rows, cols)
            xq = fake_quantize(x, fmt).double()
            expected = xq @ w.T + module.bias.double()
            got = module(x).double()
            bound = 1e-5 * expected.abs().max() + xq.abs() @ table_rounding(quantized).T
            assert ((got - expected).abs() <= bound).all()
    torch.set_num_threads(before)


def table_rounding(quantized) -> torch.Tensor:
    """The largest error [out, in] the runtime's table may add to each weight: a fixed table of levels in [-1, 1]
    (NF4, log grids) is held in multiples of 2^-13, so within 2^-14 of the scale; exact tables add none."""
    if not isinstance(quantized.format, TableFormat):
        return torch.zeros(quantized.shape, dtype=torch.float64)
    scale = quantized.params["scale"].double().expand(*quantized.codes.shape)
    return ungroup(scale, quantized.shape) * 2.0**-14


@pytest.mark.parametrize("weight", ["lut4:g32", "lut4:g128", "lut3:ch", "lut2:g64:table=fp16"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_learned_tables_times_integer_inputs_equal_the_float_product(weight, act):
    torch.manual_seed(5)
    cols = 256
    quantized = round_to_nearest(torch.randn(37, cols), parse_format(weight))
    fmt = parse_activation(act)
    module = quantized_linear(quantized, torch.randn(37), fmt)
    assert isinstance(module, TableLinear)
    w = quantized.dequantize().double()
    # the runtime holds each group's levels in multiples of 2^-13 of the power of two at or above the largest
    levels = quantized.params["table"].double()
    unit = torch.exp2(torch.ceil(torch.log2(levels.abs().amax(-1, keepdim=True))) - 13)
    rounding = ungroup((unit / 2).expand(*quantized.codes.shape), quantized.shape)
    assert ((module.weight_values().double() - w).abs() <= rounding).all()
    before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rows in (1, 2, 70):
            x = activations(rows, cols)
            xq = fake_quantize(x, fmt).double()
            expected = xq @ w.T + module.bias.double()
            bound = 1e-5 * expected.abs().max() + xq.abs() @ rounding.T
            assert ((module(x).double() - expected).abs() <= bound).all()
            assert ((module.matvec()(x).double() - expected).abs() <= bound).all()  # the kernel at any row count
    torch.set_num_threads(before)


@pytest.mark.parametrize("weight", ["q4_0", "int4:g128:asym", "int8:g64:sym", "int8:ch:sym"])
@pytest.mark.parametrize("act", ["int8:g32", "int8:token"])
def test_a_last_group_shorter_than_the_others(isa, weight, act):
    torch.manual_seed(4)
    quantized = round_to_nearest(torch.randn(20, 160), parse_format(weight))  # 160 = 128 + 32, = 2 x 64 + 32
    fmt = parse_activation(act)
    module = quantized_linear(quantized, None, fmt)
    assert isinstance(module, IntLinear)
    x = activations(6, 160)
    expected = fake_quantize(x, fmt).double() @ quantized.dequantize().double().T
    assert (module(x).double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_formats_the_kernels_cannot_serve_are_fake_quantized():
    torch.manual_seed(2)
    quantized = round_to_nearest(torch.randn(16, 96), parse_format("q4_0"))
    x = torch.randn(3, 96)
    for act in ("int8:g64", "fp8_e4m3:ch", "int8:ch:asym"):  # 64 does not divide 96; not integers; not symmetric
        fmt = parse_activation(act)
        module = quantized_linear(quantized, None, fmt)
        assert not isinstance(module, IntLinear)
        assert torch.allclose(module(x), fake_quantize(x, fmt) @ quantized.dequantize().T, atol=1e-5)
    for weight in ("lut5:g32", "int8:g16:sym"):  # 5-bit table codes; groups of 16 with byte codes
        quantized = round_to_nearest(torch.randn(16, 96), parse_format(weight))
        module = quantized_linear(quantized, None, parse_activation("int8:g32"))
        assert not isinstance(module, IntLinear)
        expected = fake_quantize(x, parse_activation("int8:g32")) @ quantized.dequantize().T
        assert torch.allclose(module(x), expected, atol=1e-5)
    linear = with_activation(torch.nn.Linear(96, 16), parse_activation("int8:token"))
    assert torch.allclose(linear(x), torch.nn.functional.linear(fake_quantize(x, linear.activation), linear.weight,
                                                                linear.bias), atol=1e-6)


def test_activation_short_forms():
    assert str(parse_activation("int8:token")) == str(parse_format("int8:ch:sym:scale=fp32"))
    assert str(parse_activation("int8:g32")) == str(parse_format("int8:g32:sym:scale=fp32"))
    with pytest.raises(FormatError, match="per token"):
        parse_activation("int8:tensor:sym")
    assert parse_activation("int8:static").value is None
    assert str(parse_activation("int4:static=0.0625")) == "int4:static=0.0625"
    for bad in ("int8:static=0.1", "int8:static=-1.0", "int8:static=nan", "int8:static=x", "int9:static"):
        with pytest.raises(FormatError):  # 0.1 is no float32 number: a scale must be stored exactly
            parse_activation(bad)
    with pytest.raises(ValueError, match="measured"):
        with_activation(torch.nn.Linear(32, 8), parse_activation("int8:static"))


@pytest.mark.parametrize("weight, act", [(w, a) for w in ("q8_0", "q4_1", "int4:g64:asym") for a in (None, "int8:g32")]
                         + [(w, "int8:g32") for w in ("mxfp4", "nvfp4", "nf4:g64")])  # tables: only with int inputs
def test_rows_read_from_the_codes_are_the_dequantized_rows(weight, act):
    torch.manual_seed(3)
    quantized = round_to_nearest(torch.randn(50, 128), parse_format(weight))
    module = quantized_linear(quantized, None, None if act is None else parse_activation(act))
    ids = torch.tensor([0, 17, 49, 3, 17])
    error = (module.rows(ids).double() - quantized.dequantize()[ids].double()).abs()
    assert (error <= 1e-6 * quantized.dequantize().abs().max() + table_rounding(quantized)[ids]).all()
    assert module.exact == (not isinstance(quantized.format, TableFormat))

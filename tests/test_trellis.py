"""Trellis codes: names, the Viterbi search against brute force, the bit stream, exact bits and storage, GPTQ's
feedback, tuning of their scales, and the runtime kernel against the dequantized weights."""

import itertools

import pytest
import torch

from mixbits.errors import FormatError
from mixbits.formats import parse_format
from mixbits.formats.storage import restore, store, stored_bytes
from mixbits.formats.trellis import _viterbi_torch, codebook, rotate, unrotate, viterbi
from mixbits.models.tiny import tiny_model
from mixbits.runtime import TrellisLinear, quantized_linear
from mixbits.runtime.kernels import native
from mixbits.solvers import GptqSettings, gptq, round_to_nearest
from mixbits.solvers.tuning import TuneSettings, tune_block

from test_tuning import block_error, first_block, solved
from test_vector import correlated_hessian, output_error

needs_native = pytest.mark.skipif(native() is None, reason="native kernels unavailable (no compiler or no AVX2)")
LLOYD_MAX_2BIT_MSE = 0.1175  # the best 2-bit scalar quantizer of a standard normal (Max, 1960)


@pytest.mark.parametrize("name", ["trellis2x5:ch", "trellis1x2:ch:state=10", "trellis2x4:ch:scale=bf16"])
def test_names_print_back_as_parsed(name):
    assert str(parse_format(name)) == name


@pytest.mark.parametrize("name, message", [
    ("trellis2x5:g64", "one scale per row"), ("trellis2x9:ch", "1 to 8 bits per step"),
    ("trellis2x6:ch:state=6", "more bits than a step"), ("trellis5x4:ch", "1 to 4 weights per step"),
    ("trellis2x4:ch:state=17", "at most 16"),
])
def test_bad_names_are_one_line_errors(name, message):
    with pytest.raises(FormatError, match=message):
        parse_format(name)


def brute_force(target, weight, table, step_bits, start=None):
    """The least-cost walk by trying every one: all first states (those following `start`), all symbol sequences."""
    states, steps = table.shape[0], target.shape[0]
    low = states // 2**step_bits
    best = None
    for first in range(states):
        if start is not None and first % low != start >> step_bits:
            continue
        for symbols in itertools.product(range(2**step_bits), repeat=steps - 1):
            walk = [first]
            for symbol in symbols:
                walk.append((walk[-1] >> step_bits) | (symbol * low))
            cost = float((weight * (target - table[walk]) ** 2).sum())
            if best is None or cost < best[0]:
                best = (cost, walk)
    return best[1]


@pytest.mark.parametrize("dim, step_bits, state_bits", [(1, 2, 4), (2, 2, 5), (2, 3, 6)])
@pytest.mark.parametrize("with_start", [False, True])
def test_viterbi_finds_the_best_walk(dim, step_bits, state_bits, with_start):
    generator = torch.Generator().manual_seed(dim * 10 + step_bits)
    table = torch.randn(2**state_bits, dim, generator=generator)
    target = torch.randn(6, 4, dim, generator=generator)
    weight = torch.rand(6, 4, dim, generator=generator) + 0.1
    start = torch.randint(0, 2**state_bits, (6,), generator=generator) if with_start else None
    expected = [brute_force(target[i], weight[i], table, step_bits, None if start is None else int(start[i]))
                for i in range(6)]
    first = torch.full((6,), -1) if start is None else start
    assert _viterbi_torch(target, weight, table, step_bits, first).tolist() == expected
    assert viterbi(target, weight, table, step_bits, start).tolist() == expected  # native when built


@pytest.mark.parametrize("name", ["trellis2x5:ch", "trellis2x4:ch", "trellis1x3:ch:state=8"])
def test_symbols_and_states_are_one_stream(name):
    fmt = parse_format(name)
    generator = torch.Generator().manual_seed(2)
    steps, k, low = 9, fmt.step_bits, 2 ** (fmt.state_bits - fmt.step_bits)
    walk = [int(torch.randint(0, 2**fmt.state_bits, (1,), generator=generator))]
    for _ in range(steps - 1):
        walk.append((walk[-1] >> k) | int(torch.randint(0, 2**k, (1,), generator=generator)) * low)
    states = torch.tensor([walk])
    symbols = fmt.symbols(states)
    assert symbols.shape == (1, steps + fmt.prefix) and int(symbols.max()) < 2**k
    assert torch.equal(fmt.states(symbols), states)
    # The state of step t is L bits of the packed stream, from bit t K + e (the kernel's reading).
    stream = sum(int(s) << (i * k) for i, s in enumerate(symbols[0]))
    assert [(stream >> (t * k + fmt.stream_offset)) & (2**fmt.state_bits - 1) for t in range(steps)] == walk


def test_rotation_is_orthogonal_and_undone():
    x, w = torch.randn(5, 576, dtype=torch.float64), torch.randn(7, 576, dtype=torch.float64)
    assert torch.allclose(rotate(x) @ rotate(w).T, x @ w.T, atol=1e-10)
    assert torch.allclose(unrotate(rotate(x)), x, atol=1e-12)


@pytest.mark.parametrize("name, cols", [("trellis2x4:ch", 96), ("trellis2x5:ch", 64), ("trellis2x6:ch", 192),
                                        ("trellis1x3:ch:state=10", 48)])
def test_gptq_codes_are_stored_exactly_in_the_bits_counted(name, cols):
    fmt = parse_format(name)
    rows = 12
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    quantized = gptq(weight, correlated_hessian(cols), fmt)
    # Counted by hand: per row, K bits a step and the first state's other bits in whole symbols, a 16-bit scale.
    prefix = -(-fmt.state_bits // fmt.step_bits) - 1
    expected = rows * ((cols // fmt.dim + prefix) * fmt.step_bits + 16)
    assert fmt.bits(rows, cols) == expected
    tensors = store(quantized)
    assert 0 <= stored_bytes(tensors) * 8 - expected < 8 * len(tensors)
    back = restore(parse_format(name), (rows, cols), tensors)
    assert torch.equal(back.codes, quantized.codes)
    assert torch.equal(back.dequantize(), quantized.dequantize())


def test_two_bits_a_weight_beat_the_best_scalar_quantizer_on_gaussian_weights():
    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(3))
    approx = round_to_nearest(weight, parse_format("trellis2x4:ch")).dequantize()
    assert float((approx - weight).square().mean()) < 0.7 * LLOYD_MAX_2BIT_MSE


def test_codebook_is_standard_normal():
    table = codebook(12, 2).double()
    assert abs(float(table.mean())) < 0.03 and abs(float(table.std()) - 1) < 0.03
    assert len(table.unique(dim=0)) == 2**12


@pytest.mark.parametrize("name", ["trellis2x4:ch", "trellis2x6:ch", "trellis1x3:ch:state=10"])
def test_gptq_beats_the_plain_walk_on_a_correlated_hessian(name):
    fmt = parse_format(name)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    hessian = correlated_hessian(128, seed=4, mixing=2.0)
    quantized = gptq(weight, hessian, fmt, settings=GptqSettings(shrink=0.0))
    # The Viterbi walk of each row alone, under the same scales: only the walk differs.
    plain = fmt.decode(fmt.encode(weight[:, None, :], quantized.params), quantized.params)[:, 0, :]
    assert output_error(weight, quantized.dequantize(), hessian) < 0.8 * output_error(weight, plain, hessian)


def test_tuning_moves_only_the_scales_and_lowers_the_block_error():
    block, targets = first_block(tiny_model("llama"))
    tensors = solved(block, "trellis2x4:ch")
    start = block_error(block, targets)
    tuned, record = tune_block(block.block, block.kwargs, block.inputs, targets, tensors, TuneSettings(steps=40))
    end = block_error(block, targets)
    assert record.kept and record.layers == 7 and end < start
    for name, tensor in tuned.items():  # the walks as GPTQ chose them; the scales moved, stored in fp16
        assert torch.equal(tensor.codes, tensors[name].codes)
        assert torch.equal(tensor.params["scale"].half().float(), tensor.params["scale"])
    assert any(not torch.equal(tuned[n].params["scale"], tensors[n].params["scale"]) for n in tuned)


@needs_native
@pytest.mark.parametrize("name", ["trellis2x4:ch", "trellis2x5:ch", "trellis2x6:ch", "trellis1x3:ch:state=10"])
def test_kernel_computes_the_dequantized_layer(name):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(81, 192, generator=generator)
    inputs = torch.randn(400, 192, generator=generator)
    quantized = gptq(weight, inputs.T @ inputs / 400, parse_format(name))
    bias = torch.randn(81, generator=generator)
    module = quantized_linear(quantized, bias)
    assert isinstance(module, TrellisLinear)
    fmt = quantized.format
    assert module.streams.shape[1] == -(-(192 // fmt.dim + fmt.prefix) * fmt.step_bits // 8) + 4
    assert torch.allclose(module.weight_values(), quantized.dequantize(), atol=1e-5)
    for rows in (1, 3, 40):  # the kernel, and the decoded layer times the rotated inputs
        x = torch.randn(rows, 192, generator=generator)
        expected = torch.nn.functional.linear(x.double(), quantized.dequantize().double(), bias.double())
        assert torch.allclose(module(x).double(), expected, atol=1e-3, rtol=1e-4)

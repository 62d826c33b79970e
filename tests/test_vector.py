"""Vector codebooks: names, exact bits and storage, k-means, and GPTQ's choice of codewords against brute force."""

import itertools

import pytest
import torch

from mixbits.errors import FormatError
from mixbits.formats import parse_format
from mixbits.formats.granularity import to_groups
from mixbits.formats.storage import restore, store, stored_bytes
from mixbits.formats.vector import kmeans, nearest_codes
from mixbits.models.tiny import tiny_model
from mixbits.solvers import GptqSettings, gptq, round_to_nearest
from mixbits.solvers.tuning import TuneSettings, tune_block

from test_tuning import block_error, first_block, solved


def correlated_hessian(cols: int, seed: int = 0, mixing: float = 0.8) -> torch.Tensor:
    """X^T X / n of inputs Z (I + mixing * R / sqrt(cols)), Z and R standard normal: inputs correlated by R."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(cols) + mixing * torch.randn(cols, cols, generator=generator) / cols**0.5
    inputs = torch.randn(4 * cols, cols, generator=generator) @ mixing
    return inputs.T @ inputs / inputs.shape[0]


def output_error(weight, approx, hessian) -> float:
    delta = (weight - approx).double()
    return float(torch.einsum("ij,jk,ik->", delta, hessian.double(), delta))


@pytest.mark.parametrize("name", ["vq4x8:ch", "vq2x6:g64", "vq8x8:g64:stages=2", "vq4x10:g32:table=bf16",
                                  "vq2x5:ch:scale=bf16"])
def test_names_print_back_as_parsed(name):
    assert str(parse_format(name)) == name


@pytest.mark.parametrize("name, message", [
    ("vq3x8:g64", "groups of a multiple of 3"), ("vq4x17:ch", "indices of 1 to 16 bits"),
    ("vq4x8:ch:stages=5", "1 to 4 stages"), ("vq4x8:tensor", "per-row scales"), ("vq17x8:ch", "vectors of 1 to 16"),
])
def test_bad_names_are_one_line_errors(name, message):
    with pytest.raises(FormatError, match=message):
        parse_format(name)


def test_rows_that_do_not_cut_into_vectors_are_refused():
    with pytest.raises(FormatError, match="cannot cut rows of 30 weights into vectors of 4"):
        round_to_nearest(torch.randn(4, 30), parse_format("vq4x8:ch"))


@pytest.mark.parametrize("name, cols", [("vq2x6:g64", 200), ("vq4x10:g32", 100), ("vq8x8:g64:stages=2", 200),
                                        ("vq4x8:ch", 96), ("vq2x12:ch", 64)])
def test_gptq_codes_are_stored_exactly_in_the_bits_counted(name, cols):
    fmt = parse_format(name)
    rows = 12
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    quantized = gptq(weight, correlated_hessian(cols), fmt)
    # Counted by hand: every vector's S indices, a 16-bit scale per group, the S codebooks' 16-bit entries.
    vectors, groups = -(-cols // fmt.dim), fmt.granularity.groups_per_row(cols)
    expected = rows * vectors * fmt.stages * fmt.index_bits + rows * groups * 16 + fmt.stages * 2**fmt.index_bits * fmt.dim * 16
    assert fmt.bits(rows, cols) == expected
    tensors = store(quantized)
    assert 0 <= stored_bytes(tensors) * 8 - expected < 8 * len(tensors)
    back = restore(parse_format(name), (rows, cols), tensors)
    assert torch.equal(back.dequantize(), quantized.dequantize())
    assert int(quantized.codes.max()) < 2**fmt.index_bits


def test_kmeans_finds_a_small_alphabet_and_its_rare_heavy_points():
    alphabet = torch.tensor([[1.0, 0.5], [-2.0, 0.25], [0.0, -1.0], [3.0, 3.0]])  # exact in fp16
    which = torch.tensor([0, 1, 2] * 20000 + [3] * 4)  # the fourth is 4 in 60004, far below a uniform sample's reach
    points = alphabet[which]
    weights = torch.ones_like(points)
    weights[which == 3] = 5e4  # but it carries most of the weight
    centers = kmeans(points, weights, 4, seed=0)
    assert sorted(map(tuple, centers.tolist())) == sorted(map(tuple, alphabet.tolist()))
    assert torch.equal(centers[nearest_codes(points, centers[None])[:, 0]], points)


def test_nearest_codes_in_a_metric_match_brute_force():
    generator = torch.Generator().manual_seed(2)
    books = torch.randn(2, 16, 3, generator=generator)
    vectors = torch.randn(200, 3, generator=generator)
    metric = torch.linalg.cholesky(torch.eye(3) + torch.randn(3, 3, generator=generator).T.square()).T
    first = nearest_codes(vectors, books[:1], metric)[:, 0]
    brute = (((vectors[:, None, :] - books[0][None]) @ metric).square().sum(-1)).argmin(dim=1)
    assert torch.equal(first, brute)
    # Greedy residual: the second stage codes what the first left, in the same metric.
    both = nearest_codes(vectors, books, metric)
    residual = vectors - books[0][both[:, 0]]
    assert torch.equal(both[:, 1], (((residual[:, None, :] - books[1][None]) @ metric).square().sum(-1)).argmin(dim=1))


def test_gptq_picks_the_first_vector_that_is_best_with_the_rest_compensated():
    """Rows of two vectors: each row's first codeword must minimise the output error once the second vector's two
    columns move freely to compensate, (w1 - c) S (w1 - c)^T for S the Schur complement of H's second block."""
    fmt = parse_format("vq2x4:ch")
    hessian = correlated_hessian(4, seed=3)
    weight = torch.randn(40, 4, generator=torch.Generator().manual_seed(3))
    quantized = gptq(weight, hessian, fmt, settings=GptqSettings(damp=0.0, shrink=0.0, act_order=False))
    book, scale = quantized.params["codebook"][0].double(), quantized.params["scale"].reshape(40, 1, 1).double()
    h11, h12, h22 = hessian[:2, :2].double(), hessian[:2, 2:].double(), hessian[2:, 2:].double()
    schur = h11 - h12 @ torch.linalg.solve(h22, h12.T)
    delta = weight[:, None, :2].double() - scale * book[None]  # [rows, K, 2]
    cost = ((delta @ schur) * delta).sum(-1)  # [rows, K]
    chosen = cost.gather(1, quantized.codes.reshape(40, -1)[:, :1].long())[:, 0]
    assert torch.allclose(chosen, cost.min(dim=1).values, rtol=1e-5, atol=1e-9)
    assert len(book.unique(dim=0)) == 16  # a real choice among 16 codewords


@pytest.mark.parametrize("name", ["vq2x4:ch", "vq4x8:ch", "vq2x6:g32:stages=2"])
def test_gptq_with_vectors_beats_nearest_codewords_on_a_correlated_hessian(name):
    fmt = parse_format(name)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    hessian = correlated_hessian(128, seed=4, mixing=2.0)
    quantized = gptq(weight, hessian, fmt, settings=GptqSettings(shrink=0.0))
    # Nearest codewords under the same codebooks and scales: only the choice of codes differs.
    grouped = to_groups(weight, fmt.granularity)
    nearest = fmt.decode(fmt.encode(grouped.values, quantized.params), quantized.params)
    nearest = nearest.reshape(64, -1)[:, :128]
    assert output_error(weight, quantized.dequantize(), hessian) < 0.8 * output_error(weight, nearest, hessian)


def test_tuning_moves_the_codebook_and_lowers_the_block_error():
    block, targets = first_block(tiny_model("llama"))
    tensors = solved(block, "vq2x4:g16")
    start = block_error(block, targets)
    tuned, record = tune_block(block.block, block.kwargs, block.inputs, targets, tensors, TuneSettings(steps=40))
    end = block_error(block, targets)
    assert record.kept and record.layers == 7 and end < 0.95 * start
    assert record.end_error == pytest.approx(end, rel=1e-4)
    for name, tensor in tuned.items():  # codes as GPTQ chose them; the codebook moved, stored in its codec
        assert torch.equal(tensor.codes, tensors[name].codes)
        book = tensor.params["codebook"]
        assert torch.equal(book.half().float(), book)
    assert any(not torch.equal(tuned[n].params["codebook"], tensors[n].params["codebook"]) for n in tuned)


def test_exhaustive_small_codebook_round_trip():
    """Every code of a 2-bit, 2-stage codebook decodes to the sum of its stages' codewords times the scale."""
    fmt = parse_format("vq2x2:ch:stages=2")
    weight = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    quantized = round_to_nearest(weight, fmt)
    books, scale = quantized.params["codebook"], quantized.params["scale"]
    for first, second in itertools.product(range(4), repeat=2):
        grouped = torch.tensor([first] * 4 + [second] * 4, dtype=torch.uint8).expand(3, 1, 8)
        decoded = fmt.decode(grouped, quantized.params).reshape(3, 8)
        expected = (books[0][first] + books[1][second]).repeat(4) * scale.reshape(3, 1)
        assert torch.equal(decoded, expected)

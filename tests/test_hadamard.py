import math

import pytest
import torch

from mixbits.errors import MixbitsError, TransformError
from mixbits.transforms import hadamard_matrix, hadamard_transform, has_hadamard, rotation_matrix

ORDERS = [1, 2, 4, 12, 20, 28, 36, 576, 1536, 768, 2048]
# 6 and 22 are not multiples of 4, so no Hadamard matrix exists; 92 and 52 exist
# but need constructions (Williamson, GF(25)) that are not implemented.
NO_HADAMARD = [3, 6, 22, 52, 92]


@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_matrix_is_exact(n):
    h = hadamard_matrix(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_every_claimed_small_order_is_exact():
    claimed = [n for n in range(1, 161) if has_hadamard(n)]
    assert {12, 20, 28, 36, 44, 60, 68, 76, 84, 108} <= set(claimed)
    for n in claimed:
        h = hadamard_matrix(n)
        assert torch.equal(h.abs(), torch.ones_like(h)), n
        assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64)), n
    # A Hadamard matrix of order > 2 needs 4 | n.
    assert all(n in (1, 2) or n % 4 == 0 for n in claimed)


def test_cache_cannot_be_corrupted():
    first = hadamard_matrix(12)
    first.zero_()
    assert hadamard_matrix(12).abs().min() == 1.0
    rotation, _ = rotation_matrix(12)
    rotation.zero_()
    assert rotation_matrix(12)[0].abs().min() > 0


@pytest.mark.parametrize("n", ORDERS)
def test_rotation_is_normalised_hadamard(n):
    r, kind = rotation_matrix(n)
    assert kind == "hadamard" and r.dtype == torch.float32
    assert torch.allclose(r @ r.T, torch.eye(n), atol=1e-5)
    corner = hadamard_matrix(n)[:64, :64] / math.sqrt(n)
    assert torch.allclose(r[:64, :64].double(), corner, atol=1e-7)


@pytest.mark.parametrize("n", NO_HADAMARD)
def test_unbuildable_orders_fall_back_to_seeded_random_orthogonal(n):
    assert not has_hadamard(n)
    with pytest.raises(TransformError, match="rotation_matrix"):
        hadamard_matrix(n)
    r, kind = rotation_matrix(n, seed=3)
    assert kind == "random-orthogonal" and r.dtype == torch.float32
    assert torch.allclose(r @ r.T, torch.eye(n), atol=1e-5)
    assert torch.equal(r, rotation_matrix(n, seed=3)[0])
    assert not torch.allclose(r, rotation_matrix(n, seed=4)[0])


def test_seed_is_ignored_for_hadamard_orders():
    assert torch.equal(rotation_matrix(12, seed=0)[0], rotation_matrix(12, seed=9)[0])


@pytest.mark.parametrize("n", [0, -4, 2.0, True])
def test_bad_orders_are_rejected(n):
    for call in (hadamard_matrix, has_hadamard, rotation_matrix):
        with pytest.raises(TransformError, match="positive integer") as info:
            call(n)
        assert isinstance(info.value, MixbitsError)


@pytest.mark.parametrize("n", [1, 12, 28, 36, 576, 1536, 6, 92])
def test_transform_matches_matmul_and_preserves_geometry(n):
    torch.manual_seed(0)
    x = torch.randn(4, n)
    y = hadamard_transform(x)
    r, _ = rotation_matrix(n)
    assert torch.allclose(y, x @ r, atol=1e-4)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(y @ y.T, x @ x.T, rtol=1e-4, atol=1e-3)


def test_transform_along_other_dims_and_dtypes():
    torch.manual_seed(0)
    x = torch.randn(20, 3, 5)
    r, _ = rotation_matrix(20)
    expected = torch.einsum("ijk,il->ljk", x, r)
    assert torch.allclose(hadamard_transform(x, dim=0), expected, atol=1e-5)
    assert torch.allclose(hadamard_transform(x.transpose(0, 2), dim=2), expected.transpose(0, 2), atol=1e-5)
    half = hadamard_transform(x.half(), dim=0)
    assert half.dtype == torch.float16
    double = hadamard_transform(x.double(), dim=0)
    assert double.dtype == torch.float64
    assert torch.allclose(double, torch.einsum("ijk,il->ljk", x.double(), hadamard_matrix(20) / math.sqrt(20)),
                          atol=1e-12)
    with pytest.raises(TransformError, match="floating-point"):
        hadamard_transform(torch.ones(4, dtype=torch.int64))


@pytest.mark.parametrize("n", [12, 576, 1536, 2048])
def test_rotation_spreads_an_outlier(n):
    spike = torch.zeros(n)
    spike[n // 3] = 100.0
    flat = hadamard_transform(spike)
    assert math.isclose(float(flat.abs().max() / flat.square().mean().sqrt()), 1.0, rel_tol=1e-5)
    # An outlier on top of ordinary activations: max/rms falls from ~sqrt(n) to a Gaussian's.
    torch.manual_seed(0)
    noisy = torch.randn(n) + spike
    rotated = hadamard_transform(noisy)
    before = noisy.abs().max() / noisy.square().mean().sqrt()
    after = rotated.abs().max() / rotated.square().mean().sqrt()
    assert before > 0.9 * math.sqrt(n) and after < 5.0


@pytest.mark.parametrize("n", [12, 36, 576, 1536, 20, 7])
def test_transposed_transform_is_the_matrix_transpose(n):
    from mixbits.transforms.hadamard import hadamard_transform, rotation_matrix

    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    matrix, _ = rotation_matrix(n)
    torch.testing.assert_close(hadamard_transform(x, transpose=True), x @ matrix.double().T, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x), transpose=True), x, rtol=1e-6, atol=1e-6)

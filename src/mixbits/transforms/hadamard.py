"""Orthogonal rotations for QuaRot-style outlier spreading.

Rotating weights and activations by an orthogonal matrix leaves a linear layer's
output unchanged but spreads a few large outliers over all coordinates, which
makes them far easier to quantize. A Hadamard matrix is the rotation of choice:
every entry has the same magnitude, so any one-hot outlier becomes perfectly flat.

Model widths are rarely powers of two (576 = 36 * 16, 1536 = 12 * 128), so a
Hadamard matrix of order n is built as the Kronecker product of a Sylvester
matrix of order 2^k with a small "core" of order m from one of two Paley
constructions over the prime field GF(q):

- Paley I, order q + 1 for a prime q = 3 (mod 4): 4, 8, 12, 20, 24, 32, 44, 48, ...
- Paley II, order 2(q + 1) for a prime q = 1 (mod 4): 12, 28, 36, 60, 76, 84, ...

When no such decomposition exists (every n that is not 1, 2 or a multiple of 4,
and some multiples of 4 such as 92), `rotation_matrix` falls back to a seeded
random orthogonal matrix and says so, so that benchmarks can report which one ran.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..errors import TransformError

HADAMARD = "hadamard"
RANDOM_ORTHOGONAL = "random-orthogonal"

# Dense n x n float64 matrices get large fast (8192 -> 512 MB), so keep few.
_CACHE_SIZE = 8


def has_hadamard(n: int) -> bool:
    """Whether `hadamard_matrix(n)` can build a matrix of order n."""
    _check_order(n)
    return _decompose(n) is not None


def hadamard_matrix(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n: float64, entries +-1, H @ H.T == n * I.

    Returns a fresh copy; the cached original cannot be changed by the caller.
    """
    _check_order(n)
    if _decompose(n) is None:
        raise TransformError(
            f"no Hadamard matrix of order {n} can be built (orders are 2^k times 1 or a Paley order); "
            "use rotation_matrix(n) for a random orthogonal fallback"
        )
    return _hadamard(n).clone()


def rotation_matrix(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """An n x n float32 orthogonal matrix and which kind it is.

    The kind is "hadamard" (H / sqrt(n); `seed` is ignored) when one can be built,
    else "random-orthogonal" (deterministic for a given `seed`).
    """
    _check_order(n)
    matrix, kind = _rotation(n, seed if _decompose(n) is None else 0)
    return matrix.clone(), kind


def hadamard_transform(x: torch.Tensor, dim: int = -1, seed: int = 0, transpose: bool = False) -> torch.Tensor:
    """Rotate `x` along `dim` by `rotation_matrix(x.shape[dim], seed)`: x @ R on that dim (x @ R.T, undoing it,
    with `transpose`).

    Hadamard orders use the Kronecker structure (one small matmul and log2(2^k)
    butterflies) rather than a dense n x n matmul. Computes in float32 (float64
    stays float64) and returns the input's dtype.
    """
    if not x.is_floating_point():
        raise TransformError(f"hadamard_transform needs a floating-point tensor, got {x.dtype}; convert it with .float()")
    n = x.shape[dim]
    _check_order(n)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    moved = x.to(work).movedim(dim, -1)
    parts = _decompose(n)
    if parts is None:
        matrix, _ = _rotation(n, seed)
        out = moved @ (matrix.T if transpose else matrix).to(work)
    else:
        out = _kronecker_apply(moved, *parts, transpose) * (1.0 / math.sqrt(n))
    return out.movedim(-1, dim).to(x.dtype)


def _check_order(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TransformError(f"a rotation order must be a positive integer, got {n!r}; pass the size of the dimension to rotate")


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, math.isqrt(q) + 1, 2))


def _core_kind(m: int) -> tuple[str, int] | None:
    """How to build a core of order m (a multiple of 4): ("paley1" | "paley2", q) or None."""
    if _is_prime(m - 1):  # m = 0 mod 4 makes q = 3 mod 4
        return "paley1", m - 1
    if m % 8 == 4 and _is_prime(m // 2 - 1):  # then q = m/2 - 1 = 1 mod 4
        return "paley2", m // 2 - 1
    return None


@lru_cache(maxsize=None)
def _decompose(n: int) -> tuple[int, int] | None:
    """(power of two, core order) with product n, using the smallest buildable core."""
    twos = (n & -n).bit_length() - 1
    odd = n >> twos
    if odd == 1:
        return n, 1
    # A core is 1, 2 or a multiple of 4, so an odd part > 1 needs at least 2^2.
    for extra in range(2, twos + 1):
        core = odd << extra
        if _core_kind(core) is not None:
            return n // core, core
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = Legendre symbol of (i - j) mod q, for a prime q."""
    symbol = torch.full((q,), -1.0, dtype=torch.float64)
    squares = torch.arange(1, q, dtype=torch.int64).square() % q
    symbol[squares] = 1.0
    symbol[0] = 0.0
    index = torch.arange(q)
    return symbol[(index[:, None] - index[None, :]) % q]


def _conference(q: int, antisymmetric: bool) -> torch.Tensor:
    """Order q + 1 conference matrix: zero diagonal, +-1 elsewhere, C @ C.T == q * I."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = -1.0 if antisymmetric else 1.0
    c[1:, 1:] = _jacobsthal(q)
    return c


@lru_cache(maxsize=_CACHE_SIZE)
def _core(m: int) -> torch.Tensor:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    kind, q = _core_kind(m)
    if kind == "paley1":
        # C antisymmetric: (I + C)(I + C).T = I - C @ C = I + C @ C.T = (q + 1) I.
        return torch.eye(m, dtype=torch.float64) + _conference(q, antisymmetric=True)
    # C symmetric: replace 0 by B and +-1 by +-A; the cross terms C x (A B.T + B A.T) cancel.
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(_conference(q, antisymmetric=False), a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _sylvester(size: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@lru_cache(maxsize=_CACHE_SIZE)
def _hadamard(n: int) -> torch.Tensor:
    power, core = _decompose(n)
    return torch.kron(_sylvester(power), _core(core))


@lru_cache(maxsize=_CACHE_SIZE)
def _rotation(n: int, seed: int) -> tuple[torch.Tensor, str]:
    if _decompose(n) is not None:
        return (_hadamard(n) / math.sqrt(n)).float(), HADAMARD
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # QR is unique only up to column signs; fixing diag(R) > 0 makes it deterministic.
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
    return (q * signs).float(), RANDOM_ORTHOGONAL


def _kronecker_apply(x: torch.Tensor, power: int, core: int, transpose: bool = False) -> torch.Tensor:
    """x @ kron(Sylvester(power), core matrix) without forming the n x n matrix (the core transposed: x times the
    transposed product, S being symmetric).

    Index i = a * core + b, so x viewed as [..., power, core] = X gives S.T @ X @ M,
    and S (symmetric) factors into one 2x2 butterfly per bit of a.
    """
    lead = x.shape[:-1]
    y = x.reshape(*lead, power, core)
    if core > 1:
        matrix = _core(core).to(x.dtype)
        y = y @ (matrix.T if transpose else matrix)
    half = 1
    while half < power:
        pairs = y.reshape(*lead, power // (2 * half), 2, half, core)
        top, bottom = pairs.select(-3, 0), pairs.select(-3, 1)
        y = torch.stack([top + bottom, top - bottom], dim=-3)
        half *= 2
    return y.reshape(*lead, power * core)

"""Minifloat element types ExMy: encode float32 values to bit patterns and back.

A minifloat has 1 sign bit, E exponent bits and M mantissa bits, an exponent
bias, and one of three conventions for its top exponent:

- "ieee": the top exponent encodes inf (mantissa 0) and NaN (FP8 E5M2);
- "fn":   only the all-ones pattern is NaN, no inf (FP8 E4M3 "fn");
- "none": every pattern is a finite number (OCP FP6 and FP4).

Encoding rounds to the nearest value, ties to the even pattern, and saturates
at the largest finite value (no overflow to inf or NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..errors import FormatError

SPECIALS = ("ieee", "fn", "none")


@dataclass(frozen=True)
class Minifloat:
    exponent_bits: int
    mantissa_bits: int
    bias: int
    specials: str

    def __post_init__(self):
        if self.exponent_bits < 1 or self.mantissa_bits < 0 or self.width > 8:
            raise FormatError(f"minifloats need 1+ exponent bits and at most 8 bits in all, got e{self.exponent_bits}m{self.mantissa_bits}")
        if self.specials not in SPECIALS:
            raise FormatError(f"unknown special-value convention {self.specials!r}; use one of {', '.join(SPECIALS)}")
        if self.specials == "ieee" and self.exponent_bits < 2:
            raise FormatError("ieee-style inf/NaN needs at least 2 exponent bits; use specials=none")

    @property
    def width(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def name(self) -> str:
        return f"e{self.exponent_bits}m{self.mantissa_bits}"

    def value_of(self, pattern: int) -> float:
        """The value of one bit pattern (inf/NaN included), in float64."""
        e_bits, m_bits = self.exponent_bits, self.mantissa_bits
        sign = -1.0 if pattern >> (e_bits + m_bits) & 1 else 1.0
        exponent = pattern >> m_bits & ((1 << e_bits) - 1)
        mantissa = pattern & ((1 << m_bits) - 1)
        top = (1 << e_bits) - 1
        if self.specials == "ieee" and exponent == top:
            return sign * float("inf") if mantissa == 0 else float("nan")
        if self.specials == "fn" and exponent == top and mantissa == (1 << m_bits) - 1:
            return float("nan")
        if exponent == 0:
            return sign * mantissa / (1 << m_bits) * 2.0 ** (1 - self.bias)
        return sign * (1 + mantissa / (1 << m_bits)) * 2.0 ** (exponent - self.bias)

    @cached_property
    def table(self) -> torch.Tensor:
        """Values of all 2^width patterns as float32 (NaN/inf where the pattern is special)."""
        return torch.tensor([self.value_of(p) for p in range(1 << self.width)], dtype=torch.float64).float()

    @cached_property
    def positive(self) -> torch.Tensor:
        """Finite non-negative values; their index is their bit pattern."""
        half = self.table[: 1 << (self.width - 1)]
        return half[torch.isfinite(half)]

    @cached_property
    def midpoints(self) -> torch.Tensor:
        # Exact in float32: adjacent values differ in at most M + 2 significant bits.
        return (self.positive[1:] + self.positive[:-1]) / 2

    @property
    def max(self) -> float:
        return self.positive[-1].item()

    @property
    def max_exponent(self) -> int:
        """Unbiased exponent of the largest finite value (emax in the OCP MX spec)."""
        return int(torch.frexp(self.positive[-1:])[1].item()) - 1

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """Bit patterns (uint8) of the nearest values; ties to even; saturating."""
        magnitude = values.abs().clamp(max=self.max)
        index = self._encode_arithmetic(magnitude) if self.mantissa_bits else self._encode_search(magnitude)
        sign = (values < 0).to(torch.uint8) << (self.width - 1)
        return index | sign

    def _encode_arithmetic(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Round in the value's own binade: steps of 2^(e - M), e = max(floor(log2 x), 1 - bias).

        The pattern of a rounded value r is (e + bias - 1) * 2^M + r / 2^(e - M), for normals and
        subnormals alike; its parity is that of r / 2^(e - M), so torch.round's ties-to-even on
        that count is ties-to-even on the pattern (M >= 1).
        """
        exponent = torch.frexp(magnitude)[1] - 1  # frexp(0) has exponent 0: zero needs the clamp below too
        exponent = torch.where(magnitude > 0, exponent, 1 - self.bias).clamp(min=1 - self.bias)
        steps = torch.round(torch.ldexp(magnitude, self.mantissa_bits - exponent))
        return ((exponent + self.bias - 1) * (1 << self.mantissa_bits) + steps.to(torch.int32)).to(torch.uint8)

    def _encode_search(self, magnitude: torch.Tensor) -> torch.Tensor:
        index = torch.searchsorted(self.midpoints, magnitude.contiguous())
        # searchsorted puts an exact midpoint on the lower side; move odd ones up to the even pattern.
        at_tie = (index < len(self.midpoints)) & (magnitude == self.midpoints[index.clamp(max=len(self.midpoints) - 1)])
        return (index + (at_tie & (index % 2 == 1)).long()).to(torch.uint8)

    def decode(self, patterns: torch.Tensor) -> torch.Tensor:
        return self.table[patterns.long()]


def default_specials(exponent_bits: int, mantissa_bits: int) -> str:
    """OCP conventions: E5M2 has inf/NaN, E4M3 has only NaN, narrower types have neither."""
    return {(5, 2): "ieee", (4, 3): "fn"}.get((exponent_bits, mantissa_bits), "none")


def minifloat(exponent_bits: int, mantissa_bits: int, bias: int | None = None, specials: str | None = None) -> Minifloat:
    return Minifloat(
        exponent_bits,
        mantissa_bits,
        (1 << (exponent_bits - 1)) - 1 if bias is None else bias,
        specials or default_specials(exponent_bits, mantissa_bits),
    )


E4M3 = minifloat(4, 3)
E5M2 = minifloat(5, 2)
E3M2 = minifloat(3, 2)
E2M3 = minifloat(2, 3)
E2M1 = minifloat(2, 1)

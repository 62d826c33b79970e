"""OCP Microscaling (MX v1.0) block formats: 32 elements share one E8M0 scale.

The shared scale follows the spec: X = 2^(floor(log2(amax)) - emax), where
emax is the exponent of the element type's largest normal value. Elements are
then rounded (ties to even) and saturated. A clip ratio < 1 lowers amax
before the exponent is taken, which lets a search choose X/2 where that
loses less; clip 1 is the spec's rule exactly.

MXINT8 elements are 8-bit two's complement with an implicit scale of 2^-6,
saturated symmetrically to [-127, 127] (emax = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FormatError
from .base import Clip, Format
from .elements import E2M1, E2M3, E3M2, E4M3, E5M2, Minifloat
from .granularity import Granularity, Grouped
from .scales import E8M0Scale

E8M0 = E8M0Scale()  # the shared scale's storage; its value follows the spec rule in `fit`

BLOCK = 32
ELEMENTS: dict[str, Minifloat | None] = {
    "mxfp8_e4m3": E4M3,
    "mxfp8_e5m2": E5M2,
    "mxfp6_e3m2": E3M2,
    "mxfp6_e2m3": E2M3,
    "mxfp4": E2M1,
    "mxint8": None,  # integer elements
}


@dataclass(frozen=True)
class MXFormat(Format):
    name: str
    granularity: Granularity = Granularity("group", BLOCK)

    def __post_init__(self):
        if self.name not in ELEMENTS:
            raise FormatError(f"unknown MX format {self.name!r}; use one of {', '.join(ELEMENTS)}")

    @classmethod
    def parse(cls, text: str) -> "MXFormat":
        if ":" in text:
            raise FormatError(f"{text!r}: MX formats have fixed blocks of {BLOCK} and E8M0 scales; write just {text.split(':')[0]}")
        return cls(text)

    def __str__(self) -> str:
        return self.name

    @property
    def element(self) -> Minifloat | None:
        return ELEMENTS[self.name]

    @property
    def code_bits(self) -> int:
        return 8 if self.element is None else self.element.width

    def fit(self, grouped: Grouped, clip: Clip = 1.0, importance=None) -> dict[str, torch.Tensor]:
        top = grouped.values.abs().amax(dim=-1, keepdim=True) * clip
        _, exponent = torch.frexp(top)  # top = m * 2^e with m in [0.5, 1): floor(log2(top)) = e - 1
        emax = 0 if self.element is None else self.element.max_exponent
        shared = torch.where(top > 0, exponent - 1 - emax, torch.full_like(exponent, -127)).clamp(-127, 127)
        return {"scale": torch.ldexp(torch.ones_like(top), shared)}

    def encode(self, values: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        scaled = values / params["scale"]
        if self.element is None:
            return torch.round(scaled * 64).clamp(-127, 127).to(torch.int8)
        return self.element.encode(scaled)

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.element is None:
            return codes.float() / 64 * params["scale"]
        return self.element.decode(codes) * params["scale"]

    @property
    def signed_codes(self) -> bool:
        return self.element is None

    def stored_params(self) -> dict[str, E8M0Scale]:
        return {"scale": E8M0}

    def parameter_bits(self, rows: int, cols: int) -> int:
        return self.per_group_bits(E8M0, rows, cols)

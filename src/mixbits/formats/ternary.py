"""Binary (+-scale) and ternary ({-1, 0, +1} x scale) formats.

Binary stores 1 bit per weight and the MSE-optimal scale for signs, the
(importance-weighted) mean magnitude. Ternary stores its three levels in 2
bits (packing 5 trits per byte would give 1.6; we do not pack that way, so we
do not count it) and searches its scale over a wide range of clip ratios.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import FormatError
from .base import Clip, Format
from .granularity import Granularity, Grouped
from .lut import fit_weights
from .naming import granularity_field, scale_option, scale_suffix, split
from .scales import DEFAULT_SCALE, ScaleCodec

TERNARY_CLIP_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(41))  # 1.00 down to 0.20


@dataclass(frozen=True)
class SignFormat(Format):
    """`binary:GRAN` (levels -1, +1) or `ternary:GRAN` (levels -1, 0, +1), times a positive scale."""

    family: str
    granularity: Granularity
    scale: ScaleCodec = DEFAULT_SCALE
    show_scale: bool = field(default=False, compare=False)

    PATTERN = re.compile(r"binary|ternary")

    def __post_init__(self):
        if self.family not in ("binary", "ternary"):
            raise FormatError(f"unknown sign format {self.family!r}; use binary or ternary")

    @classmethod
    def parse(cls, text: str) -> "SignFormat":
        head, positional, options = split(text, ("scale",))
        if not cls.PATTERN.fullmatch(head) or len(positional) != 1:
            raise FormatError(f"{text!r}: write binary:g64 or ternary:g64")
        scale, explicit = scale_option(options)
        return cls(head, granularity_field(text, positional, f"{head}:g64"), scale, explicit)

    def __str__(self) -> str:
        return f"{self.family}:{self.granularity}" + scale_suffix(self.scale, self.show_scale)

    @property
    def clip_grid(self) -> tuple[float, ...]:
        return (1.0,) if self.family == "binary" else TERNARY_CLIP_GRID

    @property
    def code_bits(self) -> int:
        return 1 if self.family == "binary" else 2

    def fit(self, grouped: Grouped, clip: Clip = 1.0, importance=None) -> dict[str, torch.Tensor]:
        magnitude = grouped.values.abs()
        if self.family == "binary":
            weights = fit_weights(grouped, importance)
            mean = (weights * magnitude).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True).clamp(min=1e-30)
            return {"scale": self.scale.round(mean * clip)}
        return {"scale": self.scale.round(magnitude.amax(dim=-1, keepdim=True) * clip)}

    def encode(self, values: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.family == "binary":
            return (values >= 0).to(torch.uint8)
        return (torch.round(values / params["scale"]).clamp(-1, 1) + 1).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        offset = 2.0 * codes.float() - 1 if self.family == "binary" else codes.float() - 1
        return offset * params["scale"]

    def parameter_bits(self, rows: int, cols: int) -> int:
        return self.per_group_bits(self.scale, rows, cols)

"""Uniform integer formats: k-bit codes times a per-group scale, k = 1..8.

Symmetric: codes in [-2^(k-1), 2^(k-1) - 1], value = code * scale. With a
signed scale dtype the scale takes the sign of the group's largest-magnitude
value, which then maps exactly to -2^(k-1) (llama.cpp's Q4_0 trick): all 2^k
levels are used. With an unsigned scale dtype (e8m0) the scale is positive
and the largest magnitude maps to 2^(k-1) - 1.

Asymmetric: codes in [0, 2^k - 1], value = (code - zero) * scale, with an
integer zero point stored in k bits (as GPTQ does). The covered range always
includes 0 so the zero point is representable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import FormatError
from .base import Clip, Format
from .granularity import Granularity, Grouped
from .naming import granularity_field, scale_option, scale_suffix, split
from .scales import DEFAULT_SCALE, ScaleCodec

MIN_BITS, MAX_BITS = 1, 8


def signed_extreme(values: torch.Tensor) -> torch.Tensor:
    """Per group, the value of largest magnitude with its sign: [R, G, 1]."""
    return values.gather(-1, values.abs().argmax(dim=-1, keepdim=True))


@dataclass(frozen=True)
class IntFormat(Format):
    bits_per_code: int
    symmetric: bool
    granularity: Granularity
    scale: ScaleCodec = DEFAULT_SCALE
    show_scale: bool = field(default=False, compare=False)
    label: str = field(default="", compare=False)  # a preset's name, e.g. nvint4

    PATTERN = re.compile(r"int(-?\d+)")

    def __post_init__(self):
        if not MIN_BITS <= self.bits_per_code <= MAX_BITS:
            raise FormatError(
                f"integer formats take {MIN_BITS} to {MAX_BITS} bits, got {self.bits_per_code}; use e.g. int4:g128:asym"
            )

    @classmethod
    def parse(cls, text: str) -> "IntFormat":
        """Parse `intK:GRAN:sym|asym[:scale=DTYPE]`, e.g. `int4:g128:asym`."""
        head, positional, options = split(text, ("scale",))
        match = cls.PATTERN.fullmatch(head)
        if not match:
            raise FormatError(f"not an integer format: {text!r}; write e.g. int4:g128:asym")
        if len(positional) != 2:
            raise FormatError(f"{text!r} needs a granularity and sym|asym; write e.g. {head}:g128:asym")
        granularity = granularity_field(text, positional, f"{head}:g128:asym")
        if positional[1] not in ("sym", "asym"):
            raise FormatError(f"{text!r}: expected sym or asym after the granularity, got {positional[1]!r}")
        scale, explicit = scale_option(options)
        return cls(int(match.group(1)), positional[1] == "sym", granularity, scale, explicit)

    def __str__(self) -> str:
        if self.label:
            return self.label
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits_per_code}:{self.granularity}:{kind}" + scale_suffix(self.scale, self.show_scale)

    @property
    def code_bits(self) -> int:
        return self.bits_per_code

    @property
    def code_range(self) -> tuple[int, int]:
        if self.symmetric:
            half = 2 ** (self.bits_per_code - 1)
            return -half, half - 1
        return 0, 2**self.bits_per_code - 1

    def fit(self, grouped: Grouped, clip: Clip = 1.0, importance=None) -> dict[str, torch.Tensor]:
        values = grouped.values  # padding repeats real values, so extremes need no mask
        low, high = self.code_range
        if self.symmetric:
            if self.scale.signed:
                return {"scale": self.scale.round(signed_extreme(values) * clip / low)}
            top = max(high, 1)  # int1 has no positive level: scale by the magnitude
            return {"scale": self.scale.round(values.abs().amax(dim=-1, keepdim=True) * clip / top)}
        vmin = values.amin(dim=-1, keepdim=True).clamp(max=0) * clip
        vmax = values.amax(dim=-1, keepdim=True).clamp(min=0) * clip
        scale = self.scale.round((vmax - vmin) / high)
        zero = torch.round(-vmin / scale).clamp(0, high)
        return {"scale": scale, "zero": zero.to(torch.uint8)}

    def encode(self, values: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        low, high = self.code_range
        scaled = torch.round(values / params["scale"])
        if self.symmetric:
            return scaled.clamp(low, high).to(torch.int8)
        return (scaled + params["zero"].float()).clamp(low, high).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.symmetric:
            return codes.float() * params["scale"]
        return (codes.float() - params["zero"].float()) * params["scale"]

    def parameter_bits(self, rows: int, cols: int) -> int:
        zero_bits = 0 if self.symmetric else self.granularity.group_count(rows, cols) * self.bits_per_code
        return self.per_group_bits(self.scale, rows, cols) + zero_bits

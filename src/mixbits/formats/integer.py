"""Uniform integer formats: k-bit codes times a per-group scale.

Symmetric: codes in [-2^(k-1), 2^(k-1) - 1], value = code * scale. The scale is
signed and chosen so that the group's largest-magnitude value maps exactly to
-2^(k-1) (llama.cpp's Q4_0 trick): this uses all 2^k levels instead of 2^k - 1.

Asymmetric: codes in [0, 2^k - 1], value = (code - zero) * scale, with an
integer zero point stored in k bits (as GPTQ does). The covered range always
includes 0 so the zero point is representable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import FormatError
from .base import Format
from .granularity import Granularity, Grouped
from .scales import SCALE_DTYPES, ScaleDtype, scale_dtype

MIN_BITS, MAX_BITS = 2, 8
DEFAULT_SCALE = SCALE_DTYPES["fp16"]


@dataclass(frozen=True)
class IntFormat(Format):
    bits_per_code: int
    symmetric: bool
    granularity: Granularity
    scale: ScaleDtype = DEFAULT_SCALE

    def __post_init__(self):
        if not MIN_BITS <= self.bits_per_code <= MAX_BITS:
            raise FormatError(
                f"integer formats take {MIN_BITS} to {MAX_BITS} bits, got {self.bits_per_code}; use e.g. int4:g128:asym"
            )

    PATTERN = re.compile(r"int(-?\d+)")

    @classmethod
    def parse(cls, text: str) -> "IntFormat":
        """Parse `intK:GRAN:sym|asym[:scale=DTYPE]`, e.g. `int4:g128:asym`."""
        head, *fields = text.split(":")
        match = cls.PATTERN.fullmatch(head)
        if not match:
            raise FormatError(f"not an integer format: {text!r}; write e.g. int4:g128:asym")
        if len(fields) < 2:
            raise FormatError(f"{text!r} needs a granularity and sym|asym; write e.g. {head}:g128:asym")
        granularity = Granularity.parse(fields[0])
        if fields[1] not in ("sym", "asym"):
            raise FormatError(f"{text!r}: expected sym or asym after the granularity, got {fields[1]!r}")
        scale = DEFAULT_SCALE
        for extra in fields[2:]:
            key, _, value = extra.partition("=")
            if key != "scale" or not value:
                raise FormatError(f"{text!r}: unknown option {extra!r}; the only option is scale=fp16|bf16|fp32")
            scale = scale_dtype(value)
        return cls(int(match.group(1)), fields[1] == "sym", granularity, scale)

    def __str__(self) -> str:
        text = f"int{self.bits_per_code}:{self.granularity}:{'sym' if self.symmetric else 'asym'}"
        return text if self.scale == DEFAULT_SCALE else f"{text}:scale={self.scale.name}"

    @property
    def code_range(self) -> tuple[int, int]:
        if self.symmetric:
            half = 2 ** (self.bits_per_code - 1)
            return -half, half - 1
        return 0, 2**self.bits_per_code - 1

    def fit(self, grouped: Grouped, clip: float = 1.0) -> dict[str, torch.Tensor]:
        values = grouped.values
        low, high = self.code_range
        if self.symmetric:
            # Padding repeats real values, so no mask is needed for extremes.
            index = values.abs().argmax(dim=-1, keepdim=True)
            extreme = values.gather(-1, index)
            return {"scale": self.scale.round(extreme * (clip / low))}
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

    def bits(self, rows: int, cols: int) -> int:
        per_group = self.scale.bits + (0 if self.symmetric else self.bits_per_code)
        return rows * cols * self.bits_per_code + self.granularity.group_count(rows, cols) * per_group

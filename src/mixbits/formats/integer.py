"""Uniform integer formats: k-bit codes times a per-group scale, k = 1..8.

Symmetric: codes in [-2^(k-1), 2^(k-1) - 1], value = code * scale. With a
signed scale dtype the scale takes the sign of the group's largest-magnitude
value, which then maps exactly to -2^(k-1) (llama.cpp's Q4_0 trick): all 2^k
levels are used. With an unsigned scale dtype (e8m0) the scale is positive
and the largest magnitude maps to 2^(k-1) - 1.

Asymmetric: codes in [0, 2^k - 1], value = (code - zero) * scale, with an
integer zero point stored in k bits (as GPTQ does). The covered range always
includes 0 so the zero point is representable.

Asymmetric with a float minimum (`min=CODEC`): value = code * scale + min,
the minimum stored by its own codec (llama.cpp's Q4_1: fp16; Q4_K: u6s8,
where minimums are clamped to at most 0 and stored negated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import FormatError
from .base import Clip, Format
from .granularity import Granularity, Grouped
from .naming import granularity_field, scale_option, scale_suffix, split
from .scales import DEFAULT_SCALE, NegatedScale, ScaleCodec, scale_codec

MIN_BITS, MAX_BITS = 1, 8


def signed_extreme(values: torch.Tensor) -> torch.Tensor:
    """Per group, the value of largest magnitude with its sign: [R, G, 1]."""
    return values.gather(-1, values.abs().argmax(dim=-1, keepdim=True))


def zero_point_params(lowest: torch.Tensor, highest: torch.Tensor, clip, high, codec: ScaleCodec):
    """Scale and zero point (as float) of asymmetric codes in [0, high] covering [lowest, highest] * clip, where
    lowest <= 0 <= highest per group; `high` a number or a tensor broadcasting over the groups (several widths)."""
    vmin = lowest * clip
    scale = codec.round((highest * clip - vmin) / high)
    return scale, torch.round(-vmin / scale).clamp(min=0).clamp(max=high)


def zero_point_codes(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, high) -> torch.Tensor:
    """Asymmetric codes (as float) of `values` under `zero_point_params`' scale and zero point."""
    return (torch.round(values / scale) + zero).clamp(min=0).clamp(max=high)


@dataclass(frozen=True)
class IntFormat(Format):
    bits_per_code: int
    symmetric: bool
    granularity: Granularity
    scale: ScaleCodec = DEFAULT_SCALE
    show_scale: bool = field(default=False, compare=False)
    label: str = field(default="", compare=False)  # a preset's name, e.g. nvint4
    min: ScaleCodec | None = None  # asymmetric with a float minimum instead of an integer zero point

    PATTERN = re.compile(r"int(-?\d+)")

    def __post_init__(self):
        if self.min is not None and self.symmetric:
            raise FormatError(f"a stored minimum (min=...) needs an asymmetric format; write int{self.bits_per_code}:...:asym:min=...")
        if not MIN_BITS <= self.bits_per_code <= MAX_BITS:
            raise FormatError(
                f"integer formats take {MIN_BITS} to {MAX_BITS} bits, got {self.bits_per_code}; use e.g. int4:g128:asym"
            )

    @classmethod
    def parse(cls, text: str) -> "IntFormat":
        """Parse `intK:GRAN:sym|asym[:scale=DTYPE][:min=DTYPE]`, e.g. `int4:g128:asym` or `int4:g32:asym:min=fp16`."""
        head, positional, options = split(text, ("scale", "min"))
        match = cls.PATTERN.fullmatch(head)
        if not match:
            raise FormatError(f"not an integer format: {text!r}; write e.g. int4:g128:asym")
        if len(positional) != 2:
            raise FormatError(f"{text!r} needs a granularity and sym|asym; write e.g. {head}:g128:asym")
        granularity = granularity_field(text, positional, f"{head}:g128:asym")
        if positional[1] not in ("sym", "asym"):
            raise FormatError(f"{text!r}: expected sym or asym after the granularity, got {positional[1]!r}")
        scale, explicit = scale_option(options)
        minimum = scale_codec(options["min"]) if "min" in options else None
        return cls(int(match.group(1)), positional[1] == "sym", granularity, scale, explicit, min=minimum)

    def __str__(self) -> str:
        if self.label:
            return self.label
        kind = "sym" if self.symmetric else "asym"
        minimum = f":min={self.min.name}" if self.min is not None else ""
        return f"int{self.bits_per_code}:{self.granularity}:{kind}" + scale_suffix(self.scale, self.show_scale) + minimum

    @property
    def offset_codec(self) -> ScaleCodec | None:
        """How the minimum is stored: unsigned codecs hold its (non-negative) negation."""
        if self.min is None:
            return None
        return self.min if self.min.signed else NegatedScale(self.min)

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
        if self.min is not None:
            vmin, vmax = values.amin(dim=-1, keepdim=True), values.amax(dim=-1, keepdim=True)
            if not self.min.signed:
                vmin = vmin.clamp(max=0)
            minimum = self.offset_codec.round(vmin * clip)
            span = (vmax * clip - minimum).clamp(min=torch.finfo(torch.float32).tiny)
            return {"scale": self.scale.round(span / high), "min": minimum}
        scale, zero = zero_point_params(values.amin(dim=-1, keepdim=True).clamp(max=0),
                                        values.amax(dim=-1, keepdim=True).clamp(min=0), clip, high, self.scale)
        return {"scale": scale, "zero": zero.to(torch.uint8)}

    def encode(self, values: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        low, high = self.code_range
        if self.min is not None:
            return torch.round((values - params["min"]) / params["scale"]).clamp(low, high).to(torch.uint8)
        if self.symmetric:
            return torch.round(values / params["scale"]).clamp(low, high).to(torch.int8)
        return zero_point_codes(values, params["scale"], params["zero"].float(), high).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.symmetric:
            return codes.float() * params["scale"]
        if self.min is not None:  # in this order, as llama.cpp dequantizes Q4_1 and Q4_K
            return codes.float() * params["scale"] + params["min"]
        return (codes.float() - params["zero"].float()) * params["scale"]

    @property
    def signed_codes(self) -> bool:
        return self.symmetric

    def stored_params(self) -> dict[str, ScaleCodec | int]:
        if self.symmetric:
            return {"scale": self.scale}
        if self.min is not None:
            return {"scale": self.scale, "min": self.offset_codec}
        return {"scale": self.scale, "zero": self.bits_per_code}

    def parameter_bits(self, rows: int, cols: int) -> int:
        if self.min is not None:
            return self.per_group_bits(self.scale, rows, cols) + self.per_group_bits(self.min, rows, cols)
        zero_bits = 0 if self.symmetric else self.granularity.group_count(rows, cols) * self.bits_per_code
        return self.per_group_bits(self.scale, rows, cols) + zero_bits

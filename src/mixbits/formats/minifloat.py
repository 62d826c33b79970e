"""Scaled minifloat formats: ExMy elements times a per-group scale.

`fp4_e2m1:g32:scale=fp16`: FP4 E2M1 elements, groups of 32, fp16 scales.
Options: `bias=N` (default 2^(E-1) - 1), `specials=ieee|fn|none` (default:
OCP's convention for that element type). The scale maps each group's largest
magnitude to the element type's largest finite value.

NVFP4 is the preset `nvfp4` = `fp4_e2m1:g16:scale=e4m3`: E2M1 elements in
blocks of 16, an E4M3 scale per block and an FP32 scale per tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import FormatError
from .base import Clip, Format
from .elements import Minifloat, default_specials, minifloat
from .granularity import Granularity, Grouped
from .naming import granularity_field, int_option, scale_option, scale_suffix, split
from .scales import DEFAULT_SCALE, ScaleCodec


@dataclass(frozen=True)
class MinifloatFormat(Format):
    element: Minifloat
    granularity: Granularity
    scale: ScaleCodec = DEFAULT_SCALE
    show_scale: bool = field(default=False, compare=False)
    label: str = field(default="", compare=False)

    PATTERN = re.compile(r"fp(\d+)_e(\d+)m(\d+)")

    @classmethod
    def parse(cls, text: str) -> "MinifloatFormat":
        head, positional, options = split(text, ("scale", "bias", "specials"))
        match = cls.PATTERN.fullmatch(head)
        if not match:
            raise FormatError(f"not a minifloat format: {text!r}; write e.g. fp4_e2m1:g32:scale=fp16")
        width, e_bits, m_bits = (int(g) for g in match.groups())
        if width != 1 + e_bits + m_bits:
            raise FormatError(f"{head!r}: 1 sign + {e_bits} exponent + {m_bits} mantissa bits is not {width}; write e.g. fp{1 + e_bits + m_bits}_e{e_bits}m{m_bits}")
        if len(positional) != 1:
            raise FormatError(f"{text!r} needs exactly one granularity; write e.g. {head}:g32")
        granularity = granularity_field(text, positional, f"{head}:g32")
        element = minifloat(e_bits, m_bits, int_option(text, options, "bias"), options.get("specials"))
        scale, explicit = scale_option(options)
        return cls(element, granularity, scale, explicit)

    def __str__(self) -> str:
        if self.label:
            return self.label
        e = self.element
        text = f"fp{e.width}_{e.name}:{self.granularity}"
        if e.bias != (1 << (e.exponent_bits - 1)) - 1:
            text += f":bias={e.bias}"
        if e.specials != default_specials(e.exponent_bits, e.mantissa_bits):
            text += f":specials={e.specials}"
        return text + scale_suffix(self.scale, self.show_scale)

    @property
    def code_bits(self) -> int:
        return self.element.width

    def fit(self, grouped: Grouped, clip: Clip = 1.0, importance=None) -> dict[str, torch.Tensor]:
        top = grouped.values.abs().amax(dim=-1, keepdim=True)
        return {"scale": self.scale.round(top * clip / self.element.max)}

    def encode(self, values: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.element.encode(values / params["scale"])

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.element.decode(codes) * params["scale"]

    def parameter_bits(self, rows: int, cols: int) -> int:
        return self.per_group_bits(self.scale, rows, cols)

"""Storage of per-group scales: a scale codec rounds float32 scales to what is stored.

Scales are computed in float32 and rounded by the codec *before* codes are
chosen, so dequantizing with the stored scales is exact. A codec also counts
the bits of everything it stores, including a second-level scale:

- fp32, fp16, bf16: a plain cast per group.
- e8m0: a power of two per group (OCP MX's scale type; no sign, no zero).
- e4m3: FP8 E4M3 per group times one float32 scale per tensor (NVFP4's scheme).
- i8: a signed 8-bit integer per group times one fp16 scale per row
  (like llama.cpp's k-quant super-blocks).

Codecs without a sign bit (e8m0) report `signed = False`; formats then use
positive scales.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from ..errors import FormatError
from .elements import E4M3


class ScaleCodec(ABC):
    name: str
    signed: bool = True
    second_level: ClassVar[bool] = False  # stores a scale shared across groups (see `pinned`)

    @abstractmethod
    def round(self, scale: torch.Tensor) -> torch.Tensor:
        """Round float32 scales [R, G, 1] to stored values (returned as float32); never 0 or inf."""

    @abstractmethod
    def bits(self, rows: int, groups_per_row: int) -> int:
        """Bits of all stored scales for a [rows, groups_per_row, 1] scale tensor."""

    def pinned(self, stored: torch.Tensor) -> "ScaleCodec":
        """This codec with its second-level scale fixed to the one behind `stored` (scales it rounded).

        Solvers that fit groups one at a time (GPTQ) round every group under
        the same second level, so the stored tensor stays one consistent
        encoding. Codecs without a second level return themselves.
        """
        return self


@dataclass(frozen=True)
class CastScale(ScaleCodec):
    name: str
    width: int
    dtype: torch.dtype

    def round(self, scale: torch.Tensor) -> torch.Tensor:
        info = torch.finfo(self.dtype)
        # 16-bit scales may be subnormal (smallest = smallest_normal * eps); float32 ones stay normal.
        tiny = info.smallest_normal * (info.eps if info.bits == 16 else 1.0)
        return _clamp_magnitude(scale, tiny, info.max).to(self.dtype).to(torch.float32)

    def bits(self, rows: int, groups_per_row: int) -> int:
        return rows * groups_per_row * self.width


@dataclass(frozen=True)
class E8M0Scale(ScaleCodec):
    """2^e for e in [-127, 127]; rounds to nearest in the linear domain, ties up (as ml_dtypes' float8_e8m0fnu)."""

    name: str = "e8m0"
    signed: bool = False

    def round(self, scale: torch.Tensor) -> torch.Tensor:
        mantissa, exponent = torch.frexp(scale.abs().clamp(min=2.0**-127))  # scale = m * 2^e, m in [0.5, 1)
        exponent = torch.where(mantissa >= 0.75, exponent, exponent - 1).clamp(-127, 127)
        return torch.ldexp(torch.ones_like(scale), exponent)

    def bits(self, rows: int, groups_per_row: int) -> int:
        return rows * groups_per_row * 8


@dataclass(frozen=True)
class E4M3Scale(ScaleCodec):
    """FP8 E4M3 group scales under one float32 tensor scale that maps the largest to 448."""

    name: str = "e4m3"
    second_level: ClassVar[bool] = True
    tensor_scale: torch.Tensor | None = field(default=None, compare=False)  # set when pinned

    def round(self, scale: torch.Tensor) -> torch.Tensor:
        tensor_scale = self.tensor_scale
        if tensor_scale is None:
            tensor_scale = scale.abs().amax().clamp(min=torch.finfo(torch.float32).smallest_normal) / 448.0
        # E4M3's smallest subnormal is 2^-9; below it a group would get scale 0.
        grouped = _clamp_magnitude(scale / tensor_scale, 2.0**-9, 448.0)
        return E4M3.decode(E4M3.encode(grouped)) * tensor_scale

    def bits(self, rows: int, groups_per_row: int) -> int:
        return rows * groups_per_row * 8 + 32

    def pinned(self, stored: torch.Tensor) -> "E4M3Scale":
        # The largest stored scale is 448 tensor scales (448 is an E4M3 value), up to float32 rounding.
        return replace(self, tensor_scale=stored.abs().amax() / 448.0)


@dataclass(frozen=True)
class Int8Scale(ScaleCodec):
    """Signed 8-bit group scales in [-127, 127] times one fp16 scale per row."""

    name: str = "i8"
    second_level: ClassVar[bool] = True
    row_scale: torch.Tensor | None = field(default=None, compare=False)  # [R, 1, 1], set when pinned

    def round(self, scale: torch.Tensor) -> torch.Tensor:
        row_scale = self.row_scale
        if row_scale is None:
            row_scale = CAST["fp16"].round(scale.abs().amax(dim=(1, 2), keepdim=True) / 127.0)
        steps = torch.round(scale / row_scale).clamp(-127, 127)
        # A group whose scale rounds to 0 would lose all its weights: keep one step.
        steps = torch.where(steps == 0, torch.where(scale < 0, -1.0, 1.0), steps)
        return steps * row_scale

    def bits(self, rows: int, groups_per_row: int) -> int:
        return rows * groups_per_row * 8 + rows * 16

    def pinned(self, stored: torch.Tensor) -> "Int8Scale":
        # Each row's largest stored scale is 127 row scales; re-rounding to fp16 recovers the row scale.
        return replace(self, row_scale=CAST["fp16"].round(stored.abs().amax(dim=(1, 2), keepdim=True) / 127.0))


def _clamp_magnitude(scale: torch.Tensor, low: float, high: float) -> torch.Tensor:
    sign = torch.where(scale < 0, -1.0, 1.0)
    return sign * scale.abs().clamp(min=low, max=high)


CAST = {
    "fp32": CastScale("fp32", 32, torch.float32),
    "fp16": CastScale("fp16", 16, torch.float16),
    "bf16": CastScale("bf16", 16, torch.bfloat16),
}
SCALE_CODECS: dict[str, ScaleCodec] = {**CAST, "e8m0": E8M0Scale(), "e4m3": E4M3Scale(), "i8": Int8Scale()}
DEFAULT_SCALE = CAST["fp16"]


def scale_codec(name: str) -> ScaleCodec:
    try:
        return SCALE_CODECS[name]
    except KeyError:
        raise FormatError(f"unknown scale dtype {name!r}; use one of {', '.join(SCALE_CODECS)}") from None

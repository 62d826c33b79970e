"""Storage of per-group scales: a scale codec rounds float32 scales to what is stored.

Scales are computed in float32 and rounded by the codec *before* codes are
chosen, so dequantizing with the stored scales is exact. A codec also counts
the bits of everything it stores, including a second-level scale:

- fp32, fp16, bf16: a plain cast per group.
- e8m0: a power of two per group (OCP MX's scale type; no sign, no zero).
- e4m3: FP8 E4M3 per group times one float32 scale per tensor (NVFP4's scheme).
- i8: a signed 8-bit integer per group times one fp16 scale per row.
- uKsN / iKsN: an unsigned / signed K-bit integer per group times one fp16
  scale per super-block of N consecutive groups of a row: llama.cpp's
  k-quants (Q4_K: u6s8 scales and mins over 8 groups of 32; Q6_K: i8s16
  over 16 groups of 16).

Codecs without a sign bit (e8m0) report `signed = False`; formats then use
positive scales.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from ..errors import FormatError
from ..packing import pack, unpack
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

    @abstractmethod
    def store(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors that hold `values` (scales this codec rounded) in their stored dtypes; "value" is per group."""

    @abstractmethod
    def restore(self, stored: dict[str, torch.Tensor], shape: tuple[int, int, int]) -> torch.Tensor:
        """Float32 values of `shape` [rows, groups, per group] back from `store`'s tensors, exactly."""

    def for_group(self, index: int) -> "ScaleCodec":
        """A pinned codec for group `index` of each row alone (solvers that fit one group at a time)."""
        return self

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

    def store(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"value": values.to(self.dtype)}

    def restore(self, stored: dict[str, torch.Tensor], shape: tuple[int, int, int]) -> torch.Tensor:
        return stored["value"].float().reshape(shape)


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

    def store(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        _, exponent = torch.frexp(values)  # values are 2^e = 0.5 * 2^(e+1)
        return {"value": (exponent - 1 + 127).to(torch.uint8)}

    def restore(self, stored: dict[str, torch.Tensor], shape: tuple[int, int, int]) -> torch.Tensor:
        exponent = stored["value"].to(torch.int32).reshape(shape) - 127
        return torch.ldexp(torch.ones(exponent.shape), exponent)


@dataclass(frozen=True)
class E4M3Scale(ScaleCodec):
    """FP8 E4M3 group scales under one float32 tensor scale that maps the largest to 448."""

    name: str = "e4m3"
    second_level: ClassVar[bool] = True
    tensor_scale: torch.Tensor | None = field(default=None, compare=False)  # set when pinned

    def round(self, scale: torch.Tensor) -> torch.Tensor:
        tensor_scale = self.tensor_scale
        if tensor_scale is None:
            largest = scale.abs().amax().clamp(min=torch.finfo(torch.float32).smallest_normal)
            tensor_scale = _short_mantissa(largest / 448.0)
        # E4M3's smallest subnormal is 2^-9; below it a group would get scale 0.
        grouped = _clamp_magnitude(scale / tensor_scale, 2.0**-9, 448.0)
        return E4M3.decode(E4M3.encode(grouped)) * tensor_scale

    def bits(self, rows: int, groups_per_row: int) -> int:
        return rows * groups_per_row * 8 + 32

    def pinned(self, stored: torch.Tensor) -> "E4M3Scale":
        # The largest stored scale is exactly 448 tensor scales (448 is an E4M3 value; see _short_mantissa).
        return replace(self, tensor_scale=stored.abs().amax() / 448.0)

    def store(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        tensor_scale = self.tensor_scale if self.tensor_scale is not None else self.pinned(values).tensor_scale
        return {"value": (values / tensor_scale).to(torch.float8_e4m3fn), "tensor": tensor_scale.reshape(1)}

    def restore(self, stored: dict[str, torch.Tensor], shape: tuple[int, int, int]) -> torch.Tensor:
        return stored["value"].float().reshape(shape) * stored["tensor"].float()


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

    def store(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        row_scale = self.row_scale if self.row_scale is not None else self.pinned(values).row_scale
        return {"value": torch.round(values / row_scale).to(torch.int8), "row": row_scale.half().reshape(-1)}

    def restore(self, stored: dict[str, torch.Tensor], shape: tuple[int, int, int]) -> torch.Tensor:
        return stored["value"].float().reshape(shape) * stored["row"].float().reshape(shape[0], 1, 1)


@dataclass(frozen=True)
class SuperblockScale(ScaleCodec):
    """K-bit integer steps per group times one fp16 scale per super-block of `groups` consecutive groups of a row.

    Unsigned codecs store magnitudes (used for positive scales; offsets use
    `NegatedScale`). A non-zero value never rounds to zero steps.
    """

    width: int
    groups: int
    signed: bool = True
    second_level: ClassVar[bool] = True
    block_scale: torch.Tensor | None = field(default=None, compare=False)  # [R, blocks, 1], set when pinned

    @property
    def name(self) -> str:
        return f"{'i' if self.signed else 'u'}{self.width}s{self.groups}"

    @property
    def top(self) -> int:
        return 2 ** (self.width - 1) - 1 if self.signed else 2**self.width - 1

    def _per_group(self, block_scale: torch.Tensor, count: int) -> torch.Tensor:
        if block_scale.shape[1] == 1:
            return block_scale
        return block_scale.repeat_interleave(self.groups, dim=1)[:, :count]

    def _fit_block_scale(self, scale: torch.Tensor) -> torch.Tensor:
        rows, count, _ = scale.shape
        blocks = -(-count // self.groups)
        padded = torch.zeros(rows, blocks * self.groups, 1)
        padded[:, :count] = scale.abs()
        largest = padded.reshape(rows, blocks, self.groups).amax(dim=2, keepdim=True)
        return CAST["fp16"].round(largest / self.top)

    def round(self, scale: torch.Tensor) -> torch.Tensor:
        block_scale = self.block_scale if self.block_scale is not None else self._fit_block_scale(scale)
        step = self._per_group(block_scale, scale.shape[1])
        low = -self.top if self.signed else 0
        steps = torch.round((scale if self.signed else scale.abs()) / step).clamp(low, self.top)
        steps = torch.where((steps == 0) & (scale != 0), 1.0, steps)
        if self.signed:
            steps = torch.where((steps == 1) & (scale < 0), -1.0, steps)
        return steps * step

    def bits(self, rows: int, groups_per_row: int) -> int:
        return rows * groups_per_row * self.width + rows * -(-groups_per_row // self.groups) * 16

    def pinned(self, stored: torch.Tensor) -> "SuperblockScale":
        # Each super-block's largest stored value is `top` steps; re-rounding to fp16 recovers the step.
        return replace(self, block_scale=self._fit_block_scale(stored))

    def for_group(self, index: int) -> "SuperblockScale":
        block = index // self.groups
        return replace(self, block_scale=self.block_scale[:, block:block + 1])

    def store(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        block_scale = self.block_scale if self.block_scale is not None else self._fit_block_scale(values)
        steps = torch.round(values / self._per_group(block_scale, values.shape[1]))
        offset = 2 ** (self.width - 1) if self.signed else 0  # steps stored unsigned, at their width
        return {"value": pack((steps + offset).to(torch.int16).reshape(-1), self.width),
                "block": block_scale.half().reshape(block_scale.shape[0], -1)}

    def restore(self, stored: dict[str, torch.Tensor], shape: tuple[int, int, int]) -> torch.Tensor:
        rows, count, _ = shape
        offset = 2 ** (self.width - 1) if self.signed else 0
        steps = unpack(stored["value"], self.width, rows * count).float().reshape(shape) - offset
        block_scale = stored["block"].float().reshape(rows, -(-count // self.groups), 1)
        return steps * self._per_group(block_scale, count)


@dataclass(frozen=True)
class NegatedScale(ScaleCodec):
    """Non-positive values stored by an unsigned codec as their negation (k-quant minimums)."""

    inner: ScaleCodec

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def second_level(self) -> bool:
        return self.inner.second_level

    def round(self, scale: torch.Tensor) -> torch.Tensor:
        return -self.inner.round(-scale)

    def bits(self, rows: int, groups_per_row: int) -> int:
        return self.inner.bits(rows, groups_per_row)

    def pinned(self, stored: torch.Tensor) -> "NegatedScale":
        return replace(self, inner=self.inner.pinned(-stored))

    def for_group(self, index: int) -> "NegatedScale":
        return replace(self, inner=self.inner.for_group(index))

    def store(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.inner.store(-values)

    def restore(self, stored: dict[str, torch.Tensor], shape: tuple[int, int, int]) -> torch.Tensor:
        return -self.inner.restore(stored, shape)


def _short_mantissa(value: torch.Tensor) -> torch.Tensor:
    """`value` rounded to 20 significant bits, so that 448 * it and (an E4M3 value) * it are exact in float32.

    Then a stored NVFP4-style scale divided by the tensor scale gives back its
    E4M3 value exactly, and a saved checkpoint restores every scale bit for bit.
    """
    mantissa, exponent = torch.frexp(value)
    return torch.ldexp(torch.round(mantissa * 2**20) / 2**20, exponent)


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


SUPERBLOCK = re.compile(r"([iu])(\d+)s(\d+)")


def scale_codec(name: str) -> ScaleCodec:
    if name in SCALE_CODECS:
        return SCALE_CODECS[name]
    match = SUPERBLOCK.fullmatch(name)
    if match:
        width, groups = int(match.group(2)), int(match.group(3))
        if not 2 <= width <= 8 or groups < 1:
            raise FormatError(f"super-block scales take 2 to 8 bits and at least 1 group, got {name!r}; e.g. u6s8 or i8s16")
        return SuperblockScale(width, groups, signed=match.group(1) == "i")
    raise FormatError(f"unknown scale dtype {name!r}; use one of {', '.join(SCALE_CODECS)} or a super-block "
                      "codec such as u6s8 (6-bit steps, fp16 scale per 8 groups)")

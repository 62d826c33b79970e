"""What every number format provides.

A format maps a weight matrix to integer codes plus per-group parameters and
back. Solvers drive formats only through this interface:

    params = fmt.fit(grouped, clip)      # per-group parameters for clip ratio(s)
    codes  = fmt.encode(values, params)  # nearest representable point
    approx = fmt.decode(codes, params)   # dequantized values, float32

`bits(rows, cols)` is the one place where storage cost is counted: codes plus
every stored parameter (scales, zero points, tables, second-level scales).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace

import torch

from .granularity import Granularity, Grouped, to_groups, ungroup
from .scales import ScaleCodec

# Ratios tried by the clipping search: 1.00, 0.98, ..., 0.50.
CLIP_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(26))

Clip = float | torch.Tensor  # a scalar, or one ratio per group ([R, G, 1])


@dataclass
class QuantizedTensor:
    """Codes and parameters of one quantized matrix, in the grouped layout."""

    format: "Format"
    shape: tuple[int, int]
    codes: torch.Tensor
    params: dict[str, torch.Tensor]
    # The values the solver rounded to `codes` (GPTQ: its error-updated weights), grouped like them; kept only when
    # asked for (block-wise tuning moves them across rounding boundaries), never stored.
    source: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def dequantize(self) -> torch.Tensor:
        return ungroup(self.format.decode(self.codes, self.params), self.shape)

    def split_rows(self, sizes: list[int]) -> list["QuantizedTensor"]:
        """Consecutive row blocks of `sizes` rows as tensors of their own (formats with per-row parameters)."""
        cols = self.shape[1]
        sources = self.source.split(sizes) if self.source is not None else [None] * len(sizes)
        pieces = zip(self.codes.split(sizes), sources, *(value.split(sizes) for value in self.params.values()))
        return [QuantizedTensor(self.format, (codes.shape[0], cols), codes, dict(zip(self.params, values)), source)
                for codes, source, *values in pieces]


class Format(ABC):
    granularity: Granularity
    # Clip ratios the round-to-nearest search tries; (1.0,) means no search.
    clip_grid: tuple[float, ...] = CLIP_GRID

    @property
    @abstractmethod
    def code_bits(self) -> int:
        """Width of one stored code."""

    @abstractmethod
    def fit(self, grouped: Grouped, clip: Clip = 1.0, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-group parameters; `clip` < 1 shrinks the covered range.

        `importance` (grouped like the values, or None) weighs each value's
        error; formats that learn their grid from data use it.
        """

    @abstractmethod
    def encode(self, values: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Codes of grouped `values` [R, G, g] under `params`."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float32 values of `codes` under `params`."""

    @abstractmethod
    def parameter_bits(self, rows: int, cols: int) -> int:
        """Storage bits of everything but the codes: scales, zero points, tables, second-level scales."""

    @abstractmethod
    def __str__(self) -> str:
        """The format string it was parsed from; `parse_format(str(f)) == f`."""

    # Whether codes are two's complement (int8) rather than unsigned (uint8); stored offset by 2^(width-1).
    signed_codes = False
    # Weights one code covers, consecutive along a row (vector codebooks: GPTQ rounds them together).
    vector_size = 1
    # Whether each weight's code is its own rounding (block-wise tuning moves weights across rounding boundaries);
    # False for codes chosen jointly (vector codebooks, trellis walks).
    rounds_each_weight = True
    # Whether a parameter is shared by all rows (a codebook per matrix), so rows of several matrices cannot be
    # quantized as one.
    shared_across_rows = False

    @property
    def code_bits_per_weight(self) -> float:
        """Code bits each weight costs (a vector codebook's are its index bits times stages per vector)."""
        return float(self.code_bits)

    def code_count(self, rows: int, cols: int) -> int:
        """Codes stored for a [rows, cols] matrix."""
        return rows * cols

    def flat_codes(self, codes: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """The stored codes of grouped `codes`, [rows, code_count / rows], without a partial group's padding."""
        return ungroup(codes, shape)

    def grouped_codes(self, flat: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """`flat_codes` back in the grouped layout, a partial group padded by repeating its last code."""
        return to_groups(flat.reshape(shape[0], -1), self.granularity).values

    def stored_params(self) -> dict[str, "ScaleCodec | int"]:
        """How each parameter is stored: a scale codec for float values, or a width in bits for unsigned integers."""
        return {"scale": self.scale}

    def param_shape(self, name: str, rows: int, cols: int) -> tuple[int, int, int]:
        """Shape of parameter `name` of a [rows, cols] matrix: [param rows, groups per row, values per group]."""
        return self.param_rows(rows), self.granularity.groups_per_row(cols), 1

    def for_group(self, index: int) -> "Format":
        """This (pinned) format for group `index` of each row alone, for solvers that fit one group at a time."""
        changes = {name: codec.for_group(index) for name, codec in self._second_level_codecs()}
        return replace(self, **changes) if changes else self

    def bits(self, rows: int, cols: int) -> int:
        """Exact storage bits of a [rows, cols] matrix: codes and all parameters."""
        return self.code_count(rows, cols) * self.code_bits + self.parameter_bits(rows, cols)

    def per_group_bits(self, codec: ScaleCodec, rows: int, cols: int, per_group: int = 1) -> int:
        """Bits of `per_group` values per group stored with `codec` (scales, or table entries)."""
        return codec.bits(self.param_rows(rows), self.granularity.groups_per_row(cols) * per_group)

    def bits_per_weight(self, rows: int, cols: int) -> float:
        return self.bits(rows, cols) / (rows * cols)

    def param_rows(self, rows: int) -> int:
        """Rows of the parameter tensors ([rows, groups_per_row, 1]; 1 for per-tensor)."""
        return 1 if self.granularity.kind == "tensor" else rows

    def pinned(self, params: dict[str, torch.Tensor]) -> "Format":
        """This format with every second-level scale fixed to the one `params` were stored under.

        Fitting a subset of groups with the pinned format gives parameters
        consistent with `params` (see `ScaleCodec.pinned`).
        """
        changes = {
            name: codec.pinned(params[name]) for name, codec in self._second_level_codecs() if name in params
        }
        return replace(self, **changes) if changes else self

    @property
    def has_second_level(self) -> bool:
        """Whether some stored scale is shared across groups, so groups cannot be fitted independently."""
        return any(True for _ in self._second_level_codecs())

    def _second_level_codecs(self):
        for spec in fields(self):
            codec = getattr(self, spec.name)
            if isinstance(codec, ScaleCodec) and codec.second_level:
                yield spec.name, codec

    def quantize(self, matrix: torch.Tensor, clip: Clip = 1.0) -> QuantizedTensor:
        """Plain rounding at one clip ratio (solvers add searches and error feedback)."""
        grouped = to_groups(matrix.detach().float(), self.granularity)
        params = self.fit(grouped, clip)
        return QuantizedTensor(self, grouped.shape, self.encode(grouped.values, params), params)

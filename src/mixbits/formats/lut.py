"""Non-uniform formats: a table of levels per group, codes index the table.

- `nf4:GRAN`: QLoRA's NormalFloat4, 16 levels at normal quantiles in [-1, 1],
  times the group's absmax (the scale).
- `logK:GRAN`: 0 and +-2^-i (i = 0 .. 2^(K-1) - 2), 2^K - 1 levels, times the
  group's absmax.
- `lutK:GRAN[:table=fp16]`: 2^K levels learned per group by weighted k-means
  (SqueezeLLM's idea when the weights are sensitivities); the table is stored
  in the given dtype and counted in the bits.

Values exactly halfway between two levels go to the lower one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..errors import FormatError
from .base import Clip, Format
from .granularity import Granularity, Grouped
from .naming import granularity_field, scale_option, scale_suffix, split
from .scales import DEFAULT_SCALE, ScaleCodec, scale_codec

KMEANS_STEPS = 25


@lru_cache(maxsize=None)
def normal_float_levels(bits: int = 4) -> tuple[float, ...]:
    """NormalFloat levels (QLoRA): normal quantiles, 2^(k-1) positive and 2^(k-1)-1 negative, plus 0, scaled to [-1, 1]."""
    from scipy.stats import norm

    offset = 0.9677083  # QLoRA's choice: the outermost quantile probability
    half = 2 ** (bits - 1)
    positive = norm.ppf(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1].numpy())
    negative = -norm.ppf(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1].numpy())
    levels = sorted([*positive.tolist(), 0.0, *negative.tolist()])
    top = max(abs(v) for v in levels)
    return tuple(v / top for v in levels)


def log_levels(bits: int) -> tuple[float, ...]:
    magnitudes = [2.0**-i for i in range(2 ** (bits - 1) - 1)]
    return tuple(sorted([*(-m for m in magnitudes), 0.0, *magnitudes]))


def nearest_level(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted `levels` (broadcast over leading dims); ties go low."""
    midpoints = (levels[..., 1:] + levels[..., :-1]) / 2
    if midpoints.dim() == 1:
        return torch.searchsorted(midpoints, values.contiguous())
    return torch.searchsorted(midpoints.contiguous(), values.contiguous())


def fit_weights(grouped: Grouped, importance: torch.Tensor | None) -> torch.Tensor:
    """Per-value weights for fitting: the importance (or 1), 0 on padding."""
    weights = torch.ones_like(grouped.values) if importance is None else importance.float()
    return weights if grouped.mask is None else weights * grouped.mask


@dataclass(frozen=True)
class TableFormat(Format):
    """A fixed table of levels in [-1, 1] times a per-group absmax scale."""

    family: str
    bits_per_code: int
    granularity: Granularity
    scale: ScaleCodec = DEFAULT_SCALE
    show_scale: bool = field(default=False, compare=False)

    PATTERN = re.compile(r"(nf|log)(\d+)")

    def __post_init__(self):
        if self.family == "nf" and self.bits_per_code != 4:
            raise FormatError(f"NormalFloat is defined for 4 bits; write nf4 (got nf{self.bits_per_code})")
        if self.family == "log" and not 2 <= self.bits_per_code <= 8:
            raise FormatError(f"log grids take 2 to 8 bits, got log{self.bits_per_code}")

    @classmethod
    def parse(cls, text: str) -> "TableFormat":
        head, positional, options = split(text, ("scale",))
        match = cls.PATTERN.fullmatch(head)
        if not match or len(positional) != 1:
            raise FormatError(f"{text!r}: write a table format as nf4:g64 or log4:g64")
        scale, explicit = scale_option(options)
        return cls(match.group(1), int(match.group(2)), granularity_field(text, positional, f"{head}:g64"), scale, explicit)

    def __str__(self) -> str:
        return f"{self.family}{self.bits_per_code}:{self.granularity}" + scale_suffix(self.scale, self.show_scale)

    @property
    def levels(self) -> torch.Tensor:
        table = normal_float_levels(4) if self.family == "nf" else log_levels(self.bits_per_code)
        return torch.tensor(table, dtype=torch.float32)

    @property
    def code_bits(self) -> int:
        return self.bits_per_code

    def fit(self, grouped: Grouped, clip: Clip = 1.0, importance=None) -> dict[str, torch.Tensor]:
        top = grouped.values.abs().amax(dim=-1, keepdim=True)
        return {"scale": self.scale.round(top * clip)}

    def encode(self, values: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return nearest_level(values / params["scale"], self.levels).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.levels[codes.long()] * params["scale"]

    def parameter_bits(self, rows: int, cols: int) -> int:
        return self.per_group_bits(self.scale, rows, cols)


@dataclass(frozen=True)
class LearnedTableFormat(Format):
    """2^K levels per group, learned by (importance-weighted) k-means."""

    bits_per_code: int
    granularity: Granularity
    table: ScaleCodec = DEFAULT_SCALE
    show_table: bool = field(default=False, compare=False)
    clip_grid = (1.0,)  # k-means places the levels itself

    PATTERN = re.compile(r"lut(\d+)")

    def __post_init__(self):
        if not 1 <= self.bits_per_code <= 8:
            raise FormatError(f"lookup tables take 1 to 8 bits, got lut{self.bits_per_code}")

    @classmethod
    def parse(cls, text: str) -> "LearnedTableFormat":
        head, positional, options = split(text, ("table",))
        match = cls.PATTERN.fullmatch(head)
        if not match or len(positional) != 1:
            raise FormatError(f"{text!r}: write a learned table format as lut4:g128 or lut3:ch[:table=fp16]")
        table = scale_codec(options["table"]) if "table" in options else DEFAULT_SCALE
        return cls(int(match.group(1)), granularity_field(text, positional, f"{head}:g128"), table, "table" in options)

    def __str__(self) -> str:
        suffix = f":table={self.table.name}" if self.show_table or self.table != DEFAULT_SCALE else ""
        return f"lut{self.bits_per_code}:{self.granularity}{suffix}"

    @property
    def code_bits(self) -> int:
        return self.bits_per_code

    def fit(self, grouped: Grouped, clip: Clip = 1.0, importance=None) -> dict[str, torch.Tensor]:
        values = grouped.values
        weights = fit_weights(grouped, importance)
        count = 2**self.bits_per_code
        # Start from evenly spaced quantiles of each group: deterministic and spread out.
        ordered = values.sort(dim=-1).values
        ranks = ((torch.arange(count) + 0.5) * values.shape[-1] / count).long()
        levels = ordered[..., ranks]
        for _ in range(KMEANS_STEPS):
            index = nearest_level(values, levels)
            total = torch.zeros_like(levels).scatter_add_(-1, index, weights * values)
            mass = torch.zeros_like(levels).scatter_add_(-1, index, weights)
            levels = torch.where(mass > 0, total / mass.clamp(min=1e-30), levels).sort(dim=-1).values
        return {"table": self.table.round(levels).sort(dim=-1).values}

    def encode(self, values: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return nearest_level(values, params["table"]).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return params["table"].gather(-1, codes.long())

    def stored_params(self) -> dict[str, ScaleCodec]:
        return {"table": self.table}

    def param_shape(self, name: str, rows: int, cols: int) -> tuple[int, int, int]:
        return self.param_rows(rows), self.granularity.groups_per_row(cols), 2**self.bits_per_code

    def parameter_bits(self, rows: int, cols: int) -> int:
        return self.per_group_bits(self.table, rows, cols, per_group=2**self.bits_per_code)

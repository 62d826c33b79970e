"""What every number format provides.

A format maps a weight matrix to integer codes plus per-group parameters and
back. Solvers drive formats only through this interface:

    params = fmt.fit(grouped, clip)      # per-group parameters for a clip ratio
    codes  = fmt.encode(grouped, params) # nearest representable point
    values = fmt.decode(codes, params)   # dequantized values, float32

`bits(rows, cols)` is the one place where storage cost is counted: codes plus
every stored parameter in its storage dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .granularity import Granularity, Grouped, to_groups, ungroup


@dataclass
class QuantizedTensor:
    """Codes and parameters of one quantized matrix, in the grouped layout."""

    format: "Format"
    shape: tuple[int, int]
    codes: torch.Tensor
    params: dict[str, torch.Tensor]

    def dequantize(self) -> torch.Tensor:
        return ungroup(self.format.decode(self.codes, self.params), self.shape)


class Format(ABC):
    granularity: Granularity

    @abstractmethod
    def fit(self, grouped: Grouped, clip: float = 1.0) -> dict[str, torch.Tensor]:
        """Per-group parameters; `clip` < 1 shrinks the covered range."""

    @abstractmethod
    def encode(self, values: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Codes of grouped `values` [R, G, g] under `params`."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float32 values of `codes` under `params`."""

    @abstractmethod
    def bits(self, rows: int, cols: int) -> int:
        """Exact storage bits of a [rows, cols] matrix: codes and all parameters."""

    @abstractmethod
    def __str__(self) -> str:
        """The canonical format string; `parse(str(f)) == f`."""

    def bits_per_weight(self, rows: int, cols: int) -> float:
        return self.bits(rows, cols) / (rows * cols)

    def quantize(self, matrix: torch.Tensor, clip: float = 1.0) -> QuantizedTensor:
        grouped = to_groups(matrix.float(), self.granularity)
        params = self.fit(grouped, clip)
        return QuantizedTensor(self, grouped.shape, self.encode(grouped.values, params), params)

"""How a weight matrix is cut into groups that share quantization parameters.

A weight is viewed as a matrix [rows, cols] (output channels x input features).
Groups run along the input dimension, as in GPTQ/AWQ/llama.cpp. When the group
size does not divide the row length the last group of each row is partial; it
is padded internally (by repeating the row's last value, which changes no
min/max) and masked out of every error computation and bit count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import FormatError


MAX_GROUP = 2**16


@dataclass(frozen=True)
class Granularity:
    """`kind` is "tensor", "channel" or "group"; `size` is the group size."""

    kind: str
    size: int = 0

    @staticmethod
    def parse(text: str) -> "Granularity":
        if text == "tensor":
            return Granularity("tensor")
        if text == "ch":
            return Granularity("channel")
        if text.startswith("g") and text[1:].lstrip("-").isdigit():
            size = int(text[1:])
            if not 1 <= size <= MAX_GROUP:  # larger groups than any row: padding them would only cost memory
                raise FormatError(f"group size must be 1 to {MAX_GROUP}, got {text!r}; use e.g. g64 or g128, or ch for "
                                  "whole rows")
            return Granularity("group", size)
        raise FormatError(f"unknown granularity {text!r}; use tensor, ch (per output channel) or gN (groups of N inputs)")

    def __str__(self) -> str:
        return {"tensor": "tensor", "channel": "ch"}.get(self.kind, f"g{self.size}")

    def groups_per_row(self, cols: int) -> int:
        return math.ceil(cols / self.size) if self.kind == "group" else 1

    def group_count(self, rows: int, cols: int) -> int:
        """Number of parameter groups of a [rows, cols] matrix."""
        if self.kind == "tensor":
            return 1
        return rows * self.groups_per_row(cols)


def ungroup(grouped: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `to_groups` for any tensor laid out like its `values`: drops the padding."""
    rows, cols = shape
    return grouped.reshape(rows, -1)[:, :cols]


@dataclass
class Grouped:
    """A matrix cut into groups: `values` is [R, G, g]; `mask` is [G, g] (None if no padding)."""

    values: torch.Tensor
    mask: torch.Tensor | None
    shape: tuple[int, int]


def to_groups(matrix: torch.Tensor, granularity: Granularity) -> Grouped:
    rows, cols = matrix.shape
    if granularity.kind == "tensor":
        return Grouped(matrix.reshape(1, 1, rows * cols), None, (rows, cols))
    if granularity.kind == "channel":
        return Grouped(matrix.reshape(rows, 1, cols), None, (rows, cols))
    size = granularity.size
    groups = math.ceil(cols / size)
    pad = groups * size - cols
    mask = None
    if pad:
        matrix = torch.cat([matrix, matrix[:, -1:].expand(rows, pad)], dim=1)
        mask = torch.ones(groups * size, dtype=torch.bool, device=matrix.device)
        mask[cols:] = False
        mask = mask.reshape(groups, size)
    return Grouped(matrix.reshape(rows, groups, size), mask, (rows, cols))

"""Round-to-nearest, with an optional per-group clipping search.

The search tries shrinking each group's range by every ratio in `CLIP_GRID`
and keeps, per group, the ratio with the smallest squared weight error.
Padding of partial groups is masked out of that error.
"""

from __future__ import annotations

import torch

from ..formats import Format, QuantizedTensor
from ..formats.granularity import to_groups

# 1.00, 0.98, ..., 0.50: finer than needed near 1, where most groups land.
CLIP_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(26))


def round_to_nearest(matrix: torch.Tensor, fmt: Format, clip_search: bool = True) -> QuantizedTensor:
    """Quantize a [rows, cols] matrix by rounding each value to the nearest grid point."""
    grouped = to_groups(matrix.detach().float(), fmt.granularity)
    values = grouped.values
    best_params = fmt.fit(grouped, 1.0)
    best_codes = fmt.encode(values, best_params)
    if clip_search:
        best_error = _group_error(fmt.decode(best_codes, best_params), values, grouped.mask)
        for clip in CLIP_GRID[1:]:
            params = fmt.fit(grouped, clip)
            codes = fmt.encode(values, params)
            error = _group_error(fmt.decode(codes, params), values, grouped.mask)
            better = error < best_error  # [R, G, 1]
            best_error = torch.where(better, error, best_error)
            best_codes = torch.where(better, codes, best_codes)
            best_params = {k: torch.where(better, v, best_params[k]) for k, v in params.items()}
    return QuantizedTensor(fmt, grouped.shape, best_codes, best_params)


def _group_error(approx: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    squared = (approx - values).square()
    if mask is not None:
        squared = squared * mask
    return squared.sum(dim=-1, keepdim=True)

"""Round-to-nearest, with an optional per-group clipping search.

The search tries each clip ratio of the format's `clip_grid`, measures every
group's weighted squared error (padding of partial groups masked out), and
finally fits each group with its best ratio. The final fit is one call, so
parameters shared across groups (a second-level scale) stay consistent.

Without calibration data the error of each weight is weighted by
w^2 + mean(w^2 of its row), as llama.cpp does without an importance matrix:
plain weight MSE clips the large weights that matter most, and on the default
model it made RTN worse than no search at all (bench/results/rtn.md).
"""

from __future__ import annotations

import torch

from ..formats import Format, QuantizedTensor
from ..formats.granularity import Grouped, to_groups


def round_to_nearest(
    matrix: torch.Tensor, fmt: Format, clip_search: bool = True, importance: torch.Tensor | None = None
) -> QuantizedTensor:
    """Quantize a [rows, cols] matrix by rounding each value to the nearest grid point.

    `importance` ([rows, cols]) weighs each weight's squared error in the
    search and in formats that learn their grid; by default the magnitude
    weighting above.
    """
    matrix = matrix.detach().float()
    if importance is None:
        importance = magnitude_importance(matrix)
    grouped = to_groups(matrix, fmt.granularity)
    weights = _error_weights(grouped, importance, fmt)
    clip: float | torch.Tensor = 1.0
    if clip_search and len(fmt.clip_grid) > 1:
        best_error = best_clip = None
        for ratio in fmt.clip_grid:
            params = fmt.fit(grouped, ratio, weights)
            approx = fmt.decode(fmt.encode(grouped.values, params), params)
            error = ((approx - grouped.values).square() * weights).sum(dim=-1, keepdim=True)
            if best_error is None:
                best_error, best_clip = error, torch.full_like(error, ratio)
            else:
                better = error < best_error
                best_error = torch.where(better, error, best_error)
                best_clip = torch.where(better, ratio, best_clip)
        clip = best_clip
    params = fmt.fit(grouped, clip, weights)
    return QuantizedTensor(fmt, grouped.shape, fmt.encode(grouped.values, params), params)


def magnitude_importance(matrix: torch.Tensor) -> torch.Tensor:
    """Data-free importance of each weight: w^2 plus the mean w^2 of its row."""
    squared = matrix.square()
    return squared + squared.mean(dim=1, keepdim=True)


def _error_weights(grouped: Grouped, importance: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Importance in the grouped layout, 0 on padding."""
    weights = to_groups(importance.detach().float(), fmt.granularity).values
    return weights if grouped.mask is None else weights * grouped.mask

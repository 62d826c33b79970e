"""Round-to-nearest, with an optional per-group clipping search.

The search tries each clip ratio of the format's `clip_grid`, measures every
group's error (padding of partial groups masked out), and finally fits each
group with its best ratio. The final fit is one call, so parameters shared
across groups (a second-level scale) stay consistent.

The error a clip ratio is judged by:
- with calibration statistics (a Hessian H = X^T X / tokens of the layer's
  input), the output error of each group, (W - Q) H_gg (W - Q)^T, where H_gg
  is the group's diagonal block; for per-channel and per-tensor formats the
  diagonal of H weighs each weight's squared error (llama.cpp's imatrix);
- without data, each weight's squared error weighted by w^2 + mean(w^2 of its
  row), as llama.cpp does without an importance matrix: plain weight MSE
  clips the large weights that matter most, and on the default model it made
  RTN worse than no search at all (bench/results/rtn.md).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..formats import Format, QuantizedTensor
from ..formats.granularity import Grouped, to_groups
from ..formats.integer import IntFormat, zero_point_codes, zero_point_params

# (approx, values) in the grouped layout [R, G, g] -> error per group [R, G, 1]
GroupError = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def round_to_nearest(
    matrix: torch.Tensor,
    fmt: Format,
    clip_search: bool = True,
    importance: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize a [rows, cols] matrix by rounding each value to the nearest grid point.

    `hessian` ([cols, cols]) switches the search to the output error.
    `importance` ([rows, cols]) weighs each weight's squared error where no
    Hessian block applies and in formats that learn their grid; by default
    the diagonal of the Hessian, or without one the magnitude weighting above.
    """
    matrix = matrix.detach().float()
    if importance is None:
        importance = hessian_importance(hessian, matrix.shape[0]) if hessian is not None else magnitude_importance(matrix)
    grouped = to_groups(matrix, fmt.granularity)
    weights = error_weights(grouped, importance, fmt)
    error = output_error(hessian, grouped, fmt) if hessian is not None else None
    params = fit_params(grouped, fmt, weights, clip_search, error)
    return QuantizedTensor(fmt, grouped.shape, fmt.encode(grouped.values, params), params)


def fit_params(
    grouped: Grouped, fmt: Format, weights: torch.Tensor, clip_search: bool = True, error: GroupError | None = None
) -> dict[str, torch.Tensor]:
    """Parameters of every group, each at its best clip ratio under `error` (default: weighted squared error)."""
    if error is None:
        def error(approx, values):
            return ((approx - values).square() * weights).sum(dim=-1, keepdim=True)

    def candidate(ratio: float) -> torch.Tensor:
        params = fmt.fit(grouped, ratio, weights)
        return error(fmt.decode(fmt.encode(grouped.values, params), params), grouped.values)

    clip = best_clip(fmt.clip_grid, candidate) if clip_search and len(fmt.clip_grid) > 1 else 1.0
    return fmt.fit(grouped, clip, weights)


def best_clip(grid: tuple[float, ...], errors: Callable[[float], torch.Tensor]) -> torch.Tensor:
    """Each group's ratio of `grid` with the least `errors(ratio)` ([R, G, 1]); the first of equal ones."""
    best_error = clip = None
    for ratio in grid:
        candidate = errors(ratio)
        if best_error is None:
            best_error, clip = candidate, torch.full_like(candidate, ratio)
        else:
            better = candidate < best_error
            best_error, clip = torch.where(better, candidate, best_error), torch.where(better, ratio, clip)
    return clip


def fit_affine_group(grouped: Grouped, formats: list[IntFormat], error: GroupError,
                     clip_search: bool = True) -> list[dict[str, torch.Tensor]]:
    """`fit_params` of one group under several asymmetric integer formats with a zero point and the same scale
    codec and clip grid, their rows stacked in `grouped` in the order of `formats`: one clip search for all of
    them, and each format's parameters equal to those `fit_params` gives it alone (IntFormat's own arithmetic,
    with each format's code range per row).

    GPTQ fits a group of every option when it reaches the group's first column; for the small groups there the
    per-call overhead outweighs the arithmetic, so the options share the calls."""
    values = grouped.values
    rows = values.shape[0] // len(formats)
    high = torch.tensor([float(fmt.code_range[1]) for fmt in formats]).repeat_interleave(rows)[:, None, None]
    codec, grid = formats[0].scale, formats[0].clip_grid
    lowest = values.amin(dim=-1, keepdim=True).clamp(max=0)  # the extremes taken once for every ratio
    highest = values.amax(dim=-1, keepdim=True).clamp(min=0)

    def candidate(ratio: float) -> torch.Tensor:
        scale, zero = zero_point_params(lowest, highest, ratio, high, codec)
        return error((zero_point_codes(values, scale, zero, high) - zero) * scale, values)

    clip = best_clip(grid, candidate) if clip_search and len(grid) > 1 else 1.0
    scale, zero = zero_point_params(lowest, highest, clip, high, codec)
    zero = zero.to(torch.uint8)
    return [{"scale": scale[k * rows:(k + 1) * rows], "zero": zero[k * rows:(k + 1) * rows]}
            for k in range(len(formats))]


def magnitude_importance(matrix: torch.Tensor) -> torch.Tensor:
    """Data-free importance of each weight: w^2 plus the mean w^2 of its row."""
    squared = matrix.square()
    return squared + squared.mean(dim=1, keepdim=True)


def hessian_importance(hessian: torch.Tensor, rows: int) -> torch.Tensor:
    """Importance of each weight from data: the mean squared input of its column."""
    return hessian.diagonal().float().clamp(min=0)[None, :].expand(rows, -1)


def error_weights(grouped: Grouped, importance: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Importance in the grouped layout, 0 on padding."""
    weights = to_groups(importance.detach().float(), fmt.granularity).values
    return weights if grouped.mask is None else weights * grouped.mask


def output_error(hessian: torch.Tensor, grouped: Grouped, fmt: Format) -> GroupError | None:
    """Error of each group as the output error its rounding causes, (dW) H_gg (dW)^T.

    Only for group granularity (a block per group); None otherwise, which
    falls back to the diagonal-weighted error.
    """
    if fmt.granularity.kind != "group":
        return None
    rows, groups, size = grouped.values.shape
    cols = grouped.shape[1]
    padded = torch.zeros(groups * size, groups * size)
    padded[:cols, :cols] = hessian.float()
    index = torch.arange(groups)
    blocks = padded.reshape(groups, size, groups, size)[index, :, index, :]  # [G, g, g]

    def error(approx, values):
        delta = (approx - values).transpose(0, 1)  # [G, R, g]
        return ((delta @ blocks) * delta).sum(-1).transpose(0, 1).unsqueeze(-1)

    return error

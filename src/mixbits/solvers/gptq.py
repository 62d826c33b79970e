"""GPTQ: round one column at a time and push its error onto the columns not yet rounded.

For a layer with input Hessian H = X^T X / tokens, rounding column j with
error e_j changes the output by X e_j; GPTQ compensates by updating every
later column with -e_j / [H^-1]_jj * [H^-1]_j,later, which is the optimal
correction under the quadratic output error (Frantar et al., 2022). The
inverse comes from Cholesky factors, updates are applied lazily in blocks of
columns, H is damped by a fraction of its mean diagonal (more, with a
warning, until it factors), and with `act_order` columns are visited in
order of decreasing H_jj.

Works for every format: the rounding step is the format's own projection
(`encode` then `decode`) under the parameters of the column's group.
A group's parameters are fitted (with the clip search) when its first column
is reached, from the group's current, error-updated weights; groups stay the
contiguous column ranges the format stores, so reordering needs no index.
Per-tensor and per-channel parameters are fitted once, from the original
weights. Second-level scales (NVFP4's tensor scale, i8 row scales) are pinned
from a first fit of the whole matrix, so groups fitted one at a time remain
one consistent encoding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .. import defaults
from ..formats import Format, QuantizedTensor
from ..formats.granularity import to_groups
from .rtn import error_weights, fit_params, hessian_importance, output_error

log = logging.getLogger(__name__)

MAX_DAMPING_TRIES = 8


@dataclass(frozen=True)
class GptqSettings:
    """How GPTQ treats the calibration Hessian.

    damp: added to H's diagonal as a fraction of its mean diagonal.
    shrink: H is replaced by (1 - shrink) H + shrink diag(H) first; at 1 the
        solver sees only per-input importances (no cross-input correction),
        as llama.cpp's importance matrix does.
    act_order: visit columns by decreasing H_jj.
    """

    damp: float = defaults.GPTQ_DAMP
    shrink: float = defaults.GPTQ_SHRINK
    act_order: bool = True

    def __post_init__(self):
        if not (self.damp >= 0 and 0 <= self.shrink <= 1):
            raise ValueError(f"GPTQ needs damp >= 0 and 0 <= shrink <= 1, got {self.damp}, {self.shrink}")

    def as_dict(self) -> dict:
        return {"damp": self.damp, "shrink": self.shrink, "act_order": self.act_order}


def gptq(
    matrix: torch.Tensor,
    hessian: torch.Tensor,
    fmt: Format,
    *,
    clip_search: bool = True,
    block_size: int = 128,
    settings: GptqSettings = GptqSettings(),
) -> QuantizedTensor:
    """Quantize a [rows, cols] matrix whose input has Hessian `hessian` [cols, cols]."""
    weight = matrix.detach().float().clone()
    rows, cols = weight.shape
    hessian = hessian.detach().double().clone()
    if settings.shrink:  # (1 - shrink) H + shrink diag(H), in place: H of a 11008-wide input is 1 GB in float64
        diagonal = hessian.diagonal().clone()
        hessian.mul_(1 - settings.shrink).diagonal().add_(settings.shrink * diagonal)
    dead = hessian.diagonal() == 0  # inputs that are always zero: their weights do not matter
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    importance = hessian_importance(hessian, rows)

    per_group = fmt.granularity.kind == "group"
    size = fmt.granularity.size if per_group else cols
    initial = None  # whole-matrix parameters: the only ones without groups, the pinned second level with them
    group_fmt = fmt
    if not per_group or fmt.has_second_level:
        whole = to_groups(weight, fmt.granularity)
        initial = fit_params(whole, fmt, error_weights(whole, importance, fmt), clip_search, output_error(hessian, whole, fmt))
        group_fmt = fmt.pinned(initial)
    group_params: list[dict[str, torch.Tensor] | None] = [None] * fmt.granularity.groups_per_row(cols)

    order = torch.argsort(hessian.diagonal(), descending=True, stable=True) if settings.act_order else torch.arange(cols)
    position = torch.empty_like(order)
    position[order] = torch.arange(cols)
    weight = weight[:, order]
    inverse = upper_inverse_cholesky(hessian[order[:, None], order[None, :]], settings.damp).float()
    rounded = torch.zeros_like(weight)
    visit = order.tolist()
    param_rows = fmt.param_rows(rows)  # a column is [param_rows, 1, rows / param_rows] in the grouped layout

    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block = weight[:, start:stop].clone()
        errors = torch.zeros(rows, stop - start)
        block_inverse = inverse[start:stop, start:stop]
        for i in range(stop - start):
            group = visit[start + i] // size
            if not per_group:
                params = initial
            elif group_params[group] is None:
                # Current values of the group's columns: those in this block as updated so far,
                # later ones with the updates still pending from this block's rounded columns.
                members = torch.arange(group * size, min(group * size + size, cols))
                where = position[members]
                current = weight[:, where].clone()
                inside = where < stop
                current[:, inside] = block[:, where[inside] - start]
                later = where[~inside]
                if i > 0 and len(later):
                    current[:, ~inside] -= errors[:, :i] @ inverse[start:start + i][:, later]
                grouped = to_groups(current, fmt.granularity)
                members_hessian = hessian[members][:, members]
                group_params[group] = params = fit_params(
                    grouped, group_fmt.for_group(group), error_weights(grouped, importance[:, members], fmt),
                    clip_search, output_error(members_hessian, grouped, fmt),
                )
            else:
                params = group_params[group]
            values = block[:, i]
            approx = fmt.decode(fmt.encode(values.reshape(param_rows, 1, -1), params), params).reshape(rows)
            rounded[:, start + i] = approx
            error = (values - approx) / block_inverse[i, i]
            block[:, i:].addr_(error, block_inverse[i, i:], alpha=-1)
            errors[:, i] = error
        weight[:, stop:] -= errors @ inverse[start:stop, stop:]

    result = rounded[:, position]
    if per_group:
        params = {key: torch.cat([p[key] for p in group_params], dim=1) for key in group_params[0]}
    else:
        params = initial
    grouped = to_groups(result, fmt.granularity)
    # The pinned format carries the second-level scale every group was rounded under, which storage needs.
    return QuantizedTensor(group_fmt, (rows, cols), fmt.encode(grouped.values, params), params)


def upper_inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising the damping until H factors."""
    mean_diagonal = hessian.diagonal().mean()
    for _ in range(MAX_DAMPING_TRIES):
        damped = hessian.clone()
        damped.diagonal().add_(damp * mean_diagonal)
        factor, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            del factor
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
        log.warning("Hessian is not positive definite at damping %g; retrying with %g", damp, damp * 10)
        damp *= 10
    raise ValueError(f"Hessian did not factor even at damping {damp / 10:g}; it is not a Gram matrix")

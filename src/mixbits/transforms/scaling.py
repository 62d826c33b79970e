"""Activation-aware scaling (AWQ): per-input-channel scales that make weights easier to round.

For Linears reading an input X, W x = (W diag(s)) (x / s). Input channels
that carry large activations matter most, so scaling their weight columns up
(s > 1) before rounding gives them relatively finer steps. Following AWQ,
s = mean|x|^alpha (normalised so that max(s) * min(s) = 1), with alpha chosen
from a grid by the output error the rounding causes,

    sum over the Linears of  tr((W - Q(W diag s) diag(1/s)) H (...)^T),  H = X^T X / tokens,

which is the squared output error over all calibration tokens; alpha = 0
(no scaling) is on the grid, so scaling never makes this error worse. The
1/s is folded into the operation that produces x: the RMSNorm weight before
q/k/v and before gate/up, the rows of up_proj before down_proj, and the rows
of v_proj before o_proj when their widths match (not with grouped-query
attention). The model computes the same function before quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..calibrate import BlockCalibration, InputStats, SequentialCalibration, Stage
from ..formats import Format
from ..models.adapter import BlockLayout
from ..models.registry import adapter_for

ALPHAS = tuple(i / 20 for i in range(20))  # 0, 0.05, ..., 0.95


@dataclass
class ScaledGroup:
    linears: list[str]
    alpha: float
    error_unscaled: float  # output error of plain rounding (alpha = 0)
    error: float  # at the chosen alpha


@torch.no_grad()
def scale_layer(
    layer: BlockLayout, stats: dict[nn.Linear, InputStats], fmt: Format, names: dict[nn.Linear, str]
) -> list[ScaledGroup]:
    """Search and fold scales for every scalable input of one decoder block, in place."""
    groups: list[tuple[nn.Module, list[nn.Linear], float]] = [
        (layer.input_norm, layer.attention_in, layer.norm_offset),
        (layer.post_norm, layer.mlp_in, layer.norm_offset),
    ]
    if layer.up is not None and layer.down_call is layer.down:  # an online rotation between up and down blocks folding
        groups.append((layer.up, [layer.down], 0.0))
    if layer.v is not None and layer.v.out_features == layer.o.in_features:
        groups.append((layer.v, [layer.o], 0.0))
    found = []
    for producer, linears, offset in groups:
        scales, group = search_scales([linear.weight for linear in linears], stats[linears[0]], fmt)
        group.linears = [names[linear] for linear in linears]
        fold_scales(producer, linears, scales, offset)
        found.append(group)
    return found


def scale_block(layer: BlockLayout, block: BlockCalibration, fmt: Format,
                stages: list[Stage] | None = None) -> list[ScaledGroup]:
    """`scale_layer` on one calibrated block, its statistics taken from the block's stages."""
    stages = block.stages() if stages is None else stages
    linears = [linear for stage in stages for linear in stage.linears]
    names = {linear: name for stage in stages for name, linear in zip(stage.names, stage.linears)}
    return scale_layer(layer, block.stats(linears), fmt, names)


@torch.no_grad()
def scale_model(model: nn.Module, windows: torch.Tensor, fmt: Format) -> list[ScaledGroup]:
    """Search and fold AWQ scales block by block over calibration `windows` (no quantization); in place."""
    layout = adapter_for(model).layout(model, "activation-aware scaling")
    return [group for index, block in enumerate(SequentialCalibration(model, windows))
            for group in scale_block(layout.blocks[index], block, fmt)]


def search_scales(weights: list[torch.Tensor], stats: InputStats, fmt: Format) -> tuple[torch.Tensor, ScaledGroup]:
    """The per-input-channel scales (best alpha) for Linears sharing the input described by `stats`."""
    hessian = stats.hessian.float()
    magnitude = stats.abs_mean.float().clamp(min=1e-6)
    best = None
    for alpha in ALPHAS:
        scales = magnitude.pow(alpha)
        scales = scales / (scales.max() * scales.min()).sqrt()
        error = 0.0
        for weight in weights:
            w = weight.detach().float()
            delta = w - fmt.quantize(w * scales).dequantize() / scales
            error += float(((delta @ hessian) * delta).sum())
        if alpha == 0:
            unscaled = error
        if best is None or error < best[0]:
            best = (error, alpha, scales)
    error, alpha, scales = best
    return scales, ScaledGroup([], alpha, unscaled, error)


def fold_scales(producer: nn.Module, linears: list[nn.Linear], scales: torch.Tensor, offset: float = 0.0) -> None:
    """Linears' input columns times s, the producer's output (norm weight or Linear rows) divided by s.

    A norm that scales by (offset + weight) gets offset + weight divided by s.
    """
    for linear in linears:
        linear.weight.mul_(scales.to(linear.weight.dtype)[None, :])
    weight = producer.weight
    weight.copy_((weight + offset) / scales.to(weight.dtype).reshape(-1, *[1] * (weight.dim() - 1)) - offset)
    bias = getattr(producer, "bias", None)
    if bias is not None:
        bias.div_(scales.to(bias.dtype))

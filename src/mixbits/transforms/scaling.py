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
attention). In a mixture of experts the norm before the MLP feeds the
router and every expert: one scale for all, searched on each expert's own
tokens (the router is scaled alike, never quantized). The model computes
the same function before quantization.
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
    groups: list[tuple[nn.Module, list[nn.Module], float]] = [
        (layer.input_norm, layer.attention_in, layer.norm_offset),
        (layer.post_norm, layer.mlp_in, layer.norm_offset),
    ]
    if layer.up is not None and layer.down_call is layer.down:  # an online rotation between up and down blocks folding
        groups.append((layer.up, [layer.down], 0.0))
    if layer.v is not None and layer.v.out_features == layer.o.in_features:
        groups.append((layer.v, [layer.o], 0.0))
    found = []
    for producer, readers, offset in groups:
        # A mixture's router reads the input too: it is scaled alike but, never quantized, adds no error.
        quantized = [reader for reader in readers if reader in stats]
        scales, group = search_scales([linear.weight for linear in quantized], [stats[linear] for linear in quantized], fmt)
        group.linears = [names[linear] for linear in quantized]
        fold_scales(producer, readers, scales, offset)
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


def search_scales(weights: list[torch.Tensor], stats: list[InputStats], fmt: Format) -> tuple[torch.Tensor, ScaledGroup]:
    """The per-input-channel scales (best alpha) for Linears reading one input, each with the statistics of the
    tokens it sees (all of them; in a mixture, an expert those routed to it).

    The magnitude is the mean |x| over every token the Linears read (an expert's weighted by its tokens: every
    token goes to the same number of experts, so this is the input's own mean), and the error the output error
    summed over all of them (an expert's weighted by its share of the tokens; experts that saw none add nothing).
    """
    seen = [s for s in {id(s): s for s in stats}.values() if s.tokens > 0]
    tokens = sum(s.tokens for s in seen)
    mean = seen[0].abs_mean.float() if len(seen) == 1 else sum(s.abs_mean.float() * s.tokens for s in seen) / tokens
    magnitude = mean.clamp(min=1e-6)
    most = max(s.tokens for s in seen)
    best = None
    for alpha in ALPHAS:
        scales = magnitude.pow(alpha)
        scales = scales / (scales.max() * scales.min()).sqrt()
        error = 0.0
        for weight, stat in zip(weights, stats):
            if stat.tokens == 0:
                continue
            w = weight.detach().float()
            delta = w - fmt.quantize(w * scales).dequantize() / scales
            error += float(((delta @ stat.hessian.float()) * delta).sum()) * stat.tokens / most
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

"""Per-input-channel scales folded into the model: AWQ (weights easier to round) and SmoothQuant (inputs
easier to round).

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

SmoothQuant (Xiao et al.) migrates the activation outliers that make inputs
hard to quantize into the weights: s_j = max|x_j|^alpha / max_i |w_ij|^(1-alpha)
over every Linear reading the input, folded the same way. alpha is chosen
from a grid (and "no scaling" is on it) by the output error with both sides
rounded, the inputs to the activation format and the weights to theirs,
summed over a sample of the calibration inputs (`InputStats.sample`): unlike
weight rounding alone, that error is not a function of X^T X.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..calibrate import BlockCalibration, InputStats, SequentialCalibration, Stage
from ..activations import StaticIntFormat, fake_quantize
from ..formats import Format
from ..models.adapter import BlockLayout
from ..models.registry import adapter_for

ALPHAS = tuple(i / 20 for i in range(20))  # 0, 0.05, ..., 0.95
SMOOTH_ALPHAS = tuple(i / 10 for i in range(1, 10))  # SmoothQuant's migration strength: 0.1 ... 0.9


@dataclass
class ScaledGroup:
    linears: list[str]
    alpha: float
    error_unscaled: float  # output error of plain rounding (alpha = 0)
    error: float  # at the chosen alpha


@torch.no_grad()
def scale_layer(
    layer: BlockLayout, stats: dict[nn.Linear, InputStats], fmt: Format | None, names: dict[nn.Linear, str],
    activation: Format | None = None,
) -> list[ScaledGroup]:
    """Search and fold scales for every scalable input of one decoder block, in place: AWQ's, or SmoothQuant's
    when inputs are quantized to `activation` (weights rounded to `fmt` in its error; None: float weights)."""
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
        weights, seen = [linear.weight for linear in quantized], [stats[linear] for linear in quantized]
        scales, group = (search_scales(weights, seen, fmt) if activation is None
                         else search_smoothing(weights, seen, fmt, activation))
        group.linears = [names[linear] for linear in quantized]
        fold_scales(producer, readers, scales, offset)
        found.append(group)
    return found


def scale_block(layer: BlockLayout, block: BlockCalibration, fmt: Format | None,
                stages: list[Stage] | None = None, activation: Format | None = None) -> list[ScaledGroup]:
    """`scale_layer` on one calibrated block, its statistics taken from the block's stages."""
    stages = block.stages() if stages is None else stages
    linears = [linear for stage in stages for linear in stage.linears]
    names = {linear: name for stage in stages for name, linear in zip(stage.names, stage.linears)}
    return scale_layer(layer, block.stats(linears), fmt, names, activation)


@torch.no_grad()
def scale_model(model: nn.Module, windows: torch.Tensor, fmt: Format | None,
                activation: Format | None = None) -> list[ScaledGroup]:
    """Search and fold AWQ scales (SmoothQuant's with an `activation` format) block by block over calibration
    `windows`, without quantizing; in place."""
    layout = adapter_for(model).layout(model, "SmoothQuant" if activation is not None else "activation-aware scaling")
    return [group for index, block in enumerate(SequentialCalibration(model, windows))
            for group in scale_block(layout.blocks[index], block, fmt, activation=activation)]


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


def search_smoothing(weights: list[torch.Tensor], stats: list[InputStats], fmt: Format | None,
                     activation: Format) -> tuple[torch.Tensor, ScaledGroup]:
    """SmoothQuant's scales (best alpha, or none) for Linears reading one input, by the output error on the
    input sample with the inputs rounded to `activation` and the weights to `fmt` (float if None).

    The sample is the input's own (in a mixture, that of the reader that saw the most tokens: experts see
    subsets of the same input), and so is the activations' maximum.
    """
    seen = [s for s in stats if s.tokens > 0]
    sample = max(seen, key=lambda s: s.tokens).sample.float()
    reference = [sample @ weight.detach().float().T for weight in weights]
    largest_input = torch.stack([s.abs_max.float() for s in seen]).amax(0).clamp(min=1e-5)
    largest_weight = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)

    def error(scales: torch.Tensor | None) -> float:
        x = sample if scales is None else sample / scales
        rounded_to = activation
        if isinstance(activation, StaticIntFormat) and activation.value is None:  # the scale quantize will measure
            rounded_to = activation.calibrated(float((largest_input if scales is None else largest_input / scales).max()))
        rounded = fake_quantize(x, rounded_to)
        total = 0.0
        for weight, expected in zip(weights, reference):
            w = weight.detach().float() if scales is None else weight.detach().float() * scales
            w = w if fmt is None else fmt.quantize(w).dequantize()
            total += float((rounded @ w.T - expected).pow(2).sum())
        return total

    unscaled = error(None)
    best = (unscaled, 0.0, torch.ones_like(largest_input))
    for alpha in SMOOTH_ALPHAS:
        scales = (largest_input.pow(alpha) / largest_weight.pow(1 - alpha)).clamp(min=1e-5)
        found = error(scales)
        if found < best[0]:
            best = (found, alpha, scales)
    found, alpha, scales = best
    return scales, ScaledGroup([], alpha, unscaled, found)


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

"""Block-wise tuning: after GPTQ (or RTN), move rounding decisions and scales to fit the float block's output.

GPTQ chooses each layer's codes for that layer's own output error under a
quadratic model; the block's output, through attention, the MLP's gating and
the residual stream, is what the next block reads. Tuning (after AutoRound,
Cheng et al., 2023) minimises the squared error between the quantized
block's output on its own inputs and the float block's output on the float
model's inputs, over the calibration windows, by signed gradient descent:

- a rounding offset V per weight, in code units, added to the values the
  solver rounded (`QuantizedTensor.source`: GPTQ's error-updated weights),
  so the codes are encode(source + V * s0) under the solver's parameters p0
  (scale s0): at V = 0 exactly the solver's codes, and a weight near a
  rounding boundary flips with a small V; |V| <= 1/2, and the gradient
  passes the rounding straight through (d w / d V = s);
- a per-group scale multiplier exp(a), |a| <= 1/2, applied when decoding
  (the codes held fixed), for scales stored as plain floats (fp16, bf16,
  fp32); the stored scale is the codec's rounding of s0 * exp(a);
- for vector codebooks, in place of the offsets, the codebook itself (GPTVQ's
  and AQLM's codebook update), the codes GPTQ chose held fixed: a codebook
  entry moves by `lr` per step, as an offset does in code units, and is
  stored rounded by the format's table codec.
- for trellis codes, whose walks have no per-weight rounding to move and whose
  codebook is fixed, the scales alone.

Each step takes `batch` windows in a fixed shuffled order; the step size
starts at `lr` and decays linearly to 0 (without the decay, the signed steps
kept moving and longer runs ended worse). The result is the one with the
lower error over all windows of the start and the end of the run: tuning
never leaves a block worse than its solver did on the error it optimises.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .. import defaults
from ..formats import QuantizedTensor
from ..formats.granularity import ungroup
from ..formats.scales import CastScale

MAX_OFFSET = 0.5  # |V|: a weight reaches either neighbour of its rounding interval
MAX_LOG_SCALE = 0.5  # |a|: scales within exp(+-1/2) of the solver's


@dataclass(frozen=True)
class TuneSettings:
    """steps: signed-gradient steps per block; batch: calibration windows per step; lr: the first step's size (in
    codes for the offsets, in log scale for the scales)."""

    steps: int = defaults.TUNE_STEPS
    batch: int = defaults.TUNE_BATCH
    lr: float = defaults.TUNE_LR

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1 or not self.lr > 0:
            raise ValueError(f"tuning needs steps >= 1, batch >= 1 and lr > 0, got {self.steps}, {self.batch}, {self.lr}")

    def as_dict(self) -> dict:
        return {"steps": self.steps, "batch": self.batch, "lr": self.lr}


def tunable(tensor: QuantizedTensor | None) -> bool:
    """Whether tuning can move `tensor`: quantized with a per-group scale, and its source kept."""
    return (tensor is not None and tensor.source is not None and "scale" in tensor.params
            and tensor.params["scale"].shape[:2] == tensor.codes.shape[:2])


class _Layer:
    """One Linear's tuning state: offsets V, log scale multipliers a, and what they start from."""

    def __init__(self, tensor: QuantizedTensor):
        self.tensor = tensor
        self.fmt, self.params = tensor.format, tensor.params
        self.scale = tensor.params["scale"]
        # Codes chosen jointly (a codebook's indices, a trellis walk) stay; a learned codebook moves instead.
        self.offset = torch.zeros_like(tensor.source, requires_grad=True) if self.fmt.rounds_each_weight else None
        codebook = "codebook" in tensor.params
        self.codebook = tensor.params["codebook"].clone().requires_grad_(True) if codebook else None
        codec = getattr(self.fmt, "scale", None)
        self.log_scale = (torch.zeros_like(self.scale, requires_grad=True)
                          if isinstance(codec, CastScale) and not self.fmt.has_second_level else None)

    def codes(self) -> torch.Tensor:
        if self.offset is None:
            return self.tensor.codes
        shifted = self.tensor.source + self.offset.detach() * self.scale
        return self.fmt.encode(shifted, self.params)

    def weight(self) -> torch.Tensor:
        """The dequantized weight as a function of V (straight through the rounding), a and the codebook."""
        params = {**self.params, "scale": self.scale if self.log_scale is None else self.scale * self.log_scale.exp()}
        if self.codebook is not None:
            params["codebook"] = self.codebook
        value = self.fmt.decode(self.codes(), params)
        if self.offset is not None:
            value = value + (self.offset - self.offset.detach()) * params["scale"]
        return ungroup(value, self.tensor.shape)

    def parameters(self) -> list[torch.Tensor]:
        return [p for p in (self.offset, self.codebook, self.log_scale) if p is not None]

    def result(self) -> QuantizedTensor:
        """The tuned codes and parameters, the scale and codebook rounded by their codecs as stored."""
        params = dict(self.params)
        if self.log_scale is not None:
            params["scale"] = self.fmt.scale.round(self.scale * self.log_scale.detach().exp())
        if self.codebook is not None:
            params["codebook"] = self.fmt.table.round(self.codebook.detach())
        return QuantizedTensor(self.fmt, self.tensor.shape, self.codes(), params, self.tensor.source)

    def clamp_(self) -> None:
        if self.offset is not None:
            self.offset.data.clamp_(-MAX_OFFSET, MAX_OFFSET)
        if self.log_scale is not None:
            self.log_scale.data.clamp_(-MAX_LOG_SCALE, MAX_LOG_SCALE)


@dataclass
class TuneRecord:
    layers: int
    start_error: float  # mean squared error of the block's output over all windows, as the solver left it
    end_error: float  # the same after tuning (the result's: never above start_error)
    kept: bool  # whether the tuned result was kept (False: the solver's was better)

    def as_dict(self) -> dict:
        return {"layers": self.layers, "start_error": self.start_error, "end_error": self.end_error, "kept": self.kept}


@contextmanager
def frozen(module: nn.Module):
    """`module`'s trainable parameters held without gradients meanwhile: tuning differentiates only its own."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


def write_weights(module: nn.Module, names, tensors: dict[str, QuantizedTensor]) -> None:
    """Set the weights of `module`'s Linears `names` to the dequantized `tensors` of those names."""
    modules = dict(module.named_modules())
    with torch.no_grad():
        for name in names:
            weight = modules[name].weight
            weight.copy_(tensors[name].dequantize().to(weight.dtype))


def tune_block(block: nn.Module, kwargs: dict, inputs: torch.Tensor, targets: torch.Tensor,
               tensors: dict[str, QuantizedTensor], settings: TuneSettings = TuneSettings(),
               seed: int = 0) -> tuple[dict[str, QuantizedTensor], TuneRecord]:
    """Tune the quantized Linears of `block` named (relative to it) in `tensors` so that the block on `inputs`
    ([windows, tokens, hidden]) gives `targets` (the float block's outputs); returns the tuned tensors (the solver's
    where tuning did not lower the error) and a record. The block's weights are left as the returned tensors say."""
    from torch.func import functional_call

    layers = {name: _Layer(tensor) for name, tensor in tensors.items() if tunable(tensor)}

    def outputs(weights: dict[str, torch.Tensor], windows) -> torch.Tensor:
        """The block's outputs on `inputs[windows]` with the named Linears' weights replaced by `weights`."""
        out = functional_call(block, {f"{name}.weight": w for name, w in weights.items()}, (inputs[windows],), kwargs)
        return out[0] if isinstance(out, tuple) else out

    def error(weights: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            total = sum(float((outputs(weights, slice(i, i + settings.batch)) - targets[i:i + settings.batch])
                              .square().sum()) for i in range(0, len(inputs), settings.batch))
        return total / targets.numel()

    with frozen(block):
        start = {name: tensors[name].dequantize() for name in layers}
        start_error = error(start)
        order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
        parameters = [p for layer in layers.values() for p in layer.parameters()]
        with torch.enable_grad():
            for step in range(settings.steps if layers else 0):
                chosen = order[(step * settings.batch + torch.arange(settings.batch)) % len(inputs)]
                weights = {name: layer.weight() for name, layer in layers.items()}
                loss = (outputs(weights, chosen) - targets[chosen]).square().mean()
                grads = torch.autograd.grad(loss, parameters)
                size = settings.lr * (1 - step / settings.steps)  # decayed linearly to 0, as AutoRound's
                with torch.no_grad():
                    for parameter, grad in zip(parameters, grads):
                        parameter.sub_(grad.sign(), alpha=size)
                for layer in layers.values():
                    layer.clamp_()
        tuned = {name: layer.result() for name, layer in layers.items()}
        end_error = error({name: tensor.dequantize() for name, tensor in tuned.items()}) if layers else start_error
    kept = end_error < start_error
    result = dict(tensors)
    if kept:
        result.update(tuned)
    write_weights(block, layers, result)
    return result, TuneRecord(len(layers), start_error, min(end_error, start_error), kept)

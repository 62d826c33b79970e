"""Quantize a model's linear layers in place and account for their exact bits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .formats import Format, parse_format
from .models.loader import LoadedModel
from .models.structure import quantizable_linears, untie_head
from .solvers import round_to_nearest


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    bits: int

    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class QuantizationReport:
    format: str
    clip_search: bool
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def weights(self) -> int:
        return sum(layer.weights for layer in self.layers)

    @property
    def bits(self) -> int:
        return sum(layer.bits for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights

    def as_dict(self) -> dict:
        return {
            "format": self.format,
            "clip_search": self.clip_search,
            "layers": len(self.layers),
            "weights": self.weights,
            "bits": self.bits,
            "bits_per_weight": self.bits_per_weight,
            "seconds": self.seconds,
        }


@torch.no_grad()
def quantize(
    model: nn.Module | LoadedModel,
    format: str | Format = "int4:g64:asym",
    *,
    clip_search: bool = True,
    include_head: bool = False,
    progress: bool = True,
) -> QuantizationReport:
    """Round every Linear inside the transformer blocks to `format`, in place.

    Weights are replaced by their dequantized values (simulated quantization),
    so the model runs as before. `clip_search` searches a clip ratio per
    group under a magnitude-weighted error (see `solvers.rtn`). With
    `include_head`, the output head is quantized too (untied from the input
    embedding first, which stays float). Returns the exact bit count of
    everything quantized.
    """
    fmt = parse_format(format)
    module = model.model if isinstance(model, LoadedModel) else model
    if include_head:
        untie_head(module)
    report = QuantizationReport(str(fmt), clip_search)
    start = time.perf_counter()
    for name, linear in tqdm(quantizable_linears(module, include_head), desc="quantize", disable=not progress, leave=False):
        weight = linear.weight
        rows, cols = weight.shape
        quantized = round_to_nearest(weight, fmt, clip_search)
        weight.copy_(quantized.dequantize().to(weight.dtype))
        report.layers.append(LayerReport(name, (rows, cols), fmt.bits(rows, cols)))
    report.seconds = time.perf_counter() - start
    return report

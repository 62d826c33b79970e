"""Quantize a model's linear layers in place and account for their exact bits.

Two paths:
- data-free: round-to-nearest of every Linear (`solver="rtn"` without AWQ);
- calibrated (`solver="gptq"` and/or `awq=True`): calibration windows run
  through the model block by block (`calibrate.SequentialCalibration`). In
  each block, AWQ scales are searched and folded on the float block first;
  then the Linears are quantized stage by stage (those reading the same
  input together), each stage's input statistics taken with the earlier
  stages already quantized; the quantized block's outputs feed the next.

A rotation (`rotate=True`) is applied to the float model before either path.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import defaults
from .calibrate import InputStats, SequentialCalibration, input_stats
from .data import calibration_windows, load_text, tokenize
from .errors import MixbitsError
from .formats import Format, parse_format
from .memory import peak_bytes, reset_peak
from .models.llama import decoder_parts
from .models.loader import LoadedModel
from .models.structure import output_head, quantizable_linears, untie_head
from .plan import LayerTotals
from .solvers import gptq, round_to_nearest
from .transforms.rotation import rotate as rotate_model
from .transforms.scaling import ScaledGroup, scale_layer


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    bits: int

    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class QuantizationReport(LayerTotals):
    format: str
    clip_search: bool
    solver: str = "rtn"
    awq: bool = False
    rotation: dict | None = None
    calibration: dict | None = None  # text, windows, length
    layers: list[LayerReport] = field(default_factory=list)
    scaled: list[ScaledGroup] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_bytes: int = 0

    @property
    def method(self) -> str:
        """Short name of what was done, e.g. "gptq+awq" or "rtn+rotate"."""
        parts = [self.solver] + (["awq"] if self.awq else []) + (["rotate"] if self.rotation else [])
        return "+".join(parts)

    def as_dict(self) -> dict:
        return {
            "format": self.format,
            "method": self.method,
            "solver": self.solver,
            "awq": self.awq,
            "rotation": self.rotation,
            "clip_search": self.clip_search,
            "calibration": self.calibration,
            "layers": len(self.layers),
            "weights": self.weights,
            "bits": self.bits,
            "bits_per_weight": self.bits_per_weight,
            "seconds": self.seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
            "awq_scales": [asdict(group) for group in self.scaled],
        }


@torch.no_grad()
def quantize(
    model: nn.Module | LoadedModel,
    format: str | Format = "int4:g64:asym",
    *,
    solver: str = "rtn",
    awq: bool = False,
    rotate: bool = False,
    online_hadamard: bool = False,
    calibration: str | Path | torch.Tensor | None = None,
    calibration_windows: int = defaults.CALIBRATION_WINDOWS,
    calibration_len: int = defaults.CALIBRATION_LEN,
    clip_search: bool = True,
    include_head: bool = False,
    progress: bool = True,
) -> QuantizationReport:
    """Quantize every Linear inside the transformer blocks to `format`, in place.

    Weights are replaced by their dequantized values (simulated quantization),
    so the model runs as before. `solver` is "rtn" or "gptq"; `awq` adds
    activation-aware scaling; `rotate` a Hadamard rotation of the residual
    stream (`online_hadamard` also of every down_proj input). GPTQ and AWQ
    take calibration windows from the start of `calibration` (a text file or
    folder, the default text if None, or a [windows, tokens] tensor of token
    ids). `clip_search` searches a clip ratio per group. With `include_head`
    the output head is quantized too (untied from the input embedding first,
    which stays float). Returns the exact bit count of everything quantized.
    """
    fmt = parse_format(format)
    if solver not in defaults.SOLVERS:
        raise MixbitsError(f"unknown solver {solver!r}; use one of {', '.join(defaults.SOLVERS)}")
    if online_hadamard and not rotate:
        raise MixbitsError("the online Hadamard before down_proj is part of the rotation; add rotate=True (--rotate)")
    module = model.model if isinstance(model, LoadedModel) else model
    # Refuse unsupported architectures and short texts before changing anything.
    if rotate:
        decoder_parts(module, "rotation")
    if awq:
        decoder_parts(module, "activation-aware scaling")
    calibrated = solver == "gptq" or awq
    windows = spec = None
    if calibrated:
        windows, spec = _calibration(model, calibration, calibration_windows, calibration_len)

    report = QuantizationReport(str(fmt), clip_search, solver, awq, calibration=spec)
    reset_peak()
    start = time.perf_counter()
    if rotate:
        report.rotation = rotate_model(module, online_down=online_hadamard).as_dict()
    if include_head:
        untie_head(module)
    if calibrated:
        _quantize_calibrated(module, fmt, windows, report, include_head, progress)
    else:
        for name, linear in tqdm(quantizable_linears(module, include_head), desc="quantize", disable=not progress, leave=False):
            _replace(linear, round_to_nearest(linear.weight, fmt, clip_search).dequantize(), name, fmt, report)
    report.seconds = time.perf_counter() - start
    report.peak_memory_bytes = peak_bytes()
    return report


def _calibration(model, source, count: int, length: int) -> tuple[torch.Tensor, dict]:
    if isinstance(source, torch.Tensor):
        if source.dim() != 2 or source.dtype != torch.long:
            raise MixbitsError("calibration token windows must be a [windows, tokens] int64 tensor")
        return source, {"text": "token ids given", "windows": source.shape[0], "length": source.shape[1]}
    tokenizer = model.tokenizer if isinstance(model, LoadedModel) else None
    if tokenizer is None:
        raise MixbitsError("gptq and awq need calibration data: load the model with its tokenizer, "
                           "or pass calibration= a [windows, tokens] tensor of token ids")
    text = load_text(source)
    windows, spec = calibration_windows(tokenize(text, tokenizer), count, length)
    return windows, {"text": text.name, "text_sha256": text.sha256, **spec.as_dict()}


def _quantize_calibrated(module: nn.Module, fmt: Format, windows, report: QuantizationReport, include_head: bool, progress: bool) -> None:
    decoder = decoder_parts(module, "activation-aware scaling") if report.awq else None
    sequence = SequentialCalibration(module, windows)
    for index, block in enumerate(tqdm(sequence, desc=f"{report.method} blocks", disable=not progress, leave=False)):
        stages = block.stages()
        if decoder is not None:
            linears = [linear for stage in stages for linear in stage.linears]
            names = {linear: name for stage in stages for name, linear in zip(stage.names, stage.linears)}
            report.scaled += scale_layer(decoder.layers[index], block.stats(linears), fmt, names)
        for stage in stages:
            stats = block.stats(stage.linears)
            for name, linear in zip(stage.names, stage.linears):
                _solve(linear, stats[linear], name, fmt, report)
    if include_head:
        name, head = output_head(module)
        norm = _final_norm(module)
        _solve(head, input_stats(norm(sequence.outputs)), name, fmt, report)


def _solve(linear: nn.Linear, stats: InputStats, name: str, fmt: Format, report: QuantizationReport) -> None:
    if report.solver == "gptq":
        quantized = gptq(linear.weight, stats.hessian, fmt, clip_search=report.clip_search)
    else:
        quantized = round_to_nearest(linear.weight, fmt, report.clip_search, hessian=stats.hessian)
    _replace(linear, quantized.dequantize(), name, fmt, report)


def _replace(linear: nn.Linear, weight: torch.Tensor, name: str, fmt: Format, report: QuantizationReport) -> None:
    linear.weight.copy_(weight.to(linear.weight.dtype))
    rows, cols = weight.shape
    report.layers.append(LayerReport(name, (rows, cols), fmt.bits(rows, cols)))


def _final_norm(module: nn.Module) -> nn.Module:
    """The norm between the last block and the output head (needed for the head's calibration)."""
    decoder = module.get_decoder() if hasattr(module, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise MixbitsError("calibrated quantization of the head needs a decoder with a final `norm`; quantize the head with rtn")
    return norm

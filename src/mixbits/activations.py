"""Quantized activations: the input of a Linear rounded to a registry format as it is computed.

An activation format is an ordinary format applied to the input matrix
[tokens, features], with groups running along the features: `int8:ch:sym`
gives each token its own scale (per token, dynamic), `int8:g32:sym` each
block of 32 inputs of a token (llama.cpp's Q8_0 activations). Scales are
computed from the values at run time (dynamic quantization), except for
static formats: `int8:static` has one scale per layer input, fixed from the
largest magnitude the calibration text gives that input (quantize measures
it and writes it in: `int8:static=0.0123`), and clamps beyond it.

Short forms for the command line: `int8:token` is `int8:ch:sym:scale=fp32`,
`int8:g32` is `int8:g32:sym:scale=fp32`; any other string is parsed by the
registry as it stands (e.g. `fp8_e4m3:ch`, `mxfp8_e4m3`).

The runtime's integer kernels (runtime/csrc/qdot.cpp) quantize exactly as
these formats do when they are symmetric integers of 2 to 8 bits with float32
scales, per token, in blocks of a multiple of 32, or static (`kernel_block`); any other
activation format is fake-quantized (rounded, then multiplied in float), so
evaluation and the runtime compute the same numbers either way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import FormatError
from .formats import Format, parse_format
from .formats.granularity import Granularity, Grouped
from .formats.integer import IntFormat
from .formats.scales import scale_codec

SHORT = re.compile(r"(int\d+):(token|g\d+)")
STATIC = re.compile(r"int(\d+):static(?:=(.+))?")
RUN = 32  # the integer kernels' step along the inputs


@dataclass(frozen=True)
class StaticIntFormat(IntFormat):
    """intB:static[=SCALE]: symmetric B-bit codes of x / SCALE for every token, SCALE fixed by calibration (None
    until then: such a format can be asked for but not applied)."""

    value: float | None = None

    def __str__(self) -> str:
        return f"int{self.bits_per_code}:static" + ("" if self.value is None else f"={self.value!r}")

    def fit(self, grouped: Grouped, clip=1.0, importance=None) -> dict[str, torch.Tensor]:
        if self.value is None:
            raise FormatError(f"{self} has no scale yet: quantize with calibration text to measure it")
        return {"scale": torch.full((*grouped.values.shape[:-1], 1), self.value)}

    def calibrated(self, largest: float) -> "StaticIntFormat":
        """This format with its scale set for inputs of magnitude up to `largest`: largest / (2^(B-1) - 1)."""
        scale = float(torch.tensor(largest / (2 ** (self.bits_per_code - 1) - 1)).clamp(min=1e-30).float())
        return static(self.bits_per_code, scale)


def static(bits: int, value: float | None = None) -> StaticIntFormat:
    return StaticIntFormat(bits, True, Granularity("tensor"), scale_codec("fp32"), value=value)


def parse_activation(text: str | Format) -> Format:
    """An activation format from its string: a registry format, or a short form such as `int8:token`."""
    if isinstance(text, Format):
        return text
    text = text.strip()
    match = STATIC.fullmatch(text)
    if match:
        value = None
        if match.group(2) is not None:
            try:
                value = float(match.group(2))
            except ValueError:
                value = -1.0
            if not (math.isfinite(value) and value > 0 and float(torch.tensor(value).float()) == value):
                raise FormatError(f"activation format {text!r}: the static scale must be a positive float32 number")
        bits = int(match.group(1))
        if not 2 <= bits <= 8:
            raise FormatError(f"activation format {text!r}: static integer inputs take 2 to 8 bits")
        return static(bits, value)
    match = SHORT.fullmatch(text)
    if match:
        granularity = "ch" if match.group(2) == "token" else match.group(2)
        text = f"{match.group(1)}:{granularity}:sym:scale=fp32"
    fmt = parse_format(text)
    if fmt.granularity.kind == "tensor":
        raise FormatError(f"activation format {text!r} has one scale per tensor, which a dynamic runtime cannot "
                          "compute token by token; use per token (int8:token), blocks (int8:g32) or a scale fixed by "
                          "calibration (int8:static)")
    return fmt


def activation_name(fmt: Format) -> str:
    """The short form of `fmt` where one exists, else the registry's string."""
    if isinstance(fmt, StaticIntFormat):
        return str(fmt)
    if isinstance(fmt, IntFormat) and fmt.symmetric and fmt.scale.name == "fp32" and fmt.min is None:
        granularity = "token" if fmt.granularity.kind == "channel" else str(fmt.granularity)
        return f"int{fmt.bits_per_code}:{granularity}"
    return str(fmt)


def kernel_block(fmt: Format, features: int) -> int | None:
    """The block the integer kernels quantize `features` inputs in for `fmt`, or None if they cannot."""
    if not (isinstance(fmt, IntFormat) and fmt.symmetric and fmt.scale.name == "fp32" and fmt.min is None
            and 2 <= fmt.bits_per_code <= 8 and features % RUN == 0):
        return None
    if fmt.granularity.kind == "channel" or isinstance(fmt, StaticIntFormat):  # static: one scale for every token
        return features
    size = fmt.granularity.size
    return size if fmt.granularity.kind == "group" and size % RUN == 0 and features % size == 0 else None


def fake_quantize(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """`x` [..., features] rounded to `fmt` token by token and returned as float values, in x's dtype."""
    return fmt.quantize(x.reshape(-1, x.shape[-1])).dequantize().reshape(x.shape).to(x.dtype)

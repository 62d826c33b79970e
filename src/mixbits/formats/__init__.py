"""The format registry: a format string parses to one format object.

`parse_format("int4:g128:asym")` returns the format; `str()` of it gives the
same string back. Families are recognised by the head of the string (the
part before the first colon); presets name common formats of the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Callable

from ..errors import FormatError
from .base import CLIP_GRID, Format, QuantizedTensor
from .granularity import Granularity
from .integer import IntFormat
from .lut import LearnedTableFormat, TableFormat
from .minifloat import MinifloatFormat
from .mx import ELEMENTS as MX_NAMES
from .mx import MXFormat
from .ternary import SignFormat
from .trellis import TrellisFormat
from .vector import VectorFormat

FAMILIES: list[tuple[re.Pattern, Callable[[str], Format]]] = [
    (re.compile(r"int-?\d+"), IntFormat.parse),
    (re.compile(r"fp\d+_e\d+m\d+"), MinifloatFormat.parse),
    (re.compile(r"mx\w+"), MXFormat.parse),
    (re.compile(r"(nf|log)\d+"), TableFormat.parse),
    (re.compile(r"lut\d+"), LearnedTableFormat.parse),
    (re.compile(r"binary|ternary"), SignFormat.parse),
    (re.compile(r"vq\d+x\d+"), VectorFormat.parse),
    (re.compile(r"trellis\d+x\d+"), TrellisFormat.parse),
]

PRESETS = {
    "nvfp4": "fp4_e2m1:g16:scale=e4m3",  # NVIDIA's FP4: E4M3 block scales over an FP32 tensor scale
    "nvint4": "int4:g16:sym:scale=e4m3",  # INT4 elements under NVFP4's scaling
    # llama.cpp's GGML block types, bit for bit (mixbits.io.gguf writes them)
    "q8_0": "int8:g32:sym",
    "q4_0": "int4:g32:sym",
    "q4_1": "int4:g32:asym:min=fp16",
    "q4_k": "int4:g32:asym:scale=u6s8:min=u6s8",
    "q6_k": "int6:g16:sym:scale=i8s16",
}


def parse_format(text: str | Format) -> Format:
    """Parse a format string such as `int4:g128:asym`, `mxfp4`, `nvfp4`, `nf4:g64`; formats pass through."""
    if isinstance(text, Format):
        return text
    text = text.strip()
    head = text.split(":")[0]
    if head in PRESETS:
        if text != head:
            raise FormatError(f"{head} is a fixed preset ({PRESETS[head]}); to change it, write that string with other fields")
        return dataclasses.replace(parse_format(PRESETS[head]), label=head)
    for pattern, parse in FAMILIES:
        if pattern.fullmatch(head):
            return parse(text)
    close = difflib.get_close_matches(text, known_names(), n=4, cutoff=0.4) or ["int4:g128:asym", "mxfp4", "nf4:g64"]
    raise FormatError(f"unknown format {text!r}; did you mean {', '.join(close)}? (`mixbits formats` lists all)")


def catalog(group: int = 64) -> list[Format]:
    """One format of each kind, at the given group size where the format has one."""
    g = f"g{group}"
    names = [f"int{k}:{g}:{kind}" for k in range(8, 0, -1) for kind in ("asym", "sym")]
    names += ["binary:" + g, "ternary:" + g]
    names += [f"{fp}:{g}" for fp in ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1")]
    names += list(MX_NAMES) + list(PRESETS)
    names += [f"nf4:{g}", f"log4:{g}", f"log3:{g}", f"lut4:{g}", f"lut3:{g}", f"lut2:{g}"]
    names += [f"vq{dim}x{bits}:{g}" for dim, bits in ((2, 6), (2, 5), (4, 10), (2, 4), (4, 8))] + [f"vq8x8:{g}:stages=2"]
    names += [f"trellis2x{bits}:ch" for bits in (8, 7, 6, 5, 4, 3)]  # one scale per row: no group
    return [parse_format(name) for name in names]


def known_names() -> list[str]:
    return sorted({str(f) for group in (64, 128) for f in catalog(group)})


__all__ = ["CLIP_GRID", "Format", "FormatError", "Granularity", "QuantizedTensor", "catalog", "parse_format"]

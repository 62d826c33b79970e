"""A safetensors file written one tensor at a time, so that a checkpoint larger than memory can be assembled.

The format: an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and byte range
in the data that follows (with "__metadata__", string to string), padded with spaces to a multiple of 8, then the
tensors' bytes back to back. The header needs only each tensor's dtype and shape, so a `Lazy` tensor is read from
wherever it waits (a finished block's file) just before its bytes are written, and freed after.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPES.items()}


@dataclass(frozen=True)
class Lazy:
    """A tensor known by its dtype and shape, read by `load` when it is written."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def nbytes(tensor: torch.Tensor | Lazy) -> int:
    return tensor.nbytes if isinstance(tensor, Lazy) else tensor.numel() * tensor.element_size()


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor | Lazy], metadata: dict[str, str]) -> None:
    """Write `tensors` (in name order) to `path` as safetensors, holding one tensor in memory at a time."""
    names = sorted(tensors)
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for name in names:
        tensor = tensors[name]
        size = nbytes(tensor)
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name in names:
            tensor = tensors[name]
            value = tensor.load() if isinstance(tensor, Lazy) else tensor
            if value.dtype != tensor.dtype or tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(f"tensor {name} changed while the checkpoint was written")
            handle.write(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

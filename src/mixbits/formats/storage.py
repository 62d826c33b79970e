"""A quantized matrix as the tensors a checkpoint stores, and back, bit for bit.

Codes are packed at their true width (`packing`), without the padding of a
partial last group; signed codes are offset by 2^(width-1) first. Each
parameter is stored as its format says (`Format.stored_params`): float
parameters through their scale codec (fp16, E8M0 exponents, E4M3 values with
their tensor scale, int8 steps with their row scales), integer ones packed at
their width. So the stored bytes are the format's exact bit count, rounded up
to whole bytes per tensor.

Tensor names are `codes` and `PARAM` or `PARAM.PART` (e.g. `scale.value`,
`scale.row`, `zero`); callers prefix them with the layer's name.
"""

from __future__ import annotations

import math

import torch

from ..errors import FormatError
from ..packing import pack, packed_size, unpack
from .base import Format, QuantizedTensor


def store(quantized: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The tensors that hold `quantized`, in their stored dtypes."""
    fmt = quantized.format
    tensors = {"codes": _pack_codes(fmt.flat_codes(quantized.codes, quantized.shape), fmt.code_bits, fmt.signed_codes)}
    for name, storage in fmt.stored_params().items():
        value = quantized.params[name]
        if isinstance(storage, int):
            tensors[name] = pack(value.reshape(-1), storage)
        else:
            tensors.update({f"{name}.{part}": t.contiguous() for part, t in storage.store(value).items()})
    return tensors


def restore(fmt: Format, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
    """The quantized matrix `store` saved; a FormatError if a tensor is missing or the wrong size."""
    rows, cols = shape
    codes = _unpack(tensors, "codes", fmt.code_bits, fmt.code_count(rows, cols))
    if fmt.signed_codes:
        codes = (codes.to(torch.int16) - 2 ** (fmt.code_bits - 1)).to(torch.int8)
    params = {}
    for name, storage in fmt.stored_params().items():
        param_shape = fmt.param_shape(name, rows, cols)
        if isinstance(storage, int):
            params[name] = _unpack(tensors, name, storage, math.prod(param_shape)).reshape(param_shape)
            continue
        parts = {key.split(".", 1)[1]: value for key, value in tensors.items() if key.startswith(name + ".")}
        if "value" not in parts:
            raise FormatError(f"a stored {fmt} matrix has no {name}.value tensor; the checkpoint is incomplete")
        try:
            params[name] = storage.restore(parts, param_shape)
        except (RuntimeError, KeyError, FormatError) as error:  # wrong sizes or missing parts
            raise FormatError(f"stored {name} of a {rows}x{cols} {fmt} matrix does not fit its shape {list(param_shape)} "
                              f"({error}); the checkpoint does not match its manifest") from None
    # A partial last group is padded by repeating the last code, as quantizing did with the last value.
    return QuantizedTensor(fmt, (rows, cols), fmt.grouped_codes(codes, (rows, cols)), params)


def stored_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _pack_codes(codes: torch.Tensor, width: int, signed: bool) -> torch.Tensor:
    if signed:
        codes = codes.to(torch.int16) + 2 ** (width - 1)
    return pack(codes, width)


def _unpack(tensors: dict[str, torch.Tensor], name: str, width: int, count: int) -> torch.Tensor:
    """`count` unsigned integers packed at `width` bits in tensor `name`, which must be exactly that long."""
    if name not in tensors:
        raise FormatError(f"a stored matrix has no {name!r} tensor; the checkpoint is incomplete")
    data = tensors[name]
    if data.dtype != torch.uint8 or data.numel() != packed_size(count, width):
        raise FormatError(f"stored {name!r} holds {data.numel()} {data.dtype} values, expected "
                          f"{packed_size(count, width)} bytes ({count} values of {width} bits); the checkpoint is damaged")
    return unpack(data, width, count)


"""Bit packing of unsigned integer codes of 1 to 16 bits into bytes, and back.

Stored checkpoints depend on this layout, so it is fixed:

    The codes form one little-endian bit stream. Code i occupies stream bits
    [i * width, (i + 1) * width), its least significant bit first. Stream bit
    b is bit (b % 8) of byte (b // 8), bit 0 being the least significant.
    The stream takes exactly ceil(count * width / 8) bytes; the unused high
    bits of the last byte are zero.

Equivalently, the packed bytes are the little-endian encoding of the integer
sum(code[i] << (i * width)). Width 4 puts code 0 in the low nibble of byte 0;
width 8 is the codes themselves. Signed codes must be made non-negative first
(add 2^(width-1), or mask the two's complement with 2^width - 1).

Both directions are one regrouping: 8 codes of `width` bits and `width` bytes
span the same 8 * width bits, so each group is gathered into one int64 word
with shifts and split back out with shifts, for all groups at once. Groups are
processed in chunks so that the int64 temporaries stay in cache and memory use
stays near the size of the input and output. Codes wider than a byte (the
indices of vector codebooks) are split into their bits first, which is the
same stream at width 1.
"""

from __future__ import annotations

import torch

from .errors import FormatError

MIN_WIDTH, MAX_WIDTH = 1, 16
# Groups per step: 131072 codes, int64 temporaries of 1 MiB that stay in cache.
# Unchunked, the same code ran 4 to 8 times slower on 16M codes (one thread).
CHUNK_GROUPS = 16384


def packed_size(count: int, width: int) -> int:
    """Bytes taken by `count` codes of `width` bits: ceil(count * width / 8)."""
    _check_width(width)
    if count < 0:
        raise FormatError(f"code count must be non-negative, got {count}")
    return (count * width + 7) // 8


def pack(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative integer codes below 2**width (any shape, flattened) into a 1-D uint8 tensor."""
    flat = _checked_codes(codes, width)
    if width == 8:
        return flat.to(torch.uint8, copy=True)  # a copy, never a view of the caller's codes
    if width > 8:
        return pack(_bits(flat, width).reshape(-1), 1)
    return _regroup(flat, width, 8, packed_size(flat.numel(), width))


def unpack(data: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """The first `count` codes packed in `data` (uint8) at `width` bits, as a 1-D uint8 tensor (int32 above 8 bits)."""
    size = packed_size(count, width)
    if data.dtype != torch.uint8:
        raise FormatError(f"packed data must be a uint8 tensor, got {data.dtype}; pass the bytes pack() returned")
    flat = data.reshape(-1)
    if flat.numel() < size:
        raise FormatError(
            f"{count} codes of {width} bits need {size} bytes, got only {flat.numel()}; check the count and width"
        )
    if width == 8:
        return flat[:count].clone()
    if width > 8:
        bits = unpack(flat[:size], 1, count * width).reshape(count, width).to(torch.int32)
        return (bits << torch.arange(width, dtype=torch.int32)).sum(dim=1, dtype=torch.int32)
    return _regroup(flat[:size], 8, width, count)


def _bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Each code's `width` bits, least significant first: [count, width] uint8."""
    return ((codes.to(torch.int64)[:, None] >> torch.arange(width)) & 1).to(torch.uint8)


def _regroup(values: torch.Tensor, bits_in: int, bits_out: int, count: int) -> torch.Tensor:
    """The first `count` `bits_out`-bit values of the bit stream of `values`, each of `bits_in` bits, as uint8.

    A group of `bits_out` inputs and one of `bits_in` outputs span the same
    bits_in * bits_out <= 56 bits: one int64 word. Inputs hold disjoint bits of
    the word, so their sum is their bitwise or. Missing inputs count as zero.
    """
    device = values.device
    gather, split = _steps(bits_in, bits_out, device), _steps(bits_out, bits_in, device)
    out = torch.empty(count, dtype=torch.uint8, device=device)
    groups = -(-count // bits_in)
    for first in range(0, groups, CHUNK_GROUPS):
        size = min(CHUNK_GROUPS, groups - first)
        lanes = values[first * bits_out : (first + size) * bits_out].to(torch.int64)
        if lanes.numel() < size * bits_out:  # only the last group can be partial
            lanes = torch.cat([lanes, lanes.new_zeros(size * bits_out - lanes.numel())])
        words = (lanes.view(size, bits_out) << gather).sum(dim=1, keepdim=True)
        pieces = ((words >> split) & (2**bits_out - 1)).view(-1)
        out[first * bits_in : (first + size) * bits_in] = pieces[: count - first * bits_in]
    return out


def _steps(step: int, count: int, device: torch.device) -> torch.Tensor:
    """Shift amounts 0, step, 2 * step, ... for `count` lanes."""
    return torch.arange(0, step * count, step, dtype=torch.int64, device=device)


def _check_width(width: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or not MIN_WIDTH <= width <= MAX_WIDTH:
        raise FormatError(
            f"packing width must be an integer from {MIN_WIDTH} to {MAX_WIDTH} bits, got {width!r}; "
            "store wider codes as a plain integer tensor"
        )


def _checked_codes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """`codes` flattened, after checking each one fits in `width` unsigned bits."""
    _check_width(width)
    if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
        raise FormatError(
            f"codes must have an integer dtype, got {codes.dtype}; round them and convert, e.g. .to(torch.uint8)"
        )
    flat = codes.reshape(-1)
    if flat.dtype in (torch.uint16, torch.uint32, torch.uint64):
        flat = flat.to(torch.int64)  # few CPU kernels exist for these dtypes
    if flat.numel() == 0:
        return flat
    # Compare as Python ints: a scalar like 256 silently wraps when compared with an int8 tensor.
    low, high = (int(v) for v in torch.aminmax(flat))
    if low < 0 or high >= 2**width:
        wide = flat.to(torch.int64)
        index = int(((wide < 0) | (wide >= 2**width)).nonzero()[0])
        raise FormatError(
            f"code {int(wide[index])} at index {index} does not fit in {width} unsigned bits (0 to {2**width - 1}); "
            f"offset signed codes by {2 ** (width - 1)} or pack at a wider width"
        )
    return flat

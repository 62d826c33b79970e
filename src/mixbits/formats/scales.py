"""Storage dtypes of quantization scales.

A scale is computed in float32, then rounded to its storage dtype *before* the
codes are chosen, so that dequantizing with the stored scale is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FormatError


@dataclass(frozen=True)
class ScaleDtype:
    name: str
    bits: int
    torch_dtype: torch.dtype

    def round(self, scale: torch.Tensor) -> torch.Tensor:
        """Round float32 scales to this dtype (kept as float32), keeping the sign.

        Magnitudes are clamped into the dtype's finite positive range so that no
        scale becomes 0 or inf (a group of zeros still gets a usable scale).
        """
        info = torch.finfo(self.torch_dtype)
        # 16-bit scales may be subnormal (smallest = smallest_normal * eps); float32 ones stay normal.
        tiny = info.smallest_normal * (info.eps if info.bits == 16 else 1.0)
        magnitude = scale.abs().clamp(min=tiny, max=info.max)
        sign = torch.where(scale < 0, -1.0, 1.0)
        return (sign * magnitude).to(self.torch_dtype).to(torch.float32)


SCALE_DTYPES = {
    "fp32": ScaleDtype("fp32", 32, torch.float32),
    "fp16": ScaleDtype("fp16", 16, torch.float16),
    "bf16": ScaleDtype("bf16", 16, torch.bfloat16),
}


def scale_dtype(name: str) -> ScaleDtype:
    try:
        return SCALE_DTYPES[name]
    except KeyError:
        raise FormatError(f"unknown scale dtype {name!r}; use one of {', '.join(SCALE_DTYPES)}") from None

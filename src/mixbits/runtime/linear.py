"""Linear layers that hold quantized weights and compute from them.

`quantized_linear` picks, per layer, the fastest module whose arithmetic
equals the fake-quantized layer's (up to float summation order):

- `IntLinear`, integer formats with groups of a multiple of 32 inputs (or
  per channel): codes of up to 4 bits packed two per byte, wider ones one per
  byte, with a float scale and offset per group; a compiled kernel
  (`kernels.native`) multiplies from the codes for a few input rows (decode)
  and dequantizes this one layer for many (prefill), then calls the float
  matrix product.
- `DequantLinear`, any format: codes kept as one byte each plus the format's
  parameters; each forward dequantizes this one layer's weight, then
  multiplies. Float weights never exist for more than one layer at a time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..formats import Format, QuantizedTensor
from ..formats.granularity import ungroup
from ..formats.integer import IntFormat
from .kernels import native

RUN = 32  # the kernel's step along the inputs: inputs and groups must be multiples of it
# Above this many input rows, dequantizing the layer once and calling the float product is faster.
KERNEL_ROWS = 8


def hold_codes(module: nn.Module, quantized: QuantizedTensor) -> None:
    """Give `module` the stored matrix as buffers: its format, `codes` and one `param_NAME` per parameter."""
    module.format = quantized.format
    module.register_buffer("codes", quantized.codes)
    module.param_names = list(quantized.params)
    for name, value in quantized.params.items():
        module.register_buffer(f"param_{name}", value)


def held_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters `hold_codes` gave `module`, by name."""
    return {name: getattr(module, f"param_{name}") for name in module.param_names}


class DequantLinear(nn.Module):
    """y = x Wᵀ + b with W dequantized from codes and parameters at every call."""

    def __init__(self, quantized: QuantizedTensor, bias: torch.Tensor | None):
        super().__init__()
        hold_codes(self, quantized)
        self.out_features, self.in_features = quantized.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def weight_values(self) -> torch.Tensor:
        return ungroup(self.format.decode(self.codes, held_params(self)), (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_values().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, format={self.format}"


class IntLinear(nn.Module):
    """y = x Wᵀ + b for integer codes q with w = q * scale + offset per group, computed from the codes."""

    def __init__(self, quantized: QuantizedTensor, bias: torch.Tensor | None):
        super().__init__()
        fmt = quantized.format
        self.format = fmt
        self.out_features, self.in_features = quantized.shape
        self.group = self.in_features if fmt.granularity.kind == "channel" else fmt.granularity.size
        self.nibbles = fmt.code_bits <= 4
        codes = ungroup(quantized.codes, quantized.shape).to(torch.int16)
        scale = quantized.params["scale"].reshape(self.out_features, -1).float()
        if fmt.symmetric:  # code c is stored as c + half, so the offset is -half * scale
            half = 8 if self.nibbles else 2 ** (fmt.code_bits - 1)
            codes, offset = codes + half, -half * scale
        elif fmt.min is not None:  # w = q * scale + min already
            offset = quantized.params["min"].reshape(self.out_features, -1).float()
        else:
            offset = -quantized.params["zero"].reshape(self.out_features, -1).float() * scale
        codes = codes.to(torch.uint8)
        if self.nibbles:  # in each run of 32 inputs, byte j holds input j (low nibble) and input j + 16 (high)
            runs = codes.reshape(self.out_features, -1, 2, RUN // 2)
            codes = runs[:, :, 0, :] | (runs[:, :, 1, :] << 4)
        self.register_buffer("codes", codes.reshape(self.out_features, -1).contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("offset", offset.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @staticmethod
    def supports(fmt: Format, shape: tuple[int, int]) -> bool:
        cols = shape[1]
        if not isinstance(fmt, IntFormat) or cols % RUN:
            return False
        return fmt.granularity.kind == "channel" or (fmt.granularity.kind == "group" and fmt.granularity.size % RUN == 0)

    @classmethod
    def stack(cls, parts: list[IntLinear]) -> IntLinear | None:
        """One module for layers that read the same input: their rows stacked (None unless the layouts agree)."""
        first = parts[0]
        if any((p.group, p.nibbles, p.in_features) != (first.group, first.nibbles, first.in_features) for p in parts):
            return None
        stacked = cls.__new__(cls)
        nn.Module.__init__(stacked)
        stacked.format, stacked.group, stacked.nibbles = first.format, first.group, first.nibbles
        stacked.in_features, stacked.out_features = first.in_features, sum(p.out_features for p in parts)
        stacked.bias = None
        stack_rows(parts, stacked, ("codes", "scale", "offset", "bias"))
        return stacked

    def _kernel(self, operation: str):
        """The compiled `operation` ("linear" or "dequantize") for this layer's code layout."""
        return getattr(native(), f"{'nibble' if self.nibbles else 'byte'}_{operation}")

    def weight_values(self) -> torch.Tensor:
        return self._kernel("dequantize")(self.codes, self.scale, self.offset, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()
        if flat.shape[0] <= KERNEL_ROWS:
            y = self._kernel("linear")(flat, self.codes, self.scale, self.offset, self.group)
        else:
            y = flat @ self.weight_values().T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def matvec(self):
        """This layer as a plain function of a contiguous float32 [rows <= KERNEL_ROWS, in] input.

        It calls the kernel directly: nn.Module's call machinery and forward's reshaping cost more than a
        4-bit product of a decode step on a small machine.
        """
        kernel, codes, scale, offset, group, bias = (self._kernel("linear"), self.codes, self.scale, self.offset,
                                                     self.group, self.bias)
        if bias is None:
            return lambda x: kernel(x, codes, scale, offset, group)
        return lambda x: kernel(x, codes, scale, offset, group).add_(bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, format={self.format}"


def stack_rows(parts: list[nn.Module], stacked: nn.Module, names: tuple[str, ...]) -> None:
    """Give `stacked` each named tensor of `parts` concatenated along rows, then point the parts at row views of it.

    A bias some parts lack is stacked as zeros for them; parameters stay parameters, buffers buffers. The parts
    keep computing what they did, and nothing is stored twice.
    """
    for name in names:
        values = [getattr(part, name) for part in parts]
        present = [value for value in values if value is not None]
        if not present:
            continue
        tensor = torch.cat([value.detach() if value is not None else present[0].new_zeros(part.out_features)
                            for value, part in zip(values, parts)])
        parameter = isinstance(present[0], nn.Parameter)
        if parameter:
            setattr(stacked, name, nn.Parameter(tensor, requires_grad=False))
        else:
            stacked.register_buffer(name, tensor)
        start = 0
        for part, value in zip(parts, values):
            rows = tensor[start:start + part.out_features]
            if value is not None:
                setattr(part, name, nn.Parameter(rows, requires_grad=False) if parameter else rows)
            start += part.out_features


def quantized_linear(quantized: QuantizedTensor, bias: torch.Tensor | None = None) -> nn.Module:
    """The runtime module for one quantized matrix: the integer kernel where it applies and is built."""
    if IntLinear.supports(quantized.format, quantized.shape) and native() is not None:
        return IntLinear(quantized, bias)
    return DequantLinear(quantized, bias)

"""Linear layers that hold quantized weights and compute from them.

`quantized_linear` picks, per layer, the fastest module whose arithmetic
equals the fake-quantized layer's (up to float summation order, and for the
tables of NF4, log grids and learned levels with integer inputs, up to their
rounding to 14-bit codes, `code_table` and `TableLinear`):

- `IntLinear`, integer formats with groups of a multiple of 32 inputs (or
  per channel): codes of up to 4 bits packed two per byte, wider ones one per
  byte, with a float scale and offset per group; a compiled kernel
  (`kernels.native`) multiplies from the codes for a few input rows (decode)
  and dequantizes this one layer for many (prefill), then calls the float
  matrix product.
- `VectorLinear`, vector codebooks: tables of each input vector's dot
  products with the codewords, summed as the codes pick (few rows), or the
  layer dequantized once (many).
- `TrellisLinear`, trellis codes: inputs rotated as the weights were, then
  each row's bit stream walked state by state (few rows), or the rotated
  layer decoded once (many).
- `DequantLinear`, any format: codes kept as one byte each plus the format's
  parameters; each forward dequantizes this one layer's weight, then
  multiplies. Float weights never exist for more than one layer at a time.

With an activation format (`activations`), the input is quantized too. An
`IntLinear` whose activation format the integer kernels implement
(`activations.kernel_block`) quantizes each input once to int8 codes and
multiplies codes by codes for any number of rows (csrc/qdot.cpp), as does a
`TableLinear` (learned tables of up to 4 bits); any other layer rounds its
input to the format in a forward pre-hook (`with_activation`), so module and
parameter names stay those of the model.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..activations import activation_name, fake_quantize, kernel_block
from ..formats import Format, QuantizedTensor
from ..formats.granularity import ungroup
from ..formats.integer import IntFormat
from ..formats.trellis import TrellisFormat, rotate, unrotate
from ..packing import pack, packed_size
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
    """y = x Wᵀ + b for integer codes q with w = q * scale + offset per group, computed from the codes.

    Codes are unsigned (a symmetric code c is held as c + center, center 8 for codes of up to 4 bits, else
    2^(bits-1), with offset -center * scale; a table format's nibbles index unsigned codes) and laid
    out for the kernel that reads them: float inputs read them in runs (csrc/intgemm.cpp); with an
    `activation` format the kernels implement, x is quantized to int8 codes in its blocks and the codes sit
    in panels of 16 rows (csrc/qdot.cpp, `to_panels`).
    """

    def __init__(self, quantized: QuantizedTensor, bias: torch.Tensor | None, activation: Format | None = None):
        super().__init__()
        fmt = quantized.format
        self.format = fmt
        self.out_features, self.in_features = quantized.shape
        self.group = self.in_features if fmt.granularity.kind == "channel" else fmt.granularity.size
        self.nibbles = fmt.code_bits <= 4
        codes = ungroup(quantized.codes, quantized.shape).to(torch.int16)
        scale = quantized.params["scale"].reshape(self.out_features, -1).float()
        self.center = None  # symmetric codes are held as c + center, so the offset is -center * scale
        self.unit = 1.0  # every weight's factor besides its scale: a table's unit
        self.exact = True  # whether the codes give exactly the format's values (a rounded table does not)
        found = code_table(fmt)
        self.register_buffer("table", None)
        if found is not None:  # the nibbles index unsigned codes k + center, k the table's integers
            integers, self.unit, self.exact = found
            self.center = -int(integers.min())
            unsigned = integers + self.center
            wide = int(unsigned.max()) > NARROW_CODE
            self.table = (torch.cat([unsigned >> 7, unsigned & 127]) if wide else unsigned).to(torch.uint8)
            offset = -self.center * scale
        elif fmt.symmetric:
            self.center = 8 if self.nibbles else 2 ** (fmt.code_bits - 1)
            codes, offset = codes + self.center, -self.center * scale
        elif fmt.min is not None:  # w = q * scale + min already
            offset = quantized.params["min"].reshape(self.out_features, -1).float()
        else:
            offset = -quantized.params["zero"].reshape(self.out_features, -1).float() * scale
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self._hold(codes.to(torch.uint8), scale, offset, activation)

    def _hold(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, activation: Format | None) -> None:
        """Keep unsigned codes [out, in] and scale and offset [out, groups] laid out for `activation`'s kernel."""
        block = None if activation is None else kernel_block(activation, self.in_features)
        if activation is None and self.table is not None:
            raise ValueError(f"{self.format} runs only on the integer-dot kernels: give an activation format")
        if activation is not None and block is None:
            raise ValueError(f"the integer kernels cannot quantize inputs to {activation}; use with_activation")
        self.activation, self.block = activation, block
        if activation is None:
            if self.nibbles:  # in each run of 32 inputs, byte j holds input j (low nibble) and input j + 16 (high)
                runs = codes.reshape(self.out_features, -1, 2, RUN // 2)
                codes = runs[:, :, 0, :] | (runs[:, :, 1, :] << 4)
            codes = codes.reshape(self.out_features, -1)
        else:  # 16-bit scales where they hold them exactly (formats with fp16 scales): fewer bytes to read
            codes, scale = to_panels(codes, self.nibbles), panel_params(scale)
            offset = None if self.center is not None else panel_params(offset)
            if all(t is None or torch.equal(t.half().float(), t) for t in (scale, offset)):
                scale, offset = scale.half(), None if offset is None else offset.half()
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("offset", None if offset is None else offset.contiguous())

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unsigned codes [out, in] (a table format's indices) and scale and offset [out, groups], whatever the
        layout."""
        n, k = self.out_features, self.in_features
        if self.activation is not None:
            scale = rows_from_panels(self.scale.float(), n)
            offset = -self.center * scale if self.offset is None else rows_from_panels(self.offset.float(), n)
            return from_panels(self.codes, n, k, self.nibbles), scale, offset
        return from_runs(self.codes, k) if self.nibbles else self.codes, self.scale, self.offset

    def _set_activation(self, activation: Format | None) -> None:
        """Quantize inputs to `activation` (None: float inputs) from now on, the codes laid out again for it."""
        if activation != self.activation:
            codes, scale, offset = self.unpacked()
            for name in ("codes", "scale", "offset"):
                delattr(self, name)
            self._hold(codes, scale.clone(), offset.clone(), activation)

    @staticmethod
    def supports(fmt: Format, shape: tuple[int, int], activation: Format | None = None) -> bool:
        cols = shape[1]
        if cols % RUN:
            return False
        if activation is not None and kernel_block(activation, cols) is None:
            return False
        size = fmt.granularity.size if fmt.granularity.kind == "group" else 0
        # groups of 16: only 4-bit codes with integer inputs, whose runs split into two halves of 16 (NVFP4)
        half = size == RUN // 2 and fmt.code_bits <= 4 and activation is not None
        if not (fmt.granularity.kind == "channel" or (size and size % RUN == 0) or half):
            return False
        # table formats only on the integer-dot kernels (quantized inputs)
        return isinstance(fmt, IntFormat) or (activation is not None and code_table(fmt) is not None)

    @classmethod
    def stack(cls, parts: list[IntLinear]) -> IntLinear | None:
        """One module for layers that read the same input: their rows stacked (None unless the layouts agree).

        The parts then read views of the stacked tensors. In panels, every part but the last must fill whole
        panels of 16 rows for that.
        """
        first = parts[0]

        def layout(p):
            table = None if p.table is None else tuple(p.table.tolist())
            return (p.group, p.nibbles, p.in_features, p.activation, p.center, p.unit, p.scale.dtype, p.offset is None,
                    table)

        if any(layout(p) != layout(first) for p in parts):
            return None
        if first.activation is not None and any(p.out_features % PANEL for p in parts[:-1]):
            return None
        stacked = cls.__new__(cls)
        nn.Module.__init__(stacked)
        stacked.format, stacked.group, stacked.nibbles = first.format, first.group, first.nibbles
        stacked.in_features, stacked.out_features = first.in_features, sum(p.out_features for p in parts)
        stacked.activation, stacked.block = first.activation, first.block
        stacked.center, stacked.unit, stacked.exact, stacked.bias = first.center, first.unit, first.exact, None
        stacked.register_buffer("table", first.table)
        stack_rows(parts, stacked, ("codes", "scale", "offset"), first.activation is not None)
        if first.offset is None:
            stacked.register_buffer("offset", None)
        stack_rows(parts, stacked, ("bias",))
        return stacked

    def _kernel(self, operation: str):
        """The compiled `operation` ("linear", "xlinear" or "dequantize") for this layer's code layout."""
        return getattr(native(), f"{'nibble' if self.nibbles else 'byte'}_{operation}")

    def weight_values(self) -> torch.Tensor:
        if self.activation is not None:
            return self._dequantized(*self.unpacked())
        return self._kernel("dequantize")(self.codes, self.scale, self.offset, self.group)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Weight rows `ids` (1-D) dequantized from the codes, [len(ids), in]: an embedding tied to this layer."""
        n, k = len(ids), self.in_features
        if self.activation is not None:  # panels: the rows' panels, then each row's lane
            panel, lane = ids // PANEL, ids % PANEL
            steps = self.codes[panel].reshape(n, k // RUN, -1, PANEL, 4).permute(0, 3, 1, 2, 4)[torch.arange(n), lane]
            if self.nibbles:
                steps = torch.cat([steps & 0x0F, steps >> 4], dim=2)
            codes = steps.reshape(n, k)
            scale = self.scale.float()[panel, :, lane]
            offset = None if self.offset is None else self.offset.float()[panel, :, lane]
        else:
            codes = from_runs(self.codes[ids], k) if self.nibbles else self.codes[ids]
            scale, offset = self.scale[ids], self.offset[ids]
        return self._dequantized(codes, scale, offset)

    def _dequantized(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """Float weights [rows, in] from unsigned codes (a table format's indices) and per-group scale and offset."""
        values = (codes if self.table is None else self.table_codes()[codes.long()]).float()
        if self.center is not None:  # (c + center - center) * scale: exactly the format's own c * scale
            return (values - self.center) * self.unit * self._per_input(scale)
        return values * self._per_input(scale) + self._per_input(offset)

    def table_codes(self) -> torch.Tensor:
        """The unsigned codes (int32 [16]) a table format's nibbles index: the table's integers + center."""
        table = self.table.int()
        return table if len(table) == 16 else table[:16] * 128 + table[16:]

    def _per_input(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group values [out, groups] repeated over each group's inputs: [out, in]."""
        return values.repeat_interleave(self.group, dim=1)[:, :self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()
        if self.activation is not None:
            y = self.matvec()(flat)
        else:
            if flat.shape[0] <= KERNEL_ROWS:
                y = self._kernel("linear")(flat, self.codes, self.scale, self.offset, self.group)
            else:
                y = flat @ self.weight_values().T
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def matvec(self):
        """This layer as a plain function of a contiguous float32 [rows, in] input (rows <= KERNEL_ROWS unless
        the input is quantized: the integer kernels take any number).

        It calls the kernel directly: nn.Module's call machinery and forward's reshaping cost more than a
        4-bit product of a decode step on a small machine.
        """
        codes, scale, offset, group, bias = self.codes, self.scale, self.offset, self.group, self.bias
        if self.activation is not None:
            kernel, block, bits = self._kernel("xlinear"), self.block, self.activation.bits_per_code
            fixed = getattr(self.activation, "value", None) or 0.0  # a static scale, else 0: scales from the values
            n, center, unit = self.out_features, float(self.center or 0), self.unit
            if self.nibbles:
                table = self.table
                product = lambda x: kernel(x, block, bits, fixed, codes, scale, offset, group, n, center, unit, table)  # noqa: E731
            else:
                product = lambda x: kernel(x, block, bits, fixed, codes, scale, offset, group, n, center)  # noqa: E731
            return product if bias is None else lambda x: product(x).add_(bias)
        kernel = self._kernel("linear")
        if bias is None:
            return lambda x: kernel(x, codes, scale, offset, group)
        return lambda x: kernel(x, codes, scale, offset, group).add_(bias)

    def extra_repr(self) -> str:
        activation = "" if self.activation is None else f", activation={activation_name(self.activation)}"
        return f"{self.in_features}, {self.out_features}, format={self.format}{activation}"


class TableLinear(nn.Module):
    """y = x Wᵀ + b for a learned-table format (`lut` of up to 4 bits: 16 levels per row and group), its inputs
    quantized to int8 codes (an activation format `kernel_block` serves) and multiplied by table codes in integer
    arithmetic (csrc/qdot.cpp's table_xlinear).

    Each group's levels are held as 14-bit codes t + 8192, t = round(level / unit) in [-8192, 8192] with the unit
    2^-13 of the power of two at or above the group's largest level: every weight within unit / 2 of its own value.
    """

    exact = False

    def __init__(self, quantized: QuantizedTensor, bias: torch.Tensor | None, activation: Format):
        super().__init__()
        fmt = quantized.format
        self.format, self.activation = fmt, activation
        self.out_features, self.in_features = n, k = quantized.shape
        self.group = k if fmt.granularity.kind == "channel" else fmt.granularity.size
        self.block = kernel_block(activation, k)
        codes = ungroup(quantized.codes, quantized.shape).to(torch.uint8)
        runs = codes.reshape(n, -1, 2, RUN // 2)  # byte j of a run: input j (low nibble), input j + 16 (high)
        self.register_buffer("codes", (runs[:, :, 0, :] | (runs[:, :, 1, :] << 4)).reshape(n, -1).contiguous())
        levels = quantized.params["table"].reshape(n, -1, 2**fmt.code_bits).double()
        top = levels.abs().amax(dim=-1, keepdim=True).clamp(min=2.0**-126)
        unit = torch.exp2(torch.ceil(torch.log2(top)) - 13)
        centered = ((levels / unit).round() + TABLE_CENTER).to(torch.int32)  # in [0, 16384]
        padded = torch.full((*centered.shape[:2], 16), TABLE_CENTER, dtype=torch.int32)  # unused codes: level 0
        padded[..., :centered.shape[-1]] = centered
        self.register_buffer("tables", torch.cat([padded >> 7, padded & 127], dim=-1).to(torch.uint8).contiguous())
        self.register_buffer("units", unit[..., 0].float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @staticmethod
    def supports(fmt: Format, shape: tuple[int, int], activation: Format | None) -> bool:
        from ..formats.lut import LearnedTableFormat

        if not isinstance(fmt, LearnedTableFormat) or fmt.code_bits > 4 or activation is None:
            return False
        group = shape[1] if fmt.granularity.kind == "channel" else fmt.granularity.size
        return (shape[1] % RUN == 0 and fmt.granularity.kind in ("channel", "group") and group % RUN == 0
                and kernel_block(activation, shape[1]) is not None)

    def weight_values(self) -> torch.Tensor:
        n, k, group = self.out_features, self.in_features, self.group
        table = self.tables[..., :16].int() * 128 + self.tables[..., 16:].int() - TABLE_CENTER  # [n, groups, 16]
        levels = table.float() * self.units[..., None]
        groups = levels.shape[1]
        codes = torch.zeros(n, groups * group, dtype=torch.int64)  # a partial last group padded with code 0
        codes[:, :k] = from_runs(self.codes, k)
        return levels.gather(2, codes.reshape(n, groups, group)).reshape(n, -1)[:, :k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()
        if flat.shape[0] <= KERNEL_ROWS:
            y = self.matvec()(flat)
        else:  # the row-wise kernel redoes each weight row's work per input row: slower than one dequantize here
            y = F.linear(fake_quantize(flat, self.activation), self.weight_values(), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def matvec(self):
        """This layer as a plain function of a contiguous float32 [rows <= KERNEL_ROWS, in] input (see
        IntLinear.matvec; more rows compute correctly, slowly)."""
        kernel, block, bits = native().table_xlinear, self.block, self.activation.bits_per_code
        fixed = getattr(self.activation, "value", None) or 0.0
        codes, tables, units, group, bias = self.codes, self.tables, self.units, self.group, self.bias
        product = lambda x: kernel(x, block, bits, fixed, codes, tables, units, group)  # noqa: E731
        return product if bias is None else lambda x: product(x).add_(bias)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, format={self.format}, "
                f"activation={activation_name(self.activation)}")


TABLE_CENTER = 8192  # a learned table's 14-bit codes are t + 8192


class VectorLinear(nn.Module):
    """y = x Wᵀ + b for a vector codebook (`vq`), computed from the codes: for a few input rows, each input
    vector's dot products with every codeword form a table, and each output sums the entries its codes pick,
    times its group's scale (csrc/vector.cpp); for many rows, the layer is dequantized once and multiplied.

    Codes are held one per byte (indices of up to 8 bits) or two bytes (up to 16), [out, stages * in / d]."""

    def __init__(self, quantized: QuantizedTensor, bias: torch.Tensor | None):
        super().__init__()
        fmt = quantized.format
        self.format = fmt
        self.out_features, self.in_features = n, k = quantized.shape
        self.group = k if fmt.granularity.kind == "channel" else fmt.granularity.size
        codes = fmt.flat_codes(quantized.codes, quantized.shape).to(torch.int32)
        # Indices above 8 bits as int16 holding the unsigned 16-bit value (the kernel reads them as uint16).
        codes = codes.to(torch.uint8) if fmt.code_bits <= 8 else torch.where(codes >= 2**15, codes - 2**16, codes).to(torch.int16)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("books", quantized.params["codebook"].float().contiguous())
        self.register_buffer("scale", quantized.params["scale"].reshape(n, -1).float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @staticmethod
    def supports(fmt: Format, shape: tuple[int, int]) -> bool:
        return fmt.vector_size > 1 and shape[1] % fmt.vector_size == 0

    def weight_values(self) -> torch.Tensor:
        n, stages = self.out_features, self.books.shape[0]
        codes = self.codes.long() & (2**16 - 1)  # int16 back to the unsigned index
        staged = codes.reshape(n, stages, -1)
        vectors = sum(self.books[s][staged[:, s]] for s in range(stages))  # [n, in / d, d]
        scale = self.scale.repeat_interleave(self.group, dim=1)[:, :self.in_features]
        return vectors.reshape(n, -1) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()
        y = self.matvec()(flat) if flat.shape[0] <= KERNEL_ROWS else F.linear(flat, self.weight_values(), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def matvec(self):
        """This layer as a plain function of a contiguous float32 [rows, in] input (see IntLinear.matvec)."""
        kernel, codes, books, scale, group, bias = (native().vector_linear, self.codes, self.books, self.scale,
                                                   self.group, self.bias)
        product = lambda x: kernel(x, codes, books, scale, group)  # noqa: E731
        return product if bias is None else lambda x: product(x).add_(bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, format={self.format}"


class TrellisLinear(nn.Module):
    """y = x Wᵀ + b for a trellis code (`trellis`): the input is rotated as the weights were
    (`formats.trellis.rotate`), then for a few rows each output walks its row's bit stream, one table lookup per
    step (csrc/trellis.cpp); for many rows the rotated weights are decoded once and multiplied.

    Each row's symbols are held as the packed bit stream they form (`packing`'s layout), padded by 4 bytes so the
    kernel reads every state with one 4-byte load: K / D bits a weight in memory, as stored."""

    def __init__(self, quantized: QuantizedTensor, bias: torch.Tensor | None):
        super().__init__()
        fmt = quantized.format
        self.format = fmt
        self.out_features, self.in_features = n, k = quantized.shape
        symbols = fmt.flat_codes(quantized.codes, quantized.shape)
        width = packed_size(symbols.shape[1], fmt.step_bits) + 4
        streams = torch.zeros(n, width, dtype=torch.uint8)
        for row in range(n):
            packed = pack(symbols[row], fmt.step_bits)
            streams[row, :len(packed)] = packed
        self.register_buffer("streams", streams)
        self.register_buffer("scale", quantized.params["scale"].reshape(n).float().contiguous())
        self.register_buffer("table", fmt.table.clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @staticmethod
    def supports(fmt: Format, shape: tuple[int, int]) -> bool:
        return isinstance(fmt, TrellisFormat) and shape[1] % fmt.dim == 0

    def rotated_weight(self) -> torch.Tensor:
        return native().trellis_dequantize(self.streams, self.scale, self.table, self.format.step_bits,
                                           self.format.stream_offset, self.in_features)

    def weight_values(self) -> torch.Tensor:
        return unrotate(self.rotated_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = rotate(x.reshape(-1, self.in_features).float()).contiguous()
        y = self.matvec()(flat) if flat.shape[0] <= KERNEL_ROWS else F.linear(flat, self.rotated_weight(), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def matvec(self):
        """This layer as a plain function of a contiguous float32 [rows, in] input already rotated."""
        kernel, streams, scale, table, bias = native().trellis_linear, self.streams, self.scale, self.table, self.bias
        bits, offset = self.format.step_bits, self.format.stream_offset
        product = lambda x: kernel(x, streams, scale, table, bits, offset)  # noqa: E731
        return product if bias is None else lambda x: product(x).add_(bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, format={self.format}"


PANEL = 16  # weight rows per panel of the integer-dot kernels


def from_runs(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Unsigned 4-bit codes [rows, k] back from the float kernels' runs (byte j of a run: codes j and j + 16)."""
    runs = packed.reshape(packed.shape[0], -1, 1, RUN // 2)
    return torch.cat([runs & 0x0F, runs >> 4], dim=2).reshape(packed.shape[0], k)


NARROW_CODE = 128  # the largest unsigned code vpmaddubsw multiplies exactly (128 * -128 * 2 = -2^15)
WIDE_CODE = 2**14  # a wide table's codes hi * 128 + lo, hi at most 128 and lo below 128


def code_table(fmt: Format) -> tuple[torch.Tensor, float, bool] | None:
    """For a format of up to 4-bit codes whose values are table[code] * scale: the table as integers (int32 [16]),
    their unit, and whether integers * unit are exactly the values. None for any other format.

    Where every value is an integer multiple of the smallest nonzero one (FP4 E2M1's 0, 0.5, ..., 6 of 0.5),
    the table is exact. Other tables (NF4's, log grids) are rounded to multiples of 2^-13 of their largest
    magnitude: every weight then lies within 2^-14 of its scale of the format's own value.
    """
    from ..formats.lut import TableFormat
    from ..formats.minifloat import MinifloatFormat
    from ..formats.mx import MXFormat

    if fmt.code_bits > 4:
        return None
    if isinstance(fmt, (MinifloatFormat, MXFormat)):
        count = 2**fmt.code_bits
        values = fmt.element.decode(torch.arange(count, dtype=torch.uint8)).double()
    elif isinstance(fmt, TableFormat):
        values = fmt.levels.double()
    else:
        return None
    values = torch.cat([values, values[:1].expand(16 - len(values))])  # codes past the format's: never stored
    if not torch.isfinite(values).all() or not values.abs().max() > 0:
        return None
    unit = float(values.abs()[values != 0].min())
    integers = values / unit
    if torch.equal(integers, integers.round()) and float(integers.max() - integers.min()) <= WIDE_CODE:
        return integers.to(torch.int32), unit, True
    unit = 2.0 ** (math.ceil(math.log2(float(values.abs().max()))) - 13)
    return (values / unit).round().to(torch.int32), unit, False


def to_panels(codes: torch.Tensor, nibbles: bool) -> torch.Tensor:
    """Unsigned codes [out, in] in csrc/qdot.cpp's panel layout: [panels, runs * steps * 64] bytes."""
    n, k = codes.shape
    panels = -(-n // PANEL)
    padded = torch.zeros(panels * PANEL, k, dtype=torch.uint8)
    padded[:n] = codes
    # [panel, lane, run, step, 4] -> [panel, run, step, lane, 4]: one step is 16 rows x 4 consecutive inputs
    steps = padded.reshape(panels, PANEL, k // RUN, RUN // 4, 4).permute(0, 2, 3, 1, 4)
    if nibbles:  # step j's low nibbles: inputs 4j..4j+3; high nibbles: 4j+16..4j+19
        steps = steps[:, :, :4] | (steps[:, :, 4:] << 4)
    return steps.contiguous().reshape(panels, -1)


def from_panels(packed: torch.Tensor, n: int, k: int, nibbles: bool) -> torch.Tensor:
    """The unsigned codes [n, k] back from `to_panels`."""
    panels = packed.shape[0]
    steps = packed.reshape(panels, k // RUN, RUN // 4 // (2 if nibbles else 1), PANEL, 4)
    if nibbles:
        steps = torch.cat([steps & 0x0F, steps >> 4], dim=2)
    return steps.permute(0, 3, 1, 2, 4).reshape(panels * PANEL, k)[:n]


def panel_params(values: torch.Tensor) -> torch.Tensor:
    """Per-group values [out, groups] as [panels, groups, 16] (rows past the last padded with zeros)."""
    n, groups = values.shape
    padded = torch.zeros(-(-n // PANEL) * PANEL, groups)
    padded[:n] = values
    return padded.reshape(-1, PANEL, groups).transpose(1, 2).contiguous()


def rows_from_panels(values: torch.Tensor, n: int) -> torch.Tensor:
    return values.transpose(1, 2).reshape(-1, values.shape[1])[:n]


def stack_rows(parts: list[nn.Module], stacked: nn.Module, names: tuple[str, ...], panels: bool = False) -> None:
    """Give `stacked` each named tensor of `parts` concatenated along rows, then point the parts at row views of it.

    A bias some parts lack is stacked as zeros for them; parameters stay parameters, buffers buffers. The parts
    keep computing what they did, and nothing is stored twice. With `panels`, the tensors' first dimension is
    panels of PANEL rows (IntLinear.stack checks that the parts fill them).
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
            size = value.shape[0] if panels else part.out_features
            rows = tensor[start:start + size]
            if value is not None:
                setattr(part, name, nn.Parameter(rows, requires_grad=False) if parameter else rows)
            start += size


def quantized_linear(quantized: QuantizedTensor, bias: torch.Tensor | None = None,
                     activation: Format | None = None) -> nn.Module:
    """The runtime module for one quantized matrix (inputs rounded to `activation` if given): the integer
    kernels where they apply and are built."""
    if native() is not None and IntLinear.supports(quantized.format, quantized.shape, activation):
        return IntLinear(quantized, bias, activation)
    if native() is not None and TableLinear.supports(quantized.format, quantized.shape, activation):
        return TableLinear(quantized, bias, activation)
    if native() is not None and TrellisLinear.supports(quantized.format, quantized.shape):
        return with_activation(TrellisLinear(quantized, bias), activation)
    if native() is not None and VectorLinear.supports(quantized.format, quantized.shape):
        return with_activation(VectorLinear(quantized, bias), activation)
    return with_activation(DequantLinear(quantized, bias), activation)


def with_activation(module: nn.Module, activation: Format | None) -> nn.Module:
    """`module` (a float or runtime Linear) with its inputs rounded to `activation`, returned; None leaves it.

    An IntLinear the integer kernels serve computes from int8 codes; any other module gets a forward
    pre-hook that fake-quantizes its input. Either way `module.activation` names the format.
    """
    if activation is None:
        return module
    if getattr(activation, "value", 0) is None:
        raise ValueError(f"{activation} needs its scale measured first: quantize with calibration text")
    if not isinstance(module, (nn.Linear, IntLinear, TableLinear, VectorLinear, TrellisLinear, DequantLinear)):
        raise TypeError(f"only linear layers take quantized inputs, not {type(module).__name__}")
    if getattr(module, "activation", None) is not None:
        raise ValueError(f"{type(module).__name__} already quantizes its inputs to {module.activation}")
    if isinstance(module, IntLinear) and IntLinear.supports(module.format, (module.out_features, module.in_features),
                                                            activation):
        module._set_activation(activation)
        return module
    module.activation = activation
    module.register_forward_pre_hook(lambda _, args: (fake_quantize(args[0], activation), *args[1:]))
    return module


def input_activation(module: nn.Module) -> Format | None:
    """The format `module`'s inputs are rounded to (`with_activation`), or None."""
    return getattr(module, "activation", None)

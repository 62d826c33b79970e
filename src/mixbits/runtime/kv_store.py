"""One block's keys or values as the decoder's quantized cache holds them.

Tokens arrive in the form the option stores (pre-rotary keys for pre-rope
options) and wait as float16; whenever whole token groups are old enough
(`KVQuant.quantized_tokens`) they are encoded (`KVQuant.encode`, the same
arithmetic as the fake-quantized forward) and move to the quantized part:
each (head, token) row of head_dim codes bit-packed, beside the parameters in
their stored dtypes (fp16 scales, 8-bit zero points, ...).

A decode step asks for `scores` (queries times every cached key) and `mix`
(attention weights times every cached value). For integer formats with plain
float scales (and minimums) the native kernels (runtime/csrc/kv_cache.cpp)
compute both from the packed codes and the stored parameters, per token or
per channel, widening codes to floats in registers, and encode per-token
stores' new tokens straight into the packed rows; other formats (minifloats,
coded scales), pre-rope keys, and machines without the kernels dequantize the
whole store on every step and multiply in PyTorch.
"""

from __future__ import annotations

import math

import torch

from ..errors import FormatError
from ..formats.integer import IntFormat
from ..formats.scales import CastScale, ScaleCodec
from ..kvcache.options import RESIDUAL_DTYPE, KVQuant, head_rotation
from ..packing import pack, packed_size, unpack
from .kernels import native


_NONE = torch.empty(0)  # the kernels' "no such parameter"


class KVStore:
    def __init__(self, option: KVQuant, kv_heads: int, head_dim: int, capacity: int):
        option.check_head_dim(head_dim)
        fmt = option.format
        if head_dim * fmt.code_bits % 8:
            raise FormatError(f"{option}: a head of {head_dim} codes of {fmt.code_bits} bits is not whole bytes; use "
                              "2, 4 or 8 bits")
        self.option, self.kv_heads, self.head_dim = option, kv_heads, head_dim
        self.width = fmt.code_bits
        group = fmt.granularity.size if fmt.granularity.kind == "group" else head_dim
        self.group = group if option.axis == "token" else 1  # numbers per parameter along head_dim
        plain = isinstance(fmt, IntFormat) and all(isinstance(codec, CastScale)
                                                   for codec in (fmt.scale, fmt.offset_codec) if codec is not None)
        eligible = plain and not option.pre_rope and (option.axis == "channel" or group % 8 == 0)
        self.kernel = native() if eligible and head_dim % 8 == 0 else None
        # per-token stores with float16/32 scales and zero points (or none) encode new tokens natively
        self.native_encoding = (self.kernel is not None and option.axis == "token" and fmt.min is None
                                and fmt.granularity.kind != "tensor"
                                and fmt.scale.dtype in (torch.float16, torch.float32))
        self.row_bytes = packed_size(head_dim, self.width)
        self.codes = torch.zeros(kv_heads, capacity, self.row_bytes, dtype=torch.uint8)
        group = option.token_group
        rows = capacity if option.axis == "token" else math.ceil(capacity / group)
        cols = fmt.granularity.groups_per_row(head_dim) if option.axis == "token" else head_dim
        self.codecs = fmt.stored_params()
        self.params = {name: torch.zeros(kv_heads, rows, cols, dtype=self._dtype(codec))
                       for name, codec in self.codecs.items()}
        self.quantized = 0  # tokens in the quantized part (the oldest)
        self.waiting = torch.empty(kv_heads, 0, head_dim, dtype=RESIDUAL_DTYPE)

    @staticmethod
    def _dtype(codec: ScaleCodec | int) -> torch.dtype:
        if isinstance(codec, int):
            return torch.uint8
        stored = codec.store(torch.ones(1, 1, 1))
        if set(stored) != {"value"}:
            raise FormatError(f"a {codec.name} scale is stored with a second level; KV caches take plain scales")
        return stored["value"].dtype

    def __len__(self) -> int:
        return self.quantized + self.waiting.shape[1]

    def _param_rows(self, tokens: int) -> int:
        return tokens if self.option.axis == "token" else tokens // self.option.token_group

    def append(self, stored: torch.Tensor) -> None:
        """Add tokens [kv_heads, n, head_dim] (the option's stored form) and quantize whatever became old enough."""
        self.waiting = (torch.cat([self.waiting, stored.to(RESIDUAL_DTYPE)], dim=1) if self.waiting.shape[1]
                        else stored.to(RESIDUAL_DTYPE, copy=True))  # never a view of the caller's tensor
        ready = self.option.quantized_tokens(len(self))
        take = ready - self.quantized
        if take <= 0:
            return
        if self.native_encoding:  # the same arithmetic as KVQuant.encode, straight into the packed rows
            tokens = self.option.to_basis(self.waiting[:, :take]).contiguous()
            self.kernel.kv_encode(tokens, self.codes, self.params["scale"], self.params.get("zero", _NONE),
                                  self.quantized, self.width, self.group, self.option.format.symmetric)
        else:
            codes, params = self.option.encode(self.waiting[:, :take].float())
            self.codes[:, self.quantized:ready] = pack(codes, self.width).reshape(self.kv_heads, take, self.row_bytes)
            first, last = self._param_rows(self.quantized), self._param_rows(ready)
            for name, codec in self.codecs.items():
                value = params[name]
                self.params[name][:, first:last] = (value.to(torch.uint8) if isinstance(codec, int)
                                                    else codec.store(value)["value"])
        self.quantized = ready
        self.waiting = self.waiting[:, take:].clone()  # let the quantized tokens' float16 go

    def _codes(self) -> torch.Tensor:
        """The quantized tokens' codes, [kv_heads, quantized, head_dim] uint8."""
        count = self.kv_heads * self.quantized * self.head_dim
        return unpack(self.codes[:, :self.quantized], self.width, count).reshape(self.kv_heads, self.quantized,
                                                                                 self.head_dim)

    def _params(self) -> dict[str, torch.Tensor]:
        """The quantized tokens' parameters as float32, as `KVQuant.decode` takes them."""
        rows = self._param_rows(self.quantized)
        params = {}
        for name, codec in self.codecs.items():
            value = self.params[name][:, :rows]
            params[name] = value.float() if isinstance(codec, int) else codec.restore({"value": value},
                                                                                      value.shape).reshape(value.shape)
        return params

    def _offsets(self) -> torch.Tensor:
        """What the kernels add to code * scale, as stored: zero points, minimums, or nothing (symmetric)."""
        return self.params.get("zero", self.params.get("min", _NONE))

    def read(self) -> torch.Tensor:
        """Every cached token's stored-form values as attention reads them: float32 [kv_heads, tokens, head_dim]."""
        waiting = self.waiting.float()
        if self.quantized == 0:
            return waiting
        return torch.cat([self.option.decode(self._codes(), self._params()), waiting], dim=1)

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """query [kv_heads, g, head_dim] (float32, each head's group of queries) times every cached key:
        [kv_heads, g, tokens]. Pre-rope stores hold keys before the rotary embedding: `read` and rotate them."""
        if self.option.pre_rope:
            raise ValueError("a pre-rope store's keys need the rotary embedding first: read() them and rotate")
        if self.kernel is None or self.quantized == 0:
            return query @ self.read().transpose(1, 2)
        quantized = self.kernel.kv_scores(self.option.to_basis(query).contiguous(), self.codes, self.params["scale"], self._offsets(),
                                          self.quantized, self.width, self.option.token_group, self.group)
        if not self.waiting.shape[1]:
            return quantized
        return torch.cat([quantized, query @ self.waiting.float().transpose(1, 2)], dim=2)

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        """weights [kv_heads, g, tokens] times every cached value: [kv_heads, g, head_dim]."""
        if self.kernel is None or self.quantized == 0:
            return weights @ self.read()
        out = self.kernel.kv_mix(weights[..., :self.quantized].contiguous(), self.codes, self.params["scale"],
                                 self._offsets(), self.quantized, self.width, self.option.token_group, self.group,
                                 self.head_dim)
        if self.option.rotate:
            out = out @ head_rotation(self.head_dim).T
        if not self.waiting.shape[1]:
            return out
        return out + weights[..., self.quantized:] @ self.waiting.float()

    @property
    def nbytes(self) -> int:
        """Bytes allocated for this store (codes and parameters for its capacity, and the waiting tokens)."""
        return (self.codes.numel() + sum(p.numel() * p.element_size() for p in self.params.values())
                + self.waiting.numel() * self.waiting.element_size())

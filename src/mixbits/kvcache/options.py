"""How keys or values are quantized as the decoder writes them into its cache.

An option is a scalar format of the registry followed by the cache's own
fields, separated by '/':

    int4:g64:asym                  per token: each head's vector, groups of 64 along head_dim
    int2:g32:asym:min=fp16/channel per channel: each of head_dim channels, groups of 32 consecutive tokens (KIVI)
    .../pre-rope                   keys stored before the rotary embedding, rotated on every read (KVQuant)
    .../rotate                     each head's vector rotated by a Hadamard matrix before rounding (RotateKV)
    .../residual128                the newest 128 tokens kept in 16 bits (KIVI)

When is a token read from the quantized store? Per token, once it is
`residual` tokens old (at once with no residual: the decoder writes each
token, then attends from the cache). Per channel, a group of tokens is
quantized together, so its tokens wait in 16 bits until the whole group is
`residual` tokens old. Tokens not (yet) quantized are stored as float16.
`stored_mask` says which (query, key) pairs read quantized values; the
fake-quant attention (`kvcache.fake`) and the packed cache follow it alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import FormatError
from ..formats import parse_format
from ..formats.base import Format
from ..transforms.hadamard import rotation_matrix

RESIDUAL_DTYPE = torch.float16  # tokens waiting for quantization (a residual window, a partial channel group)
RESIDUAL_BITS = 16
AXES = ("token", "channel")
EXAMPLE = "int4:g64:asym, int2:g32:asym/channel/residual128"


@dataclass(frozen=True)
class KVQuant:
    format: Format
    axis: str = "token"  # "token": a scale per token (groups along head_dim); "channel": per channel over tokens
    pre_rope: bool = False  # keys stored before the rotary embedding (values have none)
    rotate: bool = False  # a Hadamard rotation of each head's vector before rounding
    residual: int = 0  # newest tokens kept in 16 bits

    def __post_init__(self):
        fmt = self.format
        if fmt.vector_size != 1 or not fmt.rounds_each_weight or fmt.shared_across_rows or fmt.has_second_level:
            raise FormatError(f"{fmt} cannot quantize a cache as it grows (codebooks, trellis walks and second-level "
                              "scales are fitted over a whole matrix); use a scalar format such as int4:g64:asym")
        if any(fmt.param_shape(name, 1, 256)[2] != 1 for name in fmt.stored_params()):
            raise FormatError(f"{fmt} stores a table per group; KV caches take formats with a scale (and zero point "
                              "or minimum) per group, such as int4:g32:asym or fp8_e4m3:ch")
        if fmt.granularity.kind == "tensor":
            raise FormatError(f"{fmt}: a cache grows token by token, so it takes no per-tensor scale; use ch or gN")
        if self.axis not in AXES:
            raise FormatError(f"KV axis must be token or channel, got {self.axis!r}")
        if self.axis == "channel" and fmt.granularity.kind != "group":
            raise FormatError(f"{fmt}/channel: per-channel scales cover groups of tokens; write gN, e.g. int2:g32:asym/channel")
        if self.residual < 0:
            raise FormatError(f"the residual window is a number of tokens >= 0, got {self.residual}")

    @staticmethod
    def parse(text: "str | KVQuant") -> "KVQuant":
        """Parse `FORMAT[/channel][/pre-rope][/rotate][/residualN]`; options pass through."""
        if isinstance(text, KVQuant):
            return text
        head, *fields = [part.strip() for part in text.strip().split("/")]
        axis, pre_rope, rotate, residual = "token", False, False, 0
        for name in fields:
            match = re.fullmatch(r"residual(\d+)", name)
            if name in AXES:
                axis = name
            elif name == "pre-rope":
                pre_rope = True
            elif name == "rotate":
                rotate = True
            elif match:
                residual = int(match.group(1))
            else:
                raise FormatError(f"unknown KV-cache field {name!r} in {text!r}; fields are token, channel, pre-rope, "
                                  f"rotate, residualN (e.g. {EXAMPLE})")
        return KVQuant(parse_format(head), axis, pre_rope, rotate, residual)

    def __str__(self) -> str:
        fields = [str(self.format)] + (["channel"] if self.axis == "channel" else [])
        fields += (["pre-rope"] if self.pre_rope else []) + (["rotate"] if self.rotate else [])
        return "/".join(fields + ([f"residual{self.residual}"] if self.residual else []))

    @property
    def token_group(self) -> int:
        """Tokens quantized together: a channel group's size, or 1 per token."""
        return self.format.granularity.size if self.axis == "channel" else 1

    def group_bits(self, kv_heads: int, head_dim: int) -> int:
        """Stored bits of one token group's keys (or values) in one layer (`token_group` tokens): codes at their
        width, scales in their codec's, integer zero points a byte each (as the packed store keeps them)."""
        fmt = self.format
        per_value = sum(8 if isinstance(codec, int) else codec.bits(1, 1) for codec in fmt.stored_params().values())
        params = fmt.granularity.groups_per_row(head_dim) if self.axis == "token" else head_dim
        return kv_heads * (self.token_group * head_dim * fmt.code_bits + params * per_value)

    def bits_per_token(self, kv_heads: int, head_dim: int) -> float:
        """Stored bits per token of one layer's keys (or values), codes and parameters, once quantized."""
        return self.group_bits(kv_heads, head_dim) / self.token_group

    def quantized_tokens(self, context: int) -> int:
        """How many of `context` tokens sit in the quantized store (the rest in 16 bits)."""
        ready = max(0, context - self.residual)
        return ready // self.token_group * self.token_group

    def cache_bits(self, context: int, kv_heads: int, head_dim: int) -> int:
        """Bits of one layer's keys (or values) at `context` tokens: quantized tokens and those waiting in 16 bits."""
        quantized = self.quantized_tokens(context)
        waiting = (context - quantized) * kv_heads * head_dim * RESIDUAL_BITS
        return quantized // self.token_group * self.group_bits(kv_heads, head_dim) + waiting

    def stored_mask(self, queries: int, keys: int) -> torch.Tensor:
        """[queries, keys] bool: whether the query at position keys - queries + i reads key j quantized."""
        query = torch.arange(keys - queries, keys).unsqueeze(1)
        group = self.token_group
        last = (torch.arange(keys) // group + 1) * group - 1  # each key's group's last token
        return last.unsqueeze(0) <= query - self.residual

    def check_head_dim(self, head_dim: int) -> None:
        """Refuse groups along head_dim that do not tile it (a cache row is one head's vector)."""
        size = self.format.granularity.size
        if self.axis == "token" and self.format.granularity.kind == "group" and head_dim % size:
            raise FormatError(f"{self}: groups of {size} do not tile heads of {head_dim}; use a divisor of "
                              f"{head_dim} or ch")

    def to_basis(self, stored: torch.Tensor) -> torch.Tensor:
        """`stored` [..., head_dim] as float32 in the basis codes are rounded in (turned by the head rotation)."""
        x = stored.float()
        return x @ head_rotation(x.shape[-1]) if self.rotate else x

    def encode(self, stored: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Codes [heads, tokens, head_dim] (unsigned: signed codes offset by 2^(bits-1)) and float32 parameters of
        `stored` [heads, tokens, head_dim] (whole token groups), as the cache keeps them: per token
        [heads, tokens, groups along head_dim]; per channel [heads, tokens / group, head_dim]."""
        fmt = self.format
        heads, tokens, head_dim = stored.shape
        x = self.to_basis(stored)
        if self.axis == "token":
            rows = x.reshape(heads * tokens, head_dim)
        else:
            group = self.token_group
            rows = x.reshape(heads, tokens // group, group, head_dim).transpose(-1, -2).reshape(-1, group)
        quantized = fmt.quantize(rows)
        codes = quantized.format.flat_codes(quantized.codes, quantized.shape)
        codes = codes.to(torch.int16) + (2 ** (fmt.code_bits - 1) if fmt.signed_codes else 0)
        if self.axis == "token":
            codes = codes.reshape(heads, tokens, head_dim)
            params = {name: value.reshape(heads, tokens, -1).float() for name, value in quantized.params.items()}
        else:
            codes = codes.reshape(heads, tokens // group, head_dim, group).transpose(-1, -2).reshape(heads, tokens, head_dim)
            params = {name: value.reshape(heads, tokens // group, head_dim).float()
                      for name, value in quantized.params.items()}
        return codes.to(torch.uint8), params

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float32 [heads, tokens, head_dim] values of `encode`'s codes and parameters."""
        fmt = self.format
        heads, tokens, head_dim = codes.shape
        values = codes.to(torch.int16) - (2 ** (fmt.code_bits - 1) if fmt.signed_codes else 0)
        if self.axis == "token":
            groups = fmt.granularity.groups_per_row(head_dim)
            grouped = values.reshape(heads * tokens, groups, head_dim // groups)
            flat = {name: value.reshape(heads * tokens, groups, 1) for name, value in params.items()}
            out = fmt.decode(grouped, flat).reshape(heads, tokens, head_dim)
        else:
            group = self.token_group
            grouped = values.reshape(heads, tokens // group, group, head_dim).transpose(-1, -2).reshape(-1, 1, group)
            flat = {name: value.reshape(-1, 1, 1) for name, value in params.items()}
            out = fmt.decode(grouped, flat).reshape(heads, tokens // group, head_dim, group).transpose(-1, -2)
            out = out.reshape(heads, tokens, head_dim)
        return out @ head_rotation(head_dim).T if self.rotate else out

    def round_trip(self, stored: torch.Tensor) -> torch.Tensor:
        """Quantized then dequantized `stored` [..., tokens, head_dim] (the form the cache stores: pre-rotary keys for
        pre-rope options), float32; tokens of a partial channel group are left as they are (they wait in 16 bits)."""
        shape = stored.shape
        x = stored.reshape(-1, *shape[-2:])
        full = x.shape[-2] // self.token_group * self.token_group
        if full == 0:  # no group complete yet
            return stored.float()
        done = self.decode(*self.encode(x[:, :full]))
        return torch.cat([done, x[:, full:].float()], dim=-2).reshape(shape)


@lru_cache(maxsize=8)
def head_rotation(head_dim: int) -> torch.Tensor:
    """The orthogonal [head_dim, head_dim] matrix R a rotating option applies as x @ R (Hadamard where one exists)."""
    return rotation_matrix(head_dim)[0]


def waiting_round_trip(stored: torch.Tensor) -> torch.Tensor:
    """`stored` as the 16-bit residual holds it, float32."""
    return stored.to(RESIDUAL_DTYPE).float()


def parse_kv(text: "str | KVQuant | None") -> KVQuant | None:
    """A KV option from its string; None or 'none' for a cache kept in the model's precision."""
    if text is None or isinstance(text, KVQuant):
        return text
    return None if text.strip() in ("", "none") else KVQuant.parse(text)


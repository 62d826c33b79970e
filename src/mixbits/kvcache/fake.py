"""The model's own forward with its keys and values read as a quantized cache would hold them.

`fake_quantized_kv(model, layers)` registers an attention function with
transformers' attention interface and switches the model to it: every
attention module (found from the adapter's layout: the module holding the
block's q/k/v Linears) then reads its keys and values through the block's
`KVQuant` options. Each (query, key) pair reads the quantized value or the
16-bit waiting one exactly as `KVQuant.stored_mask` says, so one parallel
forward over a window scores every position as a decoder writing the cache
token by token would. Positions come from transformers' `position_ids`
(0 onward without them): a sliding window's cache that dropped its oldest
tokens still rounds pre-rope keys at their true positions; per-channel groups
need the whole cache and are refused there.

Keys and values arrive in the cache as float16 (the dtype tokens wait in) and
are quantized from there. Pre-rope keys are recovered from the rotated keys
transformers hands over by the inverse rotation (the adapter's rotary
tables), rounded, and rotated again.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from ..errors import TransformError
from ..models.registry import adapter_for
from .options import KVQuant, waiting_round_trip

ATTENTION = "mixbits_kv"
QUERY_CHUNK = 1024  # queries whose scores (softcapped attention) or masks are held at once


@dataclass
class LayerKV:
    keys: KVQuant | None
    values: KVQuant | None
    rope: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # stop -> (cos, sin) [stop, rotary dims], positions 0..


class RopeTables:
    """One block's rotary tables for positions 0..stop-1, computed once for the longest stop asked so far (doubling,
    so a growing generation recomputes them a logarithmic number of times)."""

    def __init__(self, rope, index: int):
        self.rope, self.index = rope, index
        self.cos = self.sin = torch.empty(0, 0)

    def __call__(self, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        if stop > self.cos.shape[0]:
            length = max(stop, 2 * self.cos.shape[0])
            cos, sin = self.rope(torch.empty(1), torch.arange(length).unsqueeze(0), self.index)
            self.cos, self.sin = cos[0], sin[0]
        return self.cos[:stop], self.sin[:stop]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x [..., tokens, head_dim] rotated by the rotary tables (the first cos.shape[-1] dims of each head), or back.

    Tables may carry a magnitude a (YaRN's and LongRoPE's attention scaling: cos = a cos t, sin = a sin t); the
    inverse divides it out twice, so that rotating back what was rotated gives the input."""
    width = cos.shape[-1]
    part = x[..., :width]
    turned = part * cos + rotate_half(part) * (-sin if inverse else sin)
    if inverse:
        turned = turned / (cos * cos + sin * sin)
    return torch.cat([turned, x[..., width:]], dim=-1) if width < x.shape[-1] else turned


def read_views(option: KVQuant, cached: torch.Tensor, layer: LayerKV, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized, waiting) views of cached keys or values [b, heads, tokens, head_dim] as attention reads them; the
    first cached token is at position `first`."""
    if option.pre_rope:
        cos, sin = (table[first:] for table in layer.rope(first + cached.shape[-2]))
        waiting = waiting_round_trip(apply_rope(cached.float(), cos.float(), sin.float(), inverse=True))
        quantized = option.round_trip(waiting)
        quantized, waiting = (apply_rope(x, cos.float(), sin.float()) for x in (quantized, waiting))
    else:
        waiting = waiting_round_trip(cached)
        quantized = option.round_trip(waiting)
    return quantized.to(cached.dtype), waiting.to(cached.dtype)


def _repeat(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def kv_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, softcap=None,
                 **kwargs):
    """Eager attention reading keys and values through `module.mixbits_kv` (a `LayerKV`; none: as they are), with
    transformers' attention interface's arguments; the output [b, queries, heads, head_dim] and no weights."""
    layer: LayerKV | None = getattr(module, "mixbits_kv", None)
    groups = query.shape[1] // key.shape[1]
    queries, tokens = query.shape[-2], key.shape[-2]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    positions = kwargs.get("position_ids")
    first = 0 if positions is None else int(positions.reshape(-1)[-1]) + 1 - tokens  # the first cached key's position

    def split(option: KVQuant | None, cached: torch.Tensor):
        """(quantized view, waiting view or None if never read, mask) of one cache."""
        if layer is None or option is None:
            return cached, None, None
        if first and option.axis == "channel":
            raise TransformError(f"{option}: per-channel groups need the whole cache, and this layer's sliding window "
                                 "dropped its oldest tokens; use a per-token option")
        quantized, waiting = read_views(option, cached, layer, first)
        if option.token_group == 1 and option.residual == 0:  # every visible key is read quantized
            return quantized, None, None
        return quantized, waiting, option.stored_mask(queries, tokens).to(query.device)

    k_read, k_waiting, k_mask = split(layer.keys if layer else None, key)
    v_read, v_waiting, v_mask = split(layer.values if layer else None, value)
    causal = torch.arange(tokens) <= torch.arange(tokens - queries, tokens).unsqueeze(1)
    if softcap is None:
        base = causal.to(query.device) if attention_mask is None else attention_mask[..., :tokens]
        return _fused(query, (k_read, k_waiting, k_mask), (v_read, v_waiting, v_mask), base, scaling), None
    k_read, v_read, k_waiting, v_waiting = (None if x is None else _repeat(x, groups)
                                            for x in (k_read, v_read, k_waiting, v_waiting))
    out = torch.empty(*query.shape[:2], queries, value.shape[-1], dtype=query.dtype, device=query.device)
    for rows in torch.arange(queries).split(QUERY_CHUNK):  # [heads, chunk, tokens] scores at a time, not all
        q = query[:, :, rows]
        weights = torch.matmul(q, k_read.transpose(2, 3)) * scaling
        if k_mask is not None:
            weights = torch.where(k_mask[rows], weights, torch.matmul(q, k_waiting.transpose(2, 3)) * scaling)
        if softcap is not None:
            weights = torch.tanh(weights / softcap) * softcap
        if attention_mask is None:  # an sdpa-style caller may leave causality implied
            weights = weights.masked_fill(~causal[rows].to(weights.device), float("-inf"))
        elif attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask[..., rows, :tokens], float("-inf"))
        else:
            weights = weights + attention_mask[..., rows, :tokens]
        weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        if v_mask is None:
            out[:, :, rows] = torch.matmul(weights, v_read)
        else:
            out[:, :, rows] = (torch.matmul(weights * v_mask[rows], v_read)
                               + torch.matmul(weights * ~v_mask[rows], v_waiting))
    return out.transpose(1, 2).contiguous(), None


def _fused(query, keys, values, base, scaling) -> torch.Tensor:
    """kv_attention's output through PyTorch's fused attention: where a cache's (query, key) pairs read two views
    (quantized and waiting), each view becomes a copy of the keys, and the mask lets each query see, per key, only
    the copy holding the pair of views it reads. `base`: the allowed pairs (bool) or additive mask."""
    def views(read, waiting, mask):
        return [(read, None)] if mask is None else [(read, mask), (waiting, ~mask)]

    copies = [(k, v, km if vm is None else vm if km is None else km & vm)
              for k, km in views(*keys) for v, vm in views(*values)]
    if len(copies) == 1:
        out = F.scaled_dot_product_attention(query, keys[0], values[0], attn_mask=base, scale=scaling,
                                             enable_gqa=True)
        return out.transpose(1, 2).contiguous()
    key, value = (torch.cat([copy[i] for copy in copies], dim=-2) for i in (0, 1))
    out = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)
    for rows in torch.arange(query.shape[-2]).split(QUERY_CHUNK):  # masks of [chunk, copies x tokens] at a time
        seen = torch.cat([mask[rows].to(query.device) for _, _, mask in copies], dim=-1)
        allowed = base[..., rows, :].repeat(*[1] * (base.dim() - 1), len(copies))
        if allowed.dtype == torch.bool:
            mask = allowed & seen
        else:
            mask = allowed.masked_fill(~seen, float("-inf"))
        out[..., rows, :] = F.scaled_dot_product_attention(query[..., rows, :], key, value, attn_mask=mask,
                                                           scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous()


AttentionInterface.register(ATTENTION, kv_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, eager_mask)


def attention_modules(model: nn.Module, purpose: str) -> tuple[list[nn.Module], dict]:
    """Each block's attention module (the one holding its q/k/v Linears) and the layout's attention facts."""
    layout = adapter_for(model).layout(model, purpose)
    owners = {id(child): module for module in model.modules() for child in module.children()}
    modules = [owners[id(block.attention_in[0])] for block in layout.blocks]
    return modules, layout.facts


@contextmanager
def fake_quantized_kv(model: nn.Module, layers: list[tuple[KVQuant | None, KVQuant | None]]):
    """Within the block, `model`'s forward reads block i's keys and values as `layers[i]` = (keys, values) options
    (None: in the model's precision) would store them."""
    modules, facts = attention_modules(model, "KV-cache quantization")
    if len(layers) != len(modules):
        raise TransformError(f"the KV plan has {len(layers)} blocks; this model has {len(modules)}: make the KV plan "
                             "for this model with `mixbits kv-plan`")
    if not hasattr(model, "set_attn_implementation"):
        raise TransformError("KV-cache quantization needs a transformers model (its attention interface)")
    for keys, values in layers:
        if values is not None and values.pre_rope:
            raise TransformError(f"{values}: values have no rotary embedding; give pre-rope to keys only")
        for option in (keys, values):
            if option is not None:
                option.check_head_dim(facts["head_dim"])
    previous = model.config._attn_implementation
    try:
        for index, (module, (keys, values)) in enumerate(zip(modules, layers)):
            module.mixbits_kv = LayerKV(keys, values, RopeTables(facts["rope"], index))
        model.set_attn_implementation(ATTENTION)
        yield model
    finally:
        model.set_attn_implementation(previous)
        for module in modules:
            if hasattr(module, "mixbits_kv"):
                del module.mixbits_kv


def uniform_kv(model: nn.Module, keys: KVQuant | None, values: KVQuant | None) -> list[tuple]:
    """The same (keys, values) options for every block of `model`."""
    return [(keys, values)] * len(attention_modules(model, "KV-cache quantization")[0])

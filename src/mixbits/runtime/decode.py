"""Batch-1 generation for decoders whose adapter gives a layout: a lean decode step over the model's own weights.

A decode step of the transformers model runs several hundred small operators
plus Python dispatch (cache objects, mask building, attention interfaces); on
this project's 2-core machine that costs several times more than reading a
4-bit model's weights. `Decoder` runs the same arithmetic in about ten calls
per block:

- q/k/v and gate/up read the same input, so each set is one matrix product
  over its stacked weight rows. The model's own layers then hold views into the
  stacked weights: same values, no second copy.
- For one token (up to KERNEL_ROWS), integer layers call the compiled kernel
  directly rather than through nn.Module (`matvec`).
- RMSNorm, RoPE with the KV-cache append and attention, and SiLU(gate) * up
  are one native call each (csrc/decode_ops.cpp) for float32 models; other
  dtypes and per-head q/k norms use PyTorch operators.
- Keys and values go into tensors allocated once for the whole generation;
  rotary cos/sin come from the model's own rotary module for every position up
  front, so any rope type it implements is reproduced.
- A quantized KV cache (`kv=`: per block, options of `mixbits.kvcache`) keeps
  each block's keys or values packed in a `KVStore`; a prompt attends through
  the fake-quantized attention (what a decoder writing it token by token reads),
  decode steps from the stores, with the same logits.

Logits equal the transformers forward up to float summation order, and greedy
tokens equal `model.generate`'s (tests/test_decode.py). Models it cannot run
(no adapter layout, sliding windows shorter than the generation) raise
DecodeUnsupported; `generate` (and `mixbits generate`) then falls back to `model.generate`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import skip_init

from ..errors import MixbitsError, TransformError
from ..kvcache.fake import LayerKV, apply_rope, fake_quantized_kv, kv_attention
from ..models.registry import adapter_for
from .kernels import native
from .kv_store import KVStore
from .linear import KERNEL_ROWS, IntLinear, TableLinear, VectorLinear, input_activation, stack_rows, with_activation


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


class DecodeUnsupported(MixbitsError):
    """The fast decoder cannot run this model; use `model.generate`."""


@dataclass
class Block:
    input_norm: torch.Tensor
    qkv: nn.Module
    q_norm: nn.Module | None  # per-head RMSNorm on queries and keys (qwen3)
    k_norm: nn.Module | None
    o: nn.Module
    post_norm: torch.Tensor
    gate_up: nn.Module | None  # None in a mixture of experts
    down: nn.Module | None  # as the block calls it: an online input rotation (RotatedInput) included
    post_attention_norm: torch.Tensor | None = None  # norm weights on attention's and the MLP's outputs (Gemma)
    post_mlp_norm: torch.Tensor | None = None
    mixture: nn.Module | None = None  # a mixture-of-experts MLP, called as the model calls it
    # the same four products as plain functions, for decode steps (see `matvec`)
    qkv_step: object = field(init=False, repr=False)
    o_step: object = field(init=False, repr=False)
    gate_up_step: object = field(init=False, repr=False)
    down_step: object = field(init=False, repr=False)

    def __post_init__(self):
        self.qkv_step, self.o_step = matvec(self.qkv), matvec(self.o)
        self.gate_up_step, self.down_step = (None, None) if self.mixture else (matvec(self.gate_up), matvec(self.down))


class Stacked(nn.Module):
    """Modules reading the same input, computed one after another and concatenated (when they cannot be stacked)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def stack_linears(parts: list[nn.Module]) -> nn.Module:
    """One module whose output is the parts' outputs side by side; their weights stacked where the kinds and the
    input quantization agree (so a shared input is quantized once)."""
    activation = input_activation(parts[0])
    if any(input_activation(part) != activation for part in parts):
        return Stacked(parts)
    if all(type(part) is nn.Linear for part in parts) and len({p.weight.dtype for p in parts}) == 1:
        first = parts[0]
        stacked = skip_init(nn.Linear, first.in_features, sum(p.out_features for p in parts),
                            bias=any(p.bias is not None for p in parts), dtype=first.weight.dtype)
        stack_rows(parts, stacked, ("weight", "bias"))
        return with_activation(stacked, activation)
    if all(isinstance(part, IntLinear) for part in parts):
        stacked = IntLinear.stack(parts)
        if stacked is not None:
            return stacked
    return Stacked(parts)


def matvec(module: nn.Module):
    """`module` as a plain function of a contiguous float32 [rows <= KERNEL_ROWS, in] input (for decode steps)."""
    if isinstance(module, (IntLinear, TableLinear)) or (isinstance(module, VectorLinear)
                                                         and input_activation(module) is None):
        return module.matvec()
    if type(module) is nn.Linear and input_activation(module) is None:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module


class Decoder:
    """Greedy or sampled generation, one sequence at a time, for a causal LM with an adapter layout."""

    def __init__(self, model: nn.Module):
        try:
            parts = adapter_for(model).layout(model, "the fast decoder")
        except TransformError as error:
            raise DecodeUnsupported(str(error)) from None
        facts = parts.facts
        if facts.get("rotary_fraction", 1.0) != 1.0:
            raise DecodeUnsupported(f"the fast decoder rotates whole heads; this model rotates "
                                    f"{facts['rotary_fraction']:g} of each; use model.generate")
        self.head_dim, self.heads, self.kv_heads = facts["head_dim"], facts["heads"], facts["kv_heads"]
        self.scaling, self.sliding_window, self.eps = facts["scaling"], facts["sliding_window"], facts["eps"]
        self.rope = facts["rope"]
        self.attention_softcap, self.logit_softcap = facts.get("attention_softcap"), facts.get("logit_softcap")
        self.embed = parts.embed
        self.final_norm = parts.final_norm.weight + parts.norm_offset  # what RMSNorm scales by
        self.head = parts.head
        self.head_step = matvec(parts.head)
        self.blocks = []
        for layer in parts.blocks:
            def weight(norm, offset=layer.norm_offset):
                return None if norm is None else norm.weight + offset
            mixture = layer.mlp if layer.experts_out is not None else None
            self.blocks.append(Block(
                weight(layer.input_norm), stack_linears(layer.attention_in), layer.q_norm, layer.k_norm, layer.o,
                weight(layer.post_norm), None if mixture else stack_linears(layer.mlp_in),
                None if mixture else layer.down_call, weight(layer.post_attention_norm), weight(layer.post_mlp_norm),
                mixture))
        self.act = ACTIVATIONS.get(parts.activation)
        if self.act is None:
            raise DecodeUnsupported(f"the fast decoder has no {parts.activation!r} activation; use model.generate")
        self.dtype = parts.final_norm.weight.dtype  # the embedding may hold codes, not a float weight
        # The native block steps take float32, SiLU MLPs, LLaMA's blocks (no per-head q/k norms, no norms on
        # block outputs) and no softcapping; otherwise PyTorch operators.
        native_kernels = native()
        plain = (self.dtype == torch.float32 and parts.activation == "silu" and not parts.sandwich
                 and all(b.q_norm is None for b in self.blocks) and self.attention_softcap is None)
        self.native = native_kernels if plain else None

    def _rope(self, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each block's rotary cos and sin for positions 0..length-1 ([length, head_dim] each).

        Blocks with equal tables share one pair (all of a LLaMA's; Gemma 3 has two), so a step slices each once.
        """
        positions = torch.arange(length).unsqueeze(0)
        tables: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.rope_of_block = []
        for index in range(len(self.blocks)):
            cos, sin = self.rope(torch.empty(1, dtype=self.dtype), positions, index)
            same = next((i for i, (c, s) in enumerate(tables) if torch.equal(c, cos[0]) and torch.equal(s, sin[0])), None)
            if same is None:
                tables.append((cos[0], sin[0]))
                same = len(tables) - 1
            self.rope_of_block.append(same)
        return [c for c, _ in tables], [s for _, s in tables]

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
                 sample: bool = False, temperature: float = 0.7, top_p: float = 0.9,
                 generator: torch.Generator | None = None, kv: list[tuple] | None = None) -> torch.Tensor:
        """The prompt `ids` (1-D, or [1, n]) followed by up to `max_new_tokens` new tokens, as a 1-D tensor.

        `kv`: per block, the (keys, values) options of a quantized cache (`kvcache.KVQuant`, None: the model's dtype).
        """
        ids = ids.reshape(-1)
        stops = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
        sequence = self.start(ids.numel() + max_new_tokens, kv)
        out = [ids]
        logits = sequence.feed(ids)
        for step in range(max_new_tokens):
            token = self._pick(logits, sample, temperature, top_p, generator)
            out.append(token)
            if int(token) in stops or step == max_new_tokens - 1:
                break
            logits = sequence.feed(token)
        return torch.cat(out)

    def start(self, total: int, kv: list[tuple] | None = None) -> "Sequence":
        """An empty sequence with caches for `total` tokens: `kv` gives per block the (keys, values) options of a
        quantized cache (None: the model's dtype)."""
        if self.sliding_window is not None and total > self.sliding_window:
            raise DecodeUnsupported(f"generation of {total} tokens exceeds the sliding window ({self.sliding_window})")
        layers = kv if kv is not None else [(None, None)] * len(self.blocks)
        if len(layers) != len(self.blocks):
            raise MixbitsError(f"the KV plan has {len(layers)} blocks; this model has {len(self.blocks)}: make the KV "
                               "plan for this model with `mixbits kv-plan`")
        shape = (self.kv_heads, total, self.head_dim)
        caches = [tuple(torch.empty(shape, dtype=self.dtype) if option is None
                        else KVStore(option, self.kv_heads, self.head_dim, total) for option in pair) for pair in layers]
        return Sequence(self, caches, *self._rope(total))

    def logits(self, ids: torch.Tensor, kv: list[tuple] | None = None, steps: bool = False) -> torch.Tensor:
        """Next-token logits after every position of `ids` (1-D): the model's forward, for tests and checks; with
        `steps`, one decode step per token (the cache as generation fills it)."""
        ids = ids.reshape(-1)
        sequence = self.start(ids.numel(), kv)
        with torch.inference_mode():
            if steps:
                return torch.stack([sequence.feed(ids[i:i + 1]) for i in range(ids.numel())])
            return sequence.feed(ids, every_position=True)

    @staticmethod
    def _pick(logits, sample, temperature, top_p, generator) -> torch.Tensor:
        if not sample:
            return logits.argmax().reshape(1)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the smallest set whose mass reaches top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return order[choice]

    def _norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm as the transformers model computes it: normalised in float32, scaled in the model's dtype."""
        if self.native is not None:
            return self.native.rms_norm(h, weight, self.eps)
        if h.dtype == torch.float32:
            return F.rms_norm(h, (h.shape[-1],), weight, self.eps)
        return F.rms_norm(h.float(), (h.shape[-1],), None, self.eps).to(h.dtype) * weight

    def _forward(self, ids, start, cos_all, sin_all, caches, every_position=False) -> torch.Tensor:
        n = ids.numel()
        end = start + n
        cos, sin = [c[start:end] for c in cos_all], [s[start:end] for s in sin_all]
        # decode: call the kernels directly; prefill: the modules (integer kernels for quantized inputs, else
        # dequantize-and-multiply)
        step = n <= KERNEL_ROWS
        # The native attention step serves a few new tokens; a prompt's queries attend as matrix products
        # (PyTorch's scaled_dot_product_attention), several times faster for hundreds of tokens.
        native_attention = self.native is not None and step
        mask = None
        if n > 1 and not native_attention:  # causal over the cached prefix and the new tokens
            mask = torch.arange(end).unsqueeze(0) <= torch.arange(start, end).unsqueeze(1)
        h = self.embed(ids)
        for index, block in enumerate(self.blocks):
            qkv = (block.qkv_step if step else block.qkv)(self._norm(h, block.input_norm))
            table = self.rope_of_block[index]
            keys, values = caches[index]
            if isinstance(keys, KVStore) or isinstance(values, KVStore):
                attended = self._attend_stored(block, qkv, cos_all[table], sin_all[table], keys, values, start)
            elif native_attention:
                attended = self.native.attend(qkv, cos[table], sin[table], keys, values, start,
                                              self.heads, self.kv_heads, self.scaling)
            else:
                attended = self._attend(block, qkv, cos[table], sin[table], keys, values, start, mask)
            out = (block.o_step if step else block.o)(attended)
            h = h + (out if block.post_attention_norm is None else self._norm(out, block.post_attention_norm))
            if block.mixture is not None:  # routing and experts as the model computes them (experts from codes)
                out = block.mixture(self._norm(h, block.post_norm).unsqueeze(0))[0]
            else:
                gate_up = (block.gate_up_step if step else block.gate_up)(self._norm(h, block.post_norm))
                if self.native is not None:
                    activated = self.native.silu_mul(gate_up)
                else:
                    gate, up = gate_up.chunk(2, dim=-1)
                    activated = self.act(gate) * up
                out = (block.down_step if step else block.down)(activated)
            h = h + (out if block.post_mlp_norm is None else self._norm(out, block.post_mlp_norm))
        if not every_position:
            h = h[-1:]
        h = self._norm(h, self.final_norm)
        logits = (self.head_step if h.shape[0] <= KERNEL_ROWS else self.head)(h)
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits if every_position else logits[0]

    def _split(self, block, qkv):
        """Queries and keys per head before the rotary embedding ([n, heads + kv_heads, head_dim], q/k norms
        applied) and values [kv_heads, n, head_dim]."""
        n = qkv.shape[0]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        qk = qkv[:, :q_size + kv_size].reshape(n, self.heads + self.kv_heads, self.head_dim)
        if block.q_norm is not None:
            qk = torch.cat([block.q_norm(qk[:, :self.heads]), block.k_norm(qk[:, self.heads:])], dim=1)
        return qk, qkv[:, q_size + kv_size:].reshape(n, self.kv_heads, self.head_dim).transpose(0, 1)

    def _attend(self, block, qkv, cos, sin, keys, values, start, mask) -> torch.Tensor:
        """Rotary embedding, cache append and attention with PyTorch operators (any dtype, q/k norms)."""
        end = start + qkv.shape[0]
        qk, value = self._split(block, qkv)
        qk = apply_rope(qk.transpose(0, 1), cos, sin).transpose(0, 1)
        keys[:, start:end] = qk[:, self.heads:].transpose(0, 1)
        values[:, start:end] = value
        return self._scores_and_mix(qk[:, :self.heads].transpose(0, 1), keys[:, :end], values[:, :end], mask)

    def _attend_stored(self, block, qkv, cos_all, sin_all, keys, values, start) -> torch.Tensor:
        """Attention with quantized keys or values (`KVStore`s; the other may be a plain tensor). A prompt's queries
        read what a decoder writing it token by token would (the fake-quantized forward's attention); a decode
        step reads the stores as they stand."""
        n, end = qkv.shape[0], start + qkv.shape[0]
        qk, value = self._split(block, qkv)
        pre = qk.transpose(0, 1)  # [heads + kv_heads, n, head_dim] before the rotary embedding
        turned = apply_rope(pre, cos_all[start:end], sin_all[start:end])
        query, key = turned[:self.heads], turned[self.heads:]
        options = []
        for cache, post, before in ((keys, key, pre[self.heads:]), (values, value, value)):
            if isinstance(cache, KVStore):
                cache.append(before if cache.option.pre_rope else post)
                options.append(cache.option)
            else:
                cache[:, start:end] = post
                options.append(None)
        if n > 1:  # a prompt from position 0 (`Sequence.feed` checks)
            layer = LayerKV(*options, rope=lambda tokens: (cos_all[:tokens], sin_all[:tokens]))
            out, _ = kv_attention(SimpleNamespace(mixbits_kv=layer), query.unsqueeze(0), key.unsqueeze(0),
                                  value.unsqueeze(0), None, scaling=self.scaling, softcap=self.attention_softcap)
            return out[0].reshape(n, self.heads * self.head_dim)
        grouped = query.float().reshape(self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        if not isinstance(keys, KVStore):
            scores = grouped @ keys[:, :end].float().transpose(1, 2)
        elif keys.option.pre_rope:
            scores = grouped @ apply_rope(keys.read(), cos_all[:end].float(), sin_all[:end].float()).transpose(1, 2)
        else:
            scores = keys.scores(grouped)
        scores = scores * self.scaling
        if self.attention_softcap is not None:
            scores = torch.tanh(scores / self.attention_softcap) * self.attention_softcap
        weights = torch.softmax(scores, dim=-1)
        out = values.mix(weights) if isinstance(values, KVStore) else weights @ values[:, :end].float()
        return out.reshape(1, self.heads * self.head_dim).to(self.dtype)

    def _scores_and_mix(self, query, key, value, mask) -> torch.Tensor:
        """Attention of queries [heads, n, head_dim] over keys and values [kv_heads, tokens, head_dim]: [n, heads *
        head_dim]."""
        n, q_size = query.shape[1], self.heads * self.head_dim
        if self.attention_softcap is None:
            attended = F.scaled_dot_product_attention(query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0),
                                                      attn_mask=mask, scale=self.scaling, enable_gqa=True)[0]
        else:  # scores capped by tanh before the softmax (Gemma 2): written out, SDPA has no softcap
            group = self.heads // self.kv_heads
            key, value = key.repeat_interleave(group, 0), value.repeat_interleave(group, 0)
            scores = query @ key.transpose(1, 2) * self.scaling
            scores = torch.tanh(scores / self.attention_softcap) * self.attention_softcap
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            attended = torch.softmax(scores.float(), dim=-1).to(value.dtype) @ value
        return attended.transpose(0, 1).reshape(n, q_size)


@dataclass
class Sequence:
    """One sequence being decoded: its caches, rotary tables and position."""

    decoder: Decoder
    caches: list[tuple]  # per block (keys, values): a [kv_heads, total, head_dim] tensor or a KVStore
    cos: list[torch.Tensor]
    sin: list[torch.Tensor]
    position: int = 0

    @torch.inference_mode()
    def feed(self, ids: torch.Tensor, every_position: bool = False) -> torch.Tensor:
        """Run tokens `ids` (1-D) from the current position: the next-token logits after the last (or after
        every one), and the position advanced past them."""
        capacity = self.cos[0].shape[0]
        if self.position + ids.numel() > capacity:
            raise MixbitsError(f"the sequence holds {capacity} tokens; start one with room for "
                               f"{self.position + ids.numel()}")
        stored = any(isinstance(c, KVStore) for pair in self.caches for c in pair)
        if stored and ids.numel() > 1 and self.position > 0:
            raise DecodeUnsupported("a quantized KV cache takes a prompt from position 0, then one token a step")
        logits = self.decoder._forward(ids, self.position, self.cos, self.sin, self.caches, every_position)
        self.position += ids.numel()
        return logits

    @property
    def cache_bytes(self) -> int:
        """Bytes the caches hold for the sequence's capacity (quantized stores: codes, parameters, waiting tokens)."""
        return sum(c.nbytes if isinstance(c, KVStore) else c.numel() * c.element_size()
                   for pair in self.caches for c in pair)


def generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
             sample: bool = False, transformers: bool = False, note=None,
             kv: list[tuple] | None = None) -> tuple[torch.Tensor, str]:
    """The new tokens after the prompt `ids` ([1, n] or 1-D) and which runtime made them: mixbits' decoder where it
    runs the model, else transformers' `model.generate` (`note(reason)` is told why; `transformers=True` forces it).
    Sampling is temperature 0.7, top-p 0.9 in both. `kv`: per block, the (keys, values) options of a quantized cache
    (transformers' generate then reads its cache through the fake-quantized attention, same values, unpacked)."""
    ids = ids.reshape(1, -1)
    if not transformers:
        try:
            output = Decoder(model).generate(ids, max_new_tokens, eos_token_id=eos_token_id, sample=sample, kv=kv)
            return output[ids.shape[1]:], "mixbits decoder"
        except DecodeUnsupported as why:
            if note is not None:
                note(f"{why}; decoding with transformers' generate")
    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.9} if sample else {"do_sample": False}
    pad = eos_token_id if isinstance(eos_token_id, int) or eos_token_id is None else eos_token_id[0]
    with torch.no_grad(), (nullcontext() if kv is None else fake_quantized_kv(model, kv)):
        output = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos_token_id,
                                **sampling)
    return output[0, ids.shape[1]:], "transformers generate"

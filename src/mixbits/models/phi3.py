"""The adapter for Phi-3 decoders: LLaMA's layout with fused projections.

q/k/v are one Linear (qkv_proj, rows [q; k; v]) and gate/up one
(gate_up_proj, rows [gate; up]), so each is quantized as one layer and the
fast decoder runs it as the stacked product it already is. With no separate
v or up projection, AWQ scales only through the norms. The fast decoder
refuses partial rotary (partial_rotary_factor < 1). GGUF: llama.cpp's phi3
keeps both fused (attn_qkv; ffn_up holding [gate; up]), rotates halves,
and attends over the whole context (export warns where a sliding window
would differ); LongRoPE scaling is not written.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..errors import ExportError, TransformError
from .adapter import (
    Adapter,
    BlockLayout,
    Layout,
    attention_facts,
    check_full_attention,
    gguf_base_metadata,
    gguf_rope,
    rope_settings,
    shared_rope,
)


class Phi3Adapter(Adapter):
    name = "phi3"
    model_types = ("phi3",)
    bumped = ("qkv_proj", "down_proj")  # llama.cpp bumps attn_qkv and ffn_down for phi3

    def layout(self, model: nn.Module, purpose: str) -> Layout:
        config = model.config
        try:
            inner = model.model
            blocks = [BlockLayout(layer.input_layernorm, [layer.self_attn.qkv_proj], layer.self_attn.o_proj,
                                  layer.post_attention_layernorm, [layer.mlp.gate_up_proj],
                                  getattr(layer.mlp.down_proj, "linear", layer.mlp.down_proj), layer.mlp)
                      for layer in inner.layers]
            attention = inner.layers[0].self_attn
            fraction = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
            facts = attention_facts(config, attention, inner.norm.variance_epsilon, shared_rope(inner.rotary_emb),
                                    rotary_fraction=fraction)
        except AttributeError:
            raise TransformError(f"{purpose} found this phi3 model's modules not laid out as Phi-3's; run without it") from None
        return Layout(inner.embed_tokens, blocks, inner.norm, model.lm_head, config.hidden_act, facts)


    gguf_architectures: ClassVar[dict[str, str]] = {"phi3": "phi3"}

    def gguf_check(self, config, layers: set[str]) -> None:
        if rope_settings(config).get("rope_type", "default") != "default":
            raise ExportError("GGUF export does not write Phi-3's LongRoPE scaling yet; use the mixbits checkpoint")
        check_full_attention(config, getattr(config, "sliding_window", None))

    def gguf_metadata(self, writer, config) -> None:
        gguf_base_metadata(writer, config)
        params = rope_settings(config)
        fraction = params.get("partial_rotary_factor", None) or getattr(config, "partial_rotary_factor", None) or 1.0
        writer.add_rope_dimension_count(int(fraction * config.hidden_size) // config.num_attention_heads)
        writer.add_rope_scaling_orig_ctx_len(int(getattr(config, "original_max_position_embeddings", None)
                                                 or config.max_position_embeddings))
        writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
        gguf_rope(writer, params)


PHI3 = Phi3Adapter()

"""The adapter for LLaMA-style decoders: llama, mistral, qwen2, qwen3.

One layout: RMSNorm before attention (q/k/v, then o) and before the MLP
(gate/up, then down), SiLU-gated MLP, rotary attention with grouped-query
heads; qwen3 adds per-head RMSNorms on queries and keys, mistral and qwen2
may set a sliding window (llama.cpp attends over the whole context: export
warns).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..errors import TransformError
from .adapter import (
    Adapter,
    BlockLayout,
    Layout,
    attention_facts,
    check_full_attention,
    gguf_base_metadata,
    gguf_rope,
    head_dim,
    rope_settings,
    shared_rope,
)


class LlamaAdapter(Adapter):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    # llama.cpp runs mistral as llama (rotary pairs interleaved: q/k rows permuted), qwen2 and qwen3 as their own
    # architectures (rotary halves, as Hugging Face: rows as they are; qwen2's q/k/v biases, qwen3's q/k norms).
    gguf_architectures: ClassVar[dict[str, str]] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
    bumped = ("v_proj", "down_proj")  # llama.cpp's mixes give attn_v and ffn_down more bits

    def layout(self, model: nn.Module, purpose: str) -> Layout:
        unsupported = TransformError(f"{purpose} found this {model.config.model_type} model's modules not laid out as "
                                     "LLaMA's (model.layers[i].self_attn.q_proj, ..., RMSNorms); run without it")
        try:
            inner = model.model
            blocks = [
                BlockLayout(
                    layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                    layer.self_attn.o_proj, layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj],
                    getattr(layer.mlp.down_proj, "linear", layer.mlp.down_proj), layer.mlp,
                    v=layer.self_attn.v_proj, up=layer.mlp.up_proj,
                    q_norm=getattr(layer.self_attn, "q_norm", None), k_norm=getattr(layer.self_attn, "k_norm", None),
                )
                for layer in inner.layers
            ]
            attention = inner.layers[0].self_attn
            config = model.config
            facts = attention_facts(config, attention, inner.norm.variance_epsilon, shared_rope(inner.rotary_emb))
            layout = Layout(inner.embed_tokens, blocks, inner.norm, model.lm_head,
                            getattr(config, "hidden_act", "silu"), facts)
        except AttributeError:
            raise unsupported from None
        norms = [layout.final_norm] + [n for b in blocks for n in (b.input_norm, b.post_norm)]
        if not all(type(n).__name__.endswith("RMSNorm") for n in norms):
            raise unsupported
        return layout

    def gguf_check(self, config, layers: set[str]) -> None:
        window = getattr(config, "sliding_window", None)
        check_full_attention(config, window if getattr(config, "use_sliding_window", True) else None)

    def gguf_metadata(self, writer, config) -> None:
        gguf_base_metadata(writer, config)
        writer.add_rope_dimension_count(head_dim(config))
        gguf_rope(writer, rope_settings(config))


LLAMA = LlamaAdapter()

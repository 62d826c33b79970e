"""The adapter for LLaMA-style decoders: llama, mistral, qwen2, qwen3.

One layout: RMSNorm before attention (q/k/v, then o) and before the MLP
(gate/up, then down), SiLU-gated MLP, rotary attention with grouped-query
heads; qwen3 adds per-head RMSNorms on queries and keys, mistral and qwen2
may set a sliding window. GGUF export writes llama only (llama.cpp's llama
architecture, q/k rows in its rotary order).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import TransformError
from .adapter import Adapter, BlockLayout, Layout, attention_facts, shared_rope


class LlamaAdapter(Adapter):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    gguf_model_types = ("llama",)
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

    def row_permutation(self, layer: str, rows: int, config) -> torch.Tensor | None:
        """GGML's row order of q_proj/k_proj (rotary pairs interleaved per head), as llama.cpp's converter permutes."""
        if layer.endswith("self_attn.q_proj"):
            heads = config.num_attention_heads
        elif layer.endswith("self_attn.k_proj"):
            heads = config.num_key_value_heads
        else:
            return None
        index = torch.arange(rows)
        return index.reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)

    def gguf_metadata(self, writer, config) -> None:
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
        writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)


LLAMA = LlamaAdapter()

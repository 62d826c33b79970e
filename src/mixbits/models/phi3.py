"""The adapter for Phi-3 decoders: LLaMA's layout with fused projections.

q/k/v are one Linear (qkv_proj, rows [q; k; v]) and gate/up one
(gate_up_proj, rows [gate; up]), so each is quantized as one layer and the
fast decoder runs it as the stacked product it already is. With no separate
v or up projection, AWQ scales only through the norms. The fast decoder
refuses partial rotary (partial_rotary_factor < 1). No GGUF writer yet.
"""

from __future__ import annotations

from torch import nn

from ..errors import TransformError
from .adapter import Adapter, BlockLayout, Layout, attention_facts, shared_rope


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


PHI3 = Phi3Adapter()

"""The adapter for Gemma decoders: gemma, gemma2, gemma3 (text).

What differs from LLaMA's layout:

- RMSNorms scale by (1 + w), not w (`norm_offset` 1): AWQ folds its 1/s
  into (1 + w), rotation folds (1 + w) into the Linears and leaves w = 0;
- the embedding is multiplied by sqrt(hidden) in its own forward (the
  embedding module keeps doing so, also when it holds codes);
- gemma2 and gemma3 add a norm after attention and after the MLP, before
  each residual add ("sandwich" norms): a rotation of the residual stream
  cannot pass through them, so it is refused;
- gemma2 caps attention scores and the final logits with tanh softcapping;
  gemma3 has per-head q/k norms and its own rotary base for sliding-window
  layers (each block's rotary comes from the model's rotary module with the
  block's layer type);
- sliding-window and global attention layers alternate (`layer_types`).

GELU (tanh) MLPs, gated like LLaMA's.

GGUF: llama.cpp's gemma, gemma2 and gemma3 store every norm as 1 + w, scale
the embedding themselves, rotate halves (rows as they are), and take the
attention scale from the head width; gemma and gemma2 always compute the
output with token_embd (an untied head cannot be exported).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import ExportError, TransformError
from .adapter import (
    Adapter,
    BlockLayout,
    Layout,
    attention_facts,
    gguf_base_metadata,
    gguf_rope,
    head_dim,
    rope_settings,
    shared_rope,
)


class GemmaAdapter(Adapter):
    name = "gemma"
    model_types = ("gemma", "gemma2", "gemma3_text")
    bumped = ("v_proj", "down_proj")

    def layout(self, model: nn.Module, purpose: str) -> Layout:
        config = model.config
        sandwich = config.model_type != "gemma"
        try:
            inner = model.model
            blocks = []
            for layer in inner.layers:
                attention, mlp = layer.self_attn, layer.mlp
                blocks.append(BlockLayout(
                    layer.input_layernorm, [attention.q_proj, attention.k_proj, attention.v_proj], attention.o_proj,
                    layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm,
                    [mlp.gate_proj, mlp.up_proj], getattr(mlp.down_proj, "linear", mlp.down_proj), mlp,
                    v=attention.v_proj, up=mlp.up_proj, q_norm=getattr(attention, "q_norm", None),
                    k_norm=getattr(attention, "k_norm", None), norm_offset=1.0,
                    post_attention_norm=layer.post_attention_layernorm if sandwich else None,
                    post_mlp_norm=layer.post_feedforward_layernorm if sandwich else None))
            first = inner.layers[0].self_attn
            types = getattr(config, "layer_types", None)
            rotary = inner.rotary_emb
            if config.model_type == "gemma3_text":
                def rope(x, positions, index, rotary=rotary, types=types):
                    return rotary(x, positions, types[index])
            else:
                rope = shared_rope(rotary)
            window = getattr(config, "sliding_window", None)
            facts = attention_facts(config, first, inner.norm.eps, rope,
                                    sliding_window=window if types is None or "sliding_attention" in types else None,
                                    attention_softcap=getattr(config, "attn_logit_softcapping", None),
                                    logit_softcap=getattr(config, "final_logit_softcapping", None))
        except AttributeError:
            raise TransformError(f"{purpose} found this {config.model_type} model's modules not laid out as Gemma's; "
                                 "run without it") from None
        activation = getattr(config, "hidden_activation", None) or config.hidden_act
        return Layout(inner.embed_tokens, blocks, inner.norm, model.lm_head, activation, facts, norm_offset=1.0,
                      sandwich=sandwich)

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        logits = model.lm_head(model.model.norm(hidden))
        cap = getattr(model.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    gguf_architectures: ClassVar[dict[str, str]] = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}

    def gguf_check(self, config, layers: set[str]) -> None:
        if config.model_type != "gemma3_text" and "lm_head" in layers:
            raise ExportError(f"llama.cpp's {config.model_type} computes the output with the input embedding; this "
                              "checkpoint has its own head (quantized with --head?): quantize without it to export")
        # llama.cpp scales queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for the one layer count each
        # of gemma2 (46) and gemma3 (62) has at 27B; Hugging Face by query_pre_attn_scalar^-1/2.
        special = {"gemma2": 46, "gemma3_text": 62}.get(config.model_type)
        width = config.hidden_size / config.num_attention_heads if config.num_hidden_layers == special else head_dim(config)
        scalar = getattr(config, "query_pre_attn_scalar", None) or head_dim(config)
        if abs(scalar - width) > 1e-6 * width:
            raise ExportError(f"llama.cpp scales this {config.model_type} model's queries by 1/sqrt({width:g}), the "
                              f"model by 1/sqrt(query_pre_attn_scalar = {scalar:g}); it cannot be exported")
        if config.model_type == "gemma2" and not (config.attn_logit_softcapping and config.final_logit_softcapping):
            raise ExportError("llama.cpp's gemma2 always caps attention scores and logits; this model does not, "
                              "so it cannot be exported")

    def gguf_metadata(self, writer, config) -> None:
        gguf_base_metadata(writer, config)
        kind = config.model_type
        if kind == "gemma3_text":
            gguf_rope(writer, rope_settings(config, "full_attention"), rope_settings(config, "sliding_attention"))
        else:
            gguf_rope(writer, rope_settings(config))
        if kind == "gemma2":
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if kind != "gemma" and getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        types = getattr(config, "layer_types", None)
        if kind != "gemma" and types is not None:
            writer.add_sliding_window(int(config.sliding_window))
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])

    def gguf_tensor(self, name: str, data: np.ndarray, ggml_type, config) -> np.ndarray:
        return data + 1 if ggml_type is None and name.endswith("norm.weight") else data


GEMMA = GemmaAdapter()

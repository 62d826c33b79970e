"""The parts of a LLaMA-style decoder that weight transforms rewrite.

Rotation and activation-aware scaling fold factors into neighbouring weights,
so they must know which operation feeds which Linear. LLaMA-style decoders
(llama, mistral, qwen2, qwen3: RMSNorm before attention and MLP, q/k/v/o and
gate/up/down projections) share one layout; other architectures get an error
naming what is supported rather than a silent skip.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import TransformError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class DecoderLayer:
    input_norm: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    post_norm: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear  # the Linear itself, also when wrapped by an input rotation
    mlp: nn.Module


@dataclass
class Decoder:
    embed: nn.Embedding
    layers: list[DecoderLayer]
    final_norm: nn.Module
    head: nn.Linear


def decoder_parts(model: nn.Module, purpose: str) -> Decoder:
    """The LLaMA-style parts of `model`, or a TransformError saying `purpose` needs one."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    unsupported = TransformError(
        f"{purpose} supports LLaMA-style decoders ({', '.join(SUPPORTED)}); this model is "
        f"{model_type or type(model).__name__}; quantize without it"
    )
    if model_type not in SUPPORTED:
        raise unsupported
    try:
        inner = model.model
        layers = [
            DecoderLayer(
                layer.input_layernorm, layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                layer.self_attn.o_proj, layer.post_attention_layernorm, layer.mlp.gate_proj, layer.mlp.up_proj,
                getattr(layer.mlp.down_proj, "linear", layer.mlp.down_proj), layer.mlp,
            )
            for layer in inner.layers
        ]
        decoder = Decoder(inner.embed_tokens, layers, inner.norm, model.lm_head)
    except AttributeError:
        raise unsupported from None
    norms = [decoder.final_norm] + [n for layer in layers for n in (layer.input_norm, layer.post_norm)]
    if not all(type(n).__name__.endswith("RMSNorm") for n in norms):
        raise unsupported
    return decoder

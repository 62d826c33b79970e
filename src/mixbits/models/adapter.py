"""Architecture adapters: what mixbits must know about a model family, in one module per family.

An adapter, found by the Hugging Face `model_type`s it serves (`registry.py`), declares

- `layout`: the decoder's parts that transforms and the fast decoder rewrite
  or run: the embedding, the final norm and head, and per block the norm
  before attention and the Linears it feeds (q/k/v, or one fused qkv), the
  attention output, the norm before the MLP and the Linears it feeds
  (gate/up, or one fused gate_up), down_proj, and what the decoder needs
  (per-head q/k norms, activation);
- `logits`: the output distribution from the last block's output (final
  norm, head, and whatever the family adds), for KL measurement;
- `bumped`: the layers llama.cpp-style mixes give one step more;
- `prepare`: turns weights a family stores otherwise (stacked MoE experts)
  into ordinary nn.Linears, in place, keeping the function;
- GGUF: the architecture, metadata and row order llama.cpp expects
  (`gguf_architecture` None: no export).

Blocks and their quantizable Linears are found structurally for every model
(`structure.py`), so a model whose family has no adapter still quantizes,
plans and evaluates through the generic adapter (`registry.py`); its `layout` raises one line
saying which feature needs an adapter. No module outside `models/` names an
architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import TransformError


@dataclass
class BlockLayout:
    input_norm: nn.Module
    attention_in: list[nn.Linear]  # Linears reading the normed stream before attention: q, k, v (or fused qkv)
    o: nn.Linear
    post_norm: nn.Module
    mlp_in: list[nn.Linear]  # gate, up (or fused gate_up)
    down: nn.Linear  # the Linear itself, also when wrapped by an input rotation
    mlp: nn.Module  # holds `down_attribute`; an online rotation replaces it there
    v: nn.Linear | None = None  # separate value projection (feeds o: AWQ folds a scale through it)
    up: nn.Linear | None = None  # separate up projection (feeds down)
    q_norm: nn.Module | None = None  # per-head norms on queries and keys (qwen3, gemma3)
    k_norm: nn.Module | None = None
    down_attribute: str = "down_proj"
    norm_offset: float = 0.0  # the norms scale by (norm_offset + weight): 1 for Gemma
    post_attention_norm: nn.Module | None = None  # norms on attention's and the MLP's outputs (Gemma 2 and 3)
    post_mlp_norm: nn.Module | None = None

    @property
    def down_call(self) -> nn.Module:
        """down_proj as the block calls it (an online rotation wrapper included)."""
        return getattr(self.mlp, self.down_attribute)


@dataclass
class Layout:
    embed: nn.Embedding
    blocks: list[BlockLayout]
    final_norm: nn.Module
    head: nn.Linear
    activation: str = "silu"
    # heads, kv_heads, head_dim, scaling, sliding_window, eps, rope (x, positions, block index) -> (cos, sin);
    # optional: rotary_fraction (of each head), attention_softcap, logit_softcap
    facts: dict = field(default_factory=dict)
    norm_offset: float = 0.0  # of the final norm
    sandwich: bool = False  # norms between attention / MLP outputs and the residual add: no rotation through them


def attention_facts(config, attention: nn.Module, eps: float, rope, **more) -> dict:
    """`Layout.facts` from the config and the first block's attention module; `more` adds or overrides."""
    return {"heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "head_dim": attention.head_dim, "scaling": attention.scaling,
            "sliding_window": getattr(config, "sliding_window", None), "eps": eps, "rope": rope, **more}


def shared_rope(rotary: nn.Module):
    """A `rope` for models whose blocks share one rotary module: (x, positions, block index) -> (cos, sin)."""
    return lambda x, positions, index: rotary(x, positions)


class Adapter:
    """What every model has; a family adapter overrides what its family adds (`layout` at least)."""

    name = "generic"
    model_types: tuple[str, ...] = ()
    gguf_model_types: tuple[str, ...] = ()  # those GGUF export writes (as llama.cpp's architecture of that name)
    bumped: tuple[str, ...] = ()

    def prepare(self, model: nn.Module) -> None:
        """Make the model's weights ordinary layers where the family stores them otherwise (in place, same
        function); idempotent. Called on loading and before quantizing."""

    def layout(self, model: nn.Module, purpose: str) -> Layout:
        raise NotImplementedError

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's output: the decoder's final `norm`, then the output head."""
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        norm = getattr(decoder, "norm", None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if norm is None or head is None:
            raise TransformError("this model has no final `norm` and output head where mixbits looks; measure "
                                 "damage by proxy (--damage proxy) or add an adapter for it")
        return head(norm(hidden))

    def final_norm(self, model: nn.Module) -> nn.Module:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        norm = getattr(decoder, "norm", None)
        if norm is None:
            raise TransformError("this model has no final `norm` where mixbits looks; quantize its head with rtn")
        return norm

    def gguf_architecture(self, config) -> str | None:
        """llama.cpp's architecture name for this model, or None if mixbits cannot export it."""
        return config.model_type if config.model_type in self.gguf_model_types else None

    def row_permutation(self, layer: str, rows: int, config) -> torch.Tensor | None:
        """GGUF's row order of a layer, if it differs from the model's."""
        return None

    def gguf_metadata(self, writer, config) -> None:
        raise NotImplementedError


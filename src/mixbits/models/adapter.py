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
- GGUF: llama.cpp's architecture for each model type, its metadata, and
  how tensors map to its layout (row order, norms stored otherwise,
  experts stacked, tensors llama.cpp computes from); `gguf_architecture`
  None: no export.

Blocks and their quantizable Linears are found structurally for every model
(`structure.py`), so a model whose family has no adapter still quantizes,
plans and evaluates through the generic adapter (`registry.py`); its `layout` raises one line
saying which feature needs an adapter. No module outside `models/` names an
architecture.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import ExportError, TransformError


@dataclass
class BlockLayout:
    input_norm: nn.Module
    attention_in: list[nn.Linear]  # Linears reading the normed stream before attention: q, k, v (or fused qkv)
    o: nn.Linear
    post_norm: nn.Module
    mlp_in: list[nn.Module]  # gate, up (or fused gate_up); in a mixture, the router and every expert's too
    down: nn.Linear | None  # the Linear itself, also when wrapped by an input rotation; None in a mixture
    mlp: nn.Module  # holds `down_attribute`; an online rotation replaces it there
    v: nn.Linear | None = None  # separate value projection (feeds o: AWQ folds a scale through it)
    up: nn.Linear | None = None  # separate up projection (feeds down)
    q_norm: nn.Module | None = None  # per-head norms on queries and keys (qwen3, gemma3)
    k_norm: nn.Module | None = None
    down_attribute: str = "down_proj"
    norm_offset: float = 0.0  # the norms scale by (norm_offset + weight): 1 for Gemma
    post_attention_norm: nn.Module | None = None  # norms on attention's and the MLP's outputs (Gemma 2 and 3)
    post_mlp_norm: nn.Module | None = None
    # A mixture of experts: (module, attribute) of every Linear writing the MLP's output (each expert's down, a shared
    # expert's), which the fast decoder runs by calling `mlp` itself.
    experts_out: list[tuple[nn.Module, str]] | None = None

    @property
    def down_call(self) -> nn.Module:
        """down_proj as the block calls it (an online rotation wrapper included)."""
        return getattr(self.mlp, self.down_attribute)

    @property
    def down_slots(self) -> list[tuple[nn.Module, str]]:
        """Where each Linear writing the MLP's output sits, as (module, attribute): an online rotation goes there."""
        return self.experts_out if self.experts_out is not None else [(self.mlp, self.down_attribute)]

    @property
    def mlp_out(self) -> list[nn.Linear]:
        """The Linears writing the MLP's output (unwrapped from an online rotation)."""
        return [getattr(call, "linear", call) for call in (getattr(m, a) for m, a in self.down_slots)]


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
    window = getattr(config, "sliding_window", None) or None  # qwen2's configs say 0, or switch it off, for none
    types = getattr(config, "layer_types", None)
    if not getattr(config, "use_sliding_window", True) or (types is not None and "sliding_attention" not in types):
        window = None
    return {"heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "head_dim": attention.head_dim, "scaling": attention.scaling,
            "sliding_window": window, "eps": eps, "rope": rope, **more}


def shared_rope(rotary: nn.Module):
    """A `rope` for models whose blocks share one rotary module: (x, positions, block index) -> (cos, sin)."""
    return lambda x, positions, index: rotary(x, positions)


class Adapter:
    """What every model has; a family adapter overrides what its family adds (`layout` at least)."""

    name = "generic"
    model_types: tuple[str, ...] = ()
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

    # GGUF export (io/gguf.py) asks the adapter everything llama.cpp's architecture of that name expects.
    gguf_architectures: ClassVar[dict[str, str]] = {}  # Hugging Face model_type -> llama.cpp's architecture

    def gguf_architecture(self, config) -> str | None:
        """llama.cpp's architecture name for this model, or None if mixbits cannot export it."""
        return self.gguf_architectures.get(config.model_type)

    def gguf_output_required(self, config) -> bool:
        """Whether llama.cpp's architecture needs an output tensor even for a head tied to token_embd."""
        return False

    def gguf_check(self, config, layers: set[str]) -> None:
        """Refuse (ExportError, one line) a configuration, or a checkpoint of these stored `layers`, that llama.cpp
        would compute otherwise."""

    def gguf_metadata(self, writer, config) -> None:
        raise NotImplementedError

    def row_permutation(self, layer: str, rows: int, config) -> torch.Tensor | None:
        """GGUF's row order of a layer (or of its bias), if it differs from the model's: llama.cpp's "llama"
        architecture rotates adjacent pairs, so whatever is exported as it has its q/k rows interleaved."""
        return interleaved_rotary_rows(layer, rows, config) if self.gguf_architecture(config) == "llama" else None

    def gguf_tensor(self, name: str, data: np.ndarray, ggml_type, config) -> np.ndarray:
        """A tensor as llama.cpp expects it: `data` is float values (`ggml_type` None) or GGML block bytes per row
        (Gemma: norms stored as 1 + w; qwen2_moe: the shared expert's gate as one vector)."""
        return data

    def gguf_pieces(self, layer: str, rows: int, config) -> list[tuple[str, slice | None, int | None]]:
        """Where a layer's rows go: (module name the GGUF name map knows, rows taken or None for all, expert index
        in a stacked tensor or None)."""
        return [(layer, None, None)]

    def gguf_extra_tensors(self, config) -> dict[str, np.ndarray]:
        """Tensors llama.cpp needs that the model computes instead, by GGUF name: Llama 3's rope frequency factors,
        for any family whose rotary scaling is of that kind."""
        factors = llama3_rope_factors(rope_settings(config), head_dim(config))
        return {} if factors is None else {"rope_freqs.weight": factors}


def interleaved_rotary_rows(layer: str, rows: int, config) -> torch.Tensor | None:
    """GGML's row order of q_proj/k_proj (rotary pairs interleaved per head) for llama.cpp's "llama" architecture,
    which rotates adjacent pairs where Hugging Face rotates halves; as llama.cpp's converter permutes."""
    if layer.endswith("self_attn.q_proj"):
        heads = config.num_attention_heads
    elif layer.endswith("self_attn.k_proj"):
        heads = config.num_key_value_heads
    else:
        return None
    index = torch.arange(rows)
    return index.reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def rope_settings(config, layer_type: str = "full_attention") -> dict:
    """The rotary parameters of the config (of one layer type where they differ by type), with rope_theta."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def gguf_base_metadata(writer, config, feed_forward: int | None = None) -> None:
    """The keys every llama.cpp decoder reads: sizes, head counts, head width, the norm's epsilon."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(feed_forward or config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def gguf_rope(writer, params: dict, swa_params: dict | None = None) -> None:
    """Rotary base and scaling keys: llama.cpp reads no scaling (default), linear, and llama3 (as the frequency
    factors of `llama3_rope_factors`); other kinds are refused."""
    import gguf

    writer.add_rope_freq_base(float(params["rope_theta"]))
    if swa_params is not None:
        writer.add_rope_freq_base_swa(float(swa_params["rope_theta"]))
    kind = params.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind not in ("default", "llama3"):
        raise ExportError(f"GGUF export does not write {kind!r} rotary scaling yet; use the mixbits checkpoint")


def llama3_rope_factors(params: dict, dim: int) -> np.ndarray | None:
    """Llama 3's rotary scaling as llama.cpp takes it: one divisor per frequency (the `rope_freqs` tensor)."""
    if params.get("rope_type") != "llama3":
        return None
    frequencies = 1.0 / (float(params["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, low, high = params.get("factor", 8.0), params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    context = params.get("original_max_position_embeddings", 8192)
    wavelength = 2 * math.pi / frequencies
    smooth = (context / wavelength - low) / (high - low)
    factors = np.where(wavelength < context / high, 1.0,
                       np.where(wavelength > context / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def check_full_attention(config, window: int | None) -> None:
    """llama.cpp runs these architectures with full attention: warn where the model's sliding window would make
    its outputs differ (beyond `window` tokens)."""
    if window and window < config.max_position_embeddings:
        warnings.warn(f"llama.cpp runs {config.model_type} with full attention: beyond {window} tokens of context its "
                      "outputs differ from this model's sliding-window attention", stacklevel=3)

"""The adapter for mixture-of-experts decoders with stacked experts: qwen3_moe, qwen2_moe, mixtral, olmoe.

transformers 5 stores a block's experts as two 3-D parameters (gate_up_proj
[E, 2I, H], rows [gate; up], and down_proj [E, H, I]) run by one experts
module. `prepare` swaps that module for `ExpertLinears`: the same function,
every expert's two projections as nn.Linears. From then on the rest of
mixbits sees ordinary layers: each expert's projection is its own
quantization group; its calibration statistics come from exactly the tokens
the router sends it (the forward hooks see each expert's own input); its
bits are counted; it is stored packed and computes from its codes. The
router and any shared expert (qwen2_moe: an ordinary MLP) are left as they
are: the router stays float, the shared expert quantizes like any Linear.

Experts that the calibration windows route too few tokens to have no
usable Hessian; quantize rounds them to nearest instead of GPTQ and names
them in a warning (`quantize.MIN_ROUTED_TOKENS`). The layout gives
rotation and AWQ the router and every expert as readers of the normed
stream and every expert's down_proj as a writer; the fast decoder runs the
attention itself and calls the mixture module for the MLP.

GGUF: llama.cpp stacks each block's experts per projection (ffn_gate_exps,
ffn_up_exps, ffn_down_exps: one type for all experts of a projection), so
every expert's gate_up rows are split into its gate and up halves. mixtral
is llama.cpp's llama (q/k rows permuted), qwen2_moe and qwen3_moe their own
architectures, whose routing llama.cpp fixes (qwen2moe never renormalises
the chosen experts' weights, qwen3moe always) and which treat every block
as a mixture.
"""

from __future__ import annotations

from typing import ClassVar

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


class ExpertLinears(nn.Module):
    """A block's experts as per-expert Linears: out = sum over routed experts of w * down(act(gate) * up)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn):
        super().__init__()
        experts, rows, hidden = gate_up.shape
        self.num_experts, self.act_fn = experts, act_fn
        self.gate_up = nn.ModuleList(_linear(gate_up[e]) for e in range(experts))
        self.down = nn.ModuleList(_linear(down[e]) for e in range(experts))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if not 0 <= expert < self.num_experts:
                continue
            tokens, slot = torch.where(top_k_index == expert)
            gate, up = self.gate_up[expert](hidden_states[tokens]).chunk(2, dim=-1)
            value = self.down[expert](self.act_fn(gate) * up) * top_k_weights[tokens, slot, None]
            out.index_add_(0, tokens, value.to(out.dtype))
        return out


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return linear


class MoeAdapter(Adapter):
    name = "moe"
    model_types = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
    bumped = ("v_proj",)

    def prepare(self, model: nn.Module) -> None:
        for block in model.model.layers:
            mlp = block.mlp
            experts = getattr(mlp, "experts", None)
            if isinstance(experts, ExpertLinears) or experts is None:
                continue
            if not (hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj") and experts.gate_up_proj.dim() == 3):
                raise TransformError(f"the experts of this {model.config.model_type} model are not stacked as "
                                     "gate_up_proj [E, 2I, H] and down_proj [E, H, I]; mixbits cannot split them")
            mlp.experts = ExpertLinears(experts.gate_up_proj, experts.down_proj, experts.act_fn)

    def layout(self, model: nn.Module, purpose: str) -> Layout:
        """LLaMA's attention; after the norm, the router, every expert's gate_up and a shared expert (qwen2_moe) read
        the stream, every expert's down and the shared one write it."""
        self.prepare(model)
        try:
            inner = model.model
            blocks = []
            for layer in inner.layers:
                attention, mlp = layer.self_attn, layer.mlp
                experts, shared = mlp.experts, getattr(mlp, "shared_expert", None)
                readers = [mlp.gate, *experts.gate_up]
                writers = [(experts.down, str(e)) for e in range(experts.num_experts)]
                if shared is not None:
                    readers += [shared.gate_proj, shared.up_proj, mlp.shared_expert_gate]
                    writers.append((shared, "down_proj"))
                blocks.append(BlockLayout(
                    layer.input_layernorm, [attention.q_proj, attention.k_proj, attention.v_proj], attention.o_proj,
                    layer.post_attention_layernorm, readers, None, mlp, v=attention.v_proj,
                    q_norm=getattr(attention, "q_norm", None), k_norm=getattr(attention, "k_norm", None),
                    experts_out=writers))
            facts = attention_facts(model.config, inner.layers[0].self_attn, inner.norm.variance_epsilon,
                                    shared_rope(inner.rotary_emb))
        except AttributeError:
            raise TransformError(f"{purpose} found this {model.config.model_type} model's modules not laid out as "
                                 "qwen3_moe's, qwen2_moe's or mixtral's; run without it") from None
        return Layout(inner.embed_tokens, blocks, inner.norm, model.lm_head, model.config.hidden_act, facts)


    gguf_architectures: ClassVar[dict[str, str]] = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}

    def gguf_output_required(self, config) -> bool:
        return config.model_type == "qwen2_moe"

    def gguf_tensor(self, name: str, data, ggml_type, config):
        return data.reshape(-1) if name.endswith("shared_expert_gate.weight") else data  # llama.cpp's is one vector

    def gguf_check(self, config, layers: set[str]) -> None:
        kind = config.model_type
        if kind in ("qwen2_moe", "qwen3_moe"):
            renormalise = kind == "qwen3_moe"
            if bool(getattr(config, "norm_topk_prob", False)) != renormalise:
                raise ExportError(f"llama.cpp's {self.gguf_architecture(config)} {'always' if renormalise else 'never'} "
                                  "renormalises the routing weights and this model does not; it cannot be exported")
            if getattr(config, "decoder_sparse_step", 1) != 1 or getattr(config, "mlp_only_layers", None):
                raise ExportError("llama.cpp treats every block as a mixture of experts and this model has dense "
                                  "blocks; it cannot be exported")

    def gguf_metadata(self, writer, config) -> None:
        kind = config.model_type
        expert = getattr(config, "moe_intermediate_size", None)
        gguf_base_metadata(writer, config)
        writer.add_expert_count(getattr(config, "num_local_experts", None) or config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if expert:
            writer.add_expert_feed_forward_length(expert)
        if kind == "qwen2_moe":
            writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
        if kind == "mixtral":
            writer.add_rope_dimension_count(head_dim(config))
        gguf_rope(writer, rope_settings(config))

    def gguf_pieces(self, layer: str, rows: int, config):
        block, _, rest = layer.partition(".mlp.experts.")
        if not rest:
            return [(layer, None, None)]
        projection, expert = rest.split(".")
        if projection == "down":
            return [(f"{block}.mlp.experts.down_proj", None, int(expert))]
        half = rows // 2  # gate_up's rows are [gate; up]
        return [(f"{block}.mlp.experts.gate_proj", slice(0, half), int(expert)),
                (f"{block}.mlp.experts.up_proj", slice(half, rows), int(expert))]


MOE = MoeAdapter()

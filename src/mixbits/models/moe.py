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
them in a warning (`quantize.MIN_ROUTED_TOKENS`). Rotation, AWQ, the fast
decoder and GGUF export do not handle expert blocks yet and say so.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import TransformError
from .adapter import Adapter


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

    def layout(self, model: nn.Module, purpose: str):
        raise TransformError(f"{purpose} does not handle mixture-of-experts blocks yet; run without it")


MOE = MoeAdapter()

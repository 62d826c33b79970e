"""QuaRot-style rotation of the residual stream, folded into the weights.

With every RMSNorm's weight folded into the Linears it feeds (norm weights
then 1), RMSNorm commutes with an orthogonal Q: ||Q^T h|| = ||h||. Storing the
residual stream as Q^T h then only rewrites weights:

    embedding rows      E -> E Q
    Linears reading h   W -> W Q       (q, k, v, gate, up, head; a mixture's router and experts)
    Linears writing h   W -> Q^T W     (o, down, every expert's down; a bias b -> Q^T b)

and the model computes the same function while its weights and activations
have their outliers spread over all channels. Q is a Hadamard matrix with
seeded random signs (`rotation_matrix` says when no Hadamard of that order
exists and a random orthogonal matrix is used). Optionally an online Hadamard
rotates the input of every down_proj (its weight absorbs the inverse), which
flattens the MLP's activation outliers too; that one runs at inference time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import TransformError
from ..models.adapter import Layout
from ..models.registry import adapter_for
from ..models.structure import untie_head
from .hadamard import hadamard_transform, rotation_matrix


class RotatedInput(nn.Module):
    """A Linear whose input is rotated on the fly: linear(x @ R), R a (Hadamard) rotation."""

    def __init__(self, linear: nn.Linear, seed: int = 0):
        super().__init__()
        self.linear = linear
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(hadamard_transform(x, seed=self.seed))


@dataclass
class Rotation:
    residual: str  # "hadamard" or "random-orthogonal"
    down_proj: str | None  # kind of the online rotation, None without one

    def as_dict(self) -> dict:
        return {"residual": self.residual, "down_proj": self.down_proj}


@torch.no_grad()
def rotate(model: nn.Module, online_down: bool = False, seed: int = 0) -> Rotation:
    """Rotate `model` in place (families whose adapter has a layout); its outputs stay equal up to rounding."""
    decoder = adapter_for(model).layout(model, "rotation")
    if decoder.sandwich:
        raise TransformError(f"rotation cannot pass the norms {model.config.model_type} applies to attention and MLP "
                             "outputs before the residual add; quantize without --rotate")
    untie_head(model)
    _fold_norms(decoder)
    hidden = decoder.embed.weight.shape[1]
    basis, kind = rotation_matrix(hidden, seed)
    signs = torch.where(torch.rand(hidden, generator=torch.Generator().manual_seed(seed)) < 0.5, -1.0, 1.0)
    q = (signs[:, None] * basis).double()  # diag(signs) H is orthogonal too: QuaRot's randomized Hadamard

    _right(decoder.embed, q)
    _right(decoder.head, q)
    for block in decoder.blocks:
        for linear in block.attention_in + block.mlp_in:
            _right(linear, q)
        for linear in [block.o, *block.mlp_out]:
            _left(linear, q)
    down_kind = None
    if online_down:
        for block in decoder.blocks:
            for holder, attribute in block.down_slots:  # every down_proj: one per expert in a mixture
                down = getattr(holder, attribute)
                if isinstance(down, RotatedInput):
                    continue
                rotation, down_kind = rotation_matrix(down.weight.shape[1], seed)
                _right(down, rotation.double())  # W x = (W R)(R^T x), and x @ R is R^T x per token
                setattr(holder, attribute, RotatedInput(down, seed))
    return Rotation(kind, down_kind)


def _fold_norms(decoder: Layout) -> None:
    """Fold each RMSNorm's weight into the Linears it feeds; the norm's weight becomes 1."""
    pairs = [(decoder.final_norm, [decoder.head], decoder.norm_offset)]
    for block in decoder.blocks:
        pairs += [(block.input_norm, block.attention_in, block.norm_offset),
                  (block.post_norm, block.mlp_in, block.norm_offset)]
    for norm, linears, offset in pairs:  # the norm scales by offset + weight (Gemma's 1 + w)
        gamma = norm.weight.double() + offset
        for linear in linears:
            linear.weight.copy_((linear.weight.double() * gamma[None, :]).to(linear.weight.dtype))
        norm.weight.fill_(1.0 - offset)


def _right(module: nn.Module, q: torch.Tensor) -> None:
    """weight -> weight @ q (Linears reading the rotated stream, and embedding rows)."""
    module.weight.copy_((module.weight.double() @ q).to(module.weight.dtype))


def _left(linear: nn.Linear, q: torch.Tensor) -> None:
    """weight -> q^T @ weight, bias -> q^T @ bias (Linears writing the rotated stream)."""
    linear.weight.copy_((q.T @ linear.weight.double()).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_((q.T @ linear.bias.double()).to(linear.bias.dtype))

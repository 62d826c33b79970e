"""An input embedding that holds quantized rows and looks up only the rows it is asked for.

Groups run along each row (the hidden dimension), so every token's row
dequantizes on its own: a lookup decodes `len(ids)` rows, never the matrix.
Formats whose parameters are per row or per group (not per tensor) qualify.
An embedding tied to an output head the integer kernels compute
(`TiedEmbedding`) reads its rows from the head's codes, so they are held once.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MixbitsError
from ..formats import Format, QuantizedTensor
from .linear import held_params, hold_codes


def check_lookup_format(fmt: Format) -> None:
    """Refuse a format whose rows cannot be decoded on their own (per-tensor parameters)."""
    if not QuantizedEmbedding.supports(fmt):
        raise MixbitsError(f"an embedding in {fmt} cannot be looked up row by row; use groups or per-channel scales, "
                           "e.g. q8_0, int8:ch:sym or int4:g64:asym")


class QuantizedEmbedding(nn.Module):
    """E[ids] decoded from codes [rows, groups, group] and per-row parameters, times `scale` if given."""

    def __init__(self, quantized: QuantizedTensor, scale: torch.Tensor | None = None):
        super().__init__()
        check_lookup_format(quantized.format)
        # A factor the model's own embedding applies in its forward (Gemma: sqrt(hidden)); not stored, rebuilt from
        # the config like the model's.
        self.register_buffer("embed_scale", None if scale is None else torch.as_tensor(scale).float(), persistent=False)
        hold_codes(self, quantized)
        self.num_embeddings, self.embedding_dim = quantized.shape

    @staticmethod
    def supports(fmt: Format) -> bool:
        return fmt.granularity.kind in ("channel", "group")

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 rows `ids` (any shape of indices) as [..., embedding_dim]."""
        flat = ids.reshape(-1)
        params = {name: value[flat] if value.shape[0] == self.num_embeddings else value
                  for name, value in held_params(self).items()}
        values = self.format.decode(self.codes[flat], params).reshape(len(flat), -1)[:, :self.embedding_dim]
        return values.reshape(*ids.shape, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows(ids)
        return rows if self.embed_scale is None else rows * self.embed_scale

    def quantized(self) -> QuantizedTensor:
        """The stored matrix (sharing this module's tensors), e.g. for an output head tied to it."""
        return QuantizedTensor(self.format, (self.num_embeddings, self.embedding_dim), self.codes, held_params(self))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.format}"


class TiedEmbedding(nn.Module):
    """E[ids] decoded from the codes of the IntLinear head tied to the embedding, times `scale` if given."""

    def __init__(self, head: nn.Module, scale: torch.Tensor | None = None):
        super().__init__()
        self.head = head  # registered here too: the module tree shows where the codes are read from
        self.register_buffer("embed_scale", None if scale is None else torch.as_tensor(scale).float(), persistent=False)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.head.rows(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)
        return rows if self.embed_scale is None else rows * self.embed_scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, codes of the tied head"

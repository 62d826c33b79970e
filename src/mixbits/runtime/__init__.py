"""Modules that compute with quantized weights as stored, and swapping them into a model."""

from .embedding import QuantizedEmbedding
from .linear import DequantLinear, IntLinear, TableLinear, TrellisLinear, VectorLinear, quantized_linear

__all__ = ["DequantLinear", "IntLinear", "QuantizedEmbedding", "TableLinear", "TrellisLinear", "VectorLinear", "quantized_linear"]

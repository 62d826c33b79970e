"""Modules that compute with quantized weights as stored, and swapping them into a model."""

from .embedding import QuantizedEmbedding
from .linear import DequantLinear, IntLinear, TableLinear, VectorLinear, quantized_linear

__all__ = ["DequantLinear", "IntLinear", "QuantizedEmbedding", "TableLinear", "VectorLinear", "quantized_linear"]

"""Modules that compute with quantized weights as stored, and swapping them into a model."""

from .linear import DequantLinear, IntLinear, quantized_linear

__all__ = ["DequantLinear", "IntLinear", "quantized_linear"]

"""Transforms applied to weights and activations before quantization."""

from .hadamard import HADAMARD, RANDOM_ORTHOGONAL, hadamard_matrix, hadamard_transform, has_hadamard, rotation_matrix

__all__ = ["HADAMARD", "RANDOM_ORTHOGONAL", "hadamard_matrix", "hadamard_transform", "has_hadamard", "rotation_matrix"]

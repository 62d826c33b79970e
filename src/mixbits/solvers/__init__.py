"""Solvers choose the codes of a weight matrix under a format."""

from .gptq import gptq
from .rtn import round_to_nearest

__all__ = ["gptq", "round_to_nearest"]

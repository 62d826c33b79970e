"""Solvers choose the codes of a weight matrix under a format."""

from .rtn import round_to_nearest

__all__ = ["round_to_nearest"]

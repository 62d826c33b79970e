"""Solvers choose the codes of a weight matrix under a format."""

from .rtn import CLIP_GRID, round_to_nearest

__all__ = ["CLIP_GRID", "round_to_nearest"]

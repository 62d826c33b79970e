"""Evaluation of language models on token windows."""

from .metrics import Evaluation, ReferenceScores, evaluate, score_windows

__all__ = ["Evaluation", "ReferenceScores", "evaluate", "score_windows"]

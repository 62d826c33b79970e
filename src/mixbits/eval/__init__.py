"""Evaluation of language models on token windows, on one text or on several domains."""

from .domains import Domain, DomainsEvaluation, evaluate_domains, load_domains, reference_scores
from .metrics import Evaluation, ReferenceScores, evaluate, score_windows

__all__ = ["Domain", "DomainsEvaluation", "Evaluation", "ReferenceScores", "evaluate", "evaluate_domains",
           "load_domains", "reference_scores", "score_windows"]

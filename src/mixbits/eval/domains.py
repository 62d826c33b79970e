"""Evaluation on several domains of text at once, with their mean.

A domain is a named text source (`mixbits.corpus`) or a user's file; each is
scored on its own windows from its middle (`data.eval_windows`), and the
summary gives the mean over all domains and over those whose kind of text is
not in the calibration mix (the numbers that say whether quality carries
over to text the calibration never saw).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import defaults
from ..corpus import CALIBRATION_MIX, EVALUATION_DOMAINS, SOURCES, resolve_text
from ..data import Text, WindowSpec, bos_token_id, eval_windows, tokenize
from ..models.loaded import LoadedModel
from .metrics import Evaluation, ReferenceScores, score_windows


@dataclass
class Domain:
    name: str
    kind: str
    in_calibration: bool  # the model was calibrated on this text (on its first half)
    text: Text
    windows: torch.Tensor
    spec: WindowSpec

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "in_calibration_mix": self.in_calibration,
                "text": self.text.name, "text_sha256": self.text.sha256, "windows": self.spec.as_dict()}


def load_domains(tokenizer, names=None, windows: int = defaults.EVAL_WINDOWS,
                 window_len: int = defaults.WINDOW_LEN, calibrated_on: tuple[str, ...] = CALIBRATION_MIX) -> list[Domain]:
    """The evaluation windows of each domain: source names or paths; None is `EVALUATION_DOMAINS`.

    `calibrated_on` names the texts the model was calibrated on (default: the
    sources of the calibration mix; one source or file for `--calib-text`;
    none for data-free rounding): a domain among them counts as seen, and
    the other domains' mean is the one on unseen text.
    """
    found = []
    for spec in names or EVALUATION_DOMAINS:
        text = resolve_text(spec)
        batch, window_spec = eval_windows(tokenize(text, tokenizer), windows, window_len, bos_token_id(tokenizer))
        known = SOURCES.get(text.name)
        kind = known.kind if known else "user text"
        found.append(Domain(text.name, kind, text.name in calibrated_on, text, batch, window_spec))
    return found


@dataclass
class DomainsEvaluation:
    domains: list[Domain]
    results: list[Evaluation]

    def delta(self, result: Evaluation) -> float | None:
        return None if result.reference_perplexity is None else result.perplexity / result.reference_perplexity - 1

    def mean(self, unseen_only: bool = False) -> dict | None:
        """Mean relative perplexity change, KL and agreement over the domains (or the unseen ones)."""
        chosen = [r for d, r in zip(self.domains, self.results) if not (unseen_only and d.in_calibration)]
        if not chosen:
            return None
        mean = {"domains": len(chosen)}
        if chosen[0].reference_perplexity is not None:
            mean["delta_perplexity"] = sum(self.delta(r) for r in chosen) / len(chosen)
            mean["kl"] = sum(r.kl for r in chosen) / len(chosen)
            mean["agreement"] = sum(r.agreement for r in chosen) / len(chosen)
        return mean

    def as_dict(self) -> dict:
        return {
            "domains": [{**d.describe(), **r.as_dict(), "delta_perplexity": self.delta(r)}
                        for d, r in zip(self.domains, self.results)],
            "mean": self.mean(),
            "mean_unseen": self.mean(unseen_only=True),
        }

    def rows(self) -> list[list]:
        """Table rows: domain, kind, fp32 ppl, ppl, Δ ppl, KL, agreement; then the means."""
        rows = []
        for d, r in zip(self.domains, self.results):
            delta = self.delta(r)
            rows.append([d.name + (" (seen in calibration)" if d.in_calibration else ""), d.kind, r.reference_perplexity,
                         r.perplexity, None if delta is None else f"{delta:+.2%}", r.kl, r.agreement])
        if self.results and self.results[0].reference_perplexity is None:
            return rows  # no reference: nothing to average that means anything across domains
        means = [("mean", self.mean())] if len(self.domains) > 1 else []
        if any(d.in_calibration for d in self.domains) and self.mean(unseen_only=True):
            means.append(("mean, unseen kinds", self.mean(unseen_only=True)))
        for label, mean in means:
            delta = mean.get("delta_perplexity")
            rows.append([label, f"{mean['domains']} domains", None, None,
                         None if delta is None else f"{delta:+.2%}", mean.get("kl"), mean.get("agreement")])
        return rows


HEADERS = ["domain", "kind", "reference ppl", "perplexity", "Δ ppl", "KL", "top-1 agree"]


def reference_scores(model: nn.Module, domains: list[Domain], progress: bool = True) -> list[ReferenceScores]:
    """The reference model's scores on every domain, computed once (2.4 GB per default domain)."""
    return [ReferenceScores(model, d.windows, progress=progress) for d in domains]


def evaluate_domains(
    model: nn.Module | LoadedModel,
    domains: list[Domain] | list[str] | None = None,
    reference: nn.Module | LoadedModel | list[ReferenceScores] | None = None,
    *,
    windows: int = defaults.EVAL_WINDOWS,
    window_len: int = defaults.WINDOW_LEN,
    progress: bool = True,
) -> DomainsEvaluation:
    """Score `model` on every domain; with a reference (a model, or its scores per domain), KL and agreement too.

    `domains` are `Domain`s, or source names and paths (None: the evaluation
    domains) turned into windows with the model's tokenizer.
    """
    module = model.model if isinstance(model, LoadedModel) else model
    if not domains or not isinstance(domains[0], Domain):
        tokenizer = model.tokenizer if isinstance(model, LoadedModel) else None
        domains = load_domains(tokenizer, domains, windows, window_len)
    ref = reference.model if isinstance(reference, LoadedModel) else reference
    results = []
    for i, domain in enumerate(domains):
        against = ref[i] if isinstance(ref, list) else ref
        result = score_windows(module, domain.windows, against, progress=progress)
        result.windows, result.text_name, result.text_sha256 = domain.spec, domain.text.name, domain.text.sha256
        results.append(result)
    return DomainsEvaluation(domains, results)

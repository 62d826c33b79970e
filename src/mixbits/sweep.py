"""Quantize at a series of budgets and measure each result: the Pareto front of a model.

For every budget the allocated plan and the heuristic mix are quantized from
a fresh copy of the float model (block-sequentially, as `mixbits quantize
--plan` does) and scored on every evaluation domain; every uniform option of
the menu whose size falls in the swept range (with a margin) is scored once.
A point's headline numbers are means over the domains (`delta_unseen` over
the domains whose kind of text the calibration mix does not hold).
"""

from __future__ import annotations

import copy
import gc
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .allocate import Budget
from .errors import MixbitsError
from .eval import Domain, ReferenceScores, evaluate_domains, reference_scores
from .sensitivity import Sensitivity
from .menu import Choice, Pin
from .mixes import allocated_plan, heuristic_plan, uniform_plan
from .models.registry import adapter_for
from .models.loaded import LoadedModel
from .plan import KEEP, Plan
from .quantize import quantize
from .selective import predicted_groups
from .solvers import GptqSettings

SERIES = ("allocated", "heuristic", "uniform")
UNIFORM_MARGIN = 1.0  # uniform options up to this many bits per weight outside the swept range are scored


@dataclass
class SweepPoint:
    series: str
    label: str
    budget: float | None  # bits per weight asked for (None for uniform options)
    bits_per_weight: float
    bits: int
    predicted_damage: float | None
    delta_perplexity: float  # mean over the domains of perplexity / fp32 perplexity - 1
    delta_unseen: float | None  # the same over the domains the calibration did not draw from
    kl: float  # mean over the domains
    agreement: float  # mean over the domains
    quantize_seconds: float
    options: dict = field(default_factory=dict)  # option -> number of layers
    domains: dict = field(default_factory=dict)  # domain -> perplexity, delta_perplexity, kl, agreement

    def as_dict(self) -> dict:
        return asdict(self)


def parse_budgets(text: str) -> list[float]:
    """'2.25:4.5:0.25' (start:stop:step, stop included) or '2.5,3,3.5' -> bits per weight."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            values = [round(start + i * step, 6) for i in range(count) if start + i * step <= stop + 1e-9]
        else:
            values = [float(x) for x in text.split(",")]
    except ValueError:
        raise MixbitsError(f"budgets {text!r} must be START:STOP:STEP (e.g. 2.25:4.5:0.25) or a list like 2.5,3,3.5") from None
    if not values or any(v <= 0 for v in values):
        raise MixbitsError(f"budgets {text!r} must be positive bits per weight")
    return values


RESUME_KEYS = ("model", "domains", "calibration", "damage", "options", "pins")


def finished_points(previous: Path, record: dict) -> list[dict]:
    """Points of an earlier run in `previous` (sweep.json) made with the same settings as `record`.

    An interrupted sweep resumes with them: same model, evaluation domains,
    calibration, damage, options and pins; only points of budgets still asked for (and
    uniform points) are kept.
    """
    try:
        old = json.loads(previous.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict) or any(old.get(key) != record.get(key) for key in RESUME_KEYS):
        return []
    points = old.get("points")
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        return []  # not a sweep this version wrote: start over
    return [p for p in points if p.get("budget") is None or p.get("budget") in record["budgets"]]


def sweep(
    model: LoadedModel,
    sensitivity: Sensitivity,
    menu: list[Choice],
    budgets: list[float],
    domains: list[Domain],
    *,
    series: tuple[str, ...] = SERIES,
    damage: str = "kl",
    pins: list[Pin] = (),
    calibration,
    references: list[ReferenceScores] | None = None,
    gptq: GptqSettings = GptqSettings(),
    progress: bool = True,
    skip: set[tuple[str, str]] = frozenset(),
    on_point=None,
) -> list[SweepPoint]:
    """Score the plans of each series; `on_point(point)` is called as each one is done.

    Points whose (series, label) is in `skip` (already measured by an interrupted run) are left out.
    """
    unknown = set(series) - set(SERIES)
    if unknown:
        raise MixbitsError(f"unknown series {', '.join(sorted(unknown))}; choose from {', '.join(SERIES)}")
    references = references or reference_scores(model.model, domains, progress)
    jobs: list[tuple[str, str, float | None, Plan]] = []
    for budget in budgets:
        if "allocated" in series:
            jobs.append(("allocated", f"{budget:g} bpw", budget, allocated_plan(sensitivity, Budget(budget), damage, pins, menu)))
        if "heuristic" in series:
            jobs.append(("heuristic", f"{budget:g} bpw", budget, heuristic_plan(sensitivity, menu, Budget(budget), damage,
                                                                             adapter_for(model.model).bumped)))
    predicted = [label for kind, label, _, plan in jobs
                 if kind == "allocated" and damage == "kl" and predicted_groups(sensitivity, plan)]
    if predicted and progress:
        print(f"sweep: the allocated plans at {', '.join(predicted)} take options whose KL was predicted from the "
              "proxy, not measured (the sensitivity file was measured for other budgets); measure every KL with "
              "`mixbits plan --kl-all --sensitivity FILE`",
              file=sys.stderr)
    if "uniform" in series:
        for choice in menu:
            if choice.option == KEEP:
                continue
            plan = uniform_plan(sensitivity, choice, damage)
            if min(budgets) - UNIFORM_MARGIN <= plan.bits_per_weight <= max(budgets) + UNIFORM_MARGIN:
                jobs.append(("uniform", str(choice), None, plan))
    points = []
    for kind, label, budget, plan in jobs:
        if (kind, label) in skip:
            continue
        quantized = copy.deepcopy(model.model)
        report = quantize(quantized, plan=plan, calibration=calibration, gptq=gptq, progress=progress)
        result = evaluate_domains(quantized, domains, references, progress=progress)
        del quantized
        gc.collect()
        mean, unseen = result.mean(), result.mean(unseen_only=True)
        per_domain = {d.name: {"perplexity": r.perplexity, "delta_perplexity": result.delta(r), "kl": r.kl,
                               "agreement": r.agreement} for d, r in zip(domains, result.results)}
        point = SweepPoint(kind, label, budget, plan.bits_per_weight, plan.bits, plan.damage_total,
                           mean["delta_perplexity"], unseen and unseen["delta_perplexity"], mean["kl"], mean["agreement"],
                           report.seconds, report.as_dict()["options"], per_domain)
        points.append(point)
        if on_point is not None:
            on_point(point)
    return points

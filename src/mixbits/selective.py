"""The KL measured only where the allocation depends on it.

Measuring the KL of every (group, option) is most of a measurement's time,
but a plan at a given budget only hinges on the options near its decision
boundary. Here every group's KL is first measured at one anchor option;
the others are predicted as their Fisher-weighted proxy times the group's
measured KL/proxy ratio (geometric mean over what was measured). Then for
each budget: allocate from the predictions, measure the KL of every chosen
option and of its neighbours one size down and up, and repeat until every
chosen option's KL is a measured one (bench/selective_kl.py replays this
rule on a full measurement).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .menu import Choice
from .plan import KEEP

if TYPE_CHECKING:
    from .allocate import Budget
    from .menu import Pin
    from .plan import Plan
    from .sensitivity import GroupSensitivity, Sensitivity


def anchor(choices: list[Choice], bits) -> Choice:
    """The option measured in every group first: the median by size of the quantized ones."""
    quantized = sorted((c for c in choices if c.option != KEEP), key=bits)
    return quantized[(len(quantized) - 1) // 2] if quantized else choices[0]


def predicted_kl(group: "GroupSensitivity") -> dict[Choice, float]:
    """Each option's KL: measured, or its proxy times the group's measured KL/proxy ratio."""
    ratios = [math.log(o.kl / o.proxy) for o in group.options
              if o.kl is not None and o.option != KEEP and o.kl > 0 and o.proxy > 0]
    ratio = math.exp(sum(ratios) / len(ratios)) if ratios else 1.0
    return {o.choice: o.kl if o.kl is not None else o.proxy * ratio for o in group.options}


def undecided(sensitivity: "Sensitivity", budget: "Budget", pins: "list[Pin]",
              menu: list[Choice] | None) -> dict[str, list[Choice]]:
    """Per group, the options whose KL the plan at `budget` needs and the sensitivity lacks: the one allocated from
    the predictions and its neighbours by size."""
    from .mixes import allocated_plan

    plan = allocated_plan(sensitivity, budget, "kl", pins, menu)
    chosen = {layer.group: str(Choice(layer.option, layer.solver)) for layer in plan.layers}
    needed: dict[str, list[Choice]] = {}
    for group in sensitivity.groups + sensitivity.outer:
        if group.name not in chosen:
            continue
        options = sorted(group.options, key=lambda o: o.bits)
        at = next(i for i, o in enumerate(options) if str(o.choice) == chosen[group.name])
        lacking = [o.choice for o in options[max(at - 1, 0):at + 2] if o.kl is None]
        if lacking:
            needed[group.name] = lacking
    return needed


def predicted_groups(sensitivity: "Sensitivity", plan: "Plan") -> set[str]:
    """The groups whose option in `plan` has a predicted KL, not a measured one."""
    groups = {g.name: g for g in sensitivity.groups + sensitivity.outer}
    return {layer.group for layer in plan.layers
            if groups[layer.group].find(Choice(layer.option, layer.solver)).kl is None}

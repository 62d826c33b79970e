"""Choose one option per layer group to minimise total damage within a bit budget.

This is a multiple-choice knapsack: binary x[g, o] with exactly one option per
group, sum of bits[g, o] x[g, o] <= budget, minimise sum of damage[g, o] x[g, o].
It is solved exactly as a MILP by HiGHS (scipy.optimize.milp) with a zero
optimality gap. Bit counts are integers up to ~1e9, beyond what the solver's
floating-point feasibility tolerance resolves to a single bit, so the chosen
allocation is re-checked in integers and, if it overshoots, solved again with
the budget lowered by the overshoot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import LinearConstraint, milp
from scipy.sparse import lil_matrix

from .errors import MixbitsError


class BudgetError(MixbitsError):
    """No allocation fits the budget (or the budget is not a budget)."""


@dataclass(frozen=True)
class Option:
    """One way to store a group: its name, exact bits and predicted damage."""

    name: str
    bits: int
    damage: float


def allocate(groups: dict[str, list[Option]], budget_bits: int) -> dict[str, Option]:
    """The option per group with the least total damage whose bits sum to at most `budget_bits`."""
    if not groups or any(not options for options in groups.values()):
        raise BudgetError("every layer group needs at least one option")
    smallest = sum(min(o.bits for o in options) for options in groups.values())
    largest = sum(max(o.bits for o in options) for options in groups.values())
    if budget_bits < smallest:
        raise BudgetError(
            f"the budget of {budget_bits:,} bits is below the smallest achievable {smallest:,} bits "
            f"(largest useful: {largest:,}); raise the budget or add smaller options"
        )
    if budget_bits >= largest:  # everything fits: take the least damage per group
        return {g: min(options, key=lambda o: (o.damage, o.bits)) for g, options in groups.items()}

    names = list(groups)
    flat = [(g, o) for g in names for o in groups[g]]
    bits = np.array([o.bits for _, o in flat], dtype=np.float64)
    damage = np.array([o.damage for _, o in flat], dtype=np.float64)
    one_each = lil_matrix((len(names), len(flat)))
    column = 0
    for row, g in enumerate(names):
        for _ in groups[g]:
            one_each[row, column] = 1
            column += 1
    limit = budget_bits
    for _ in range(8):
        result = milp(
            damage,
            integrality=np.ones(len(flat)),
            bounds=(0, 1),
            constraints=[LinearConstraint(one_each.tocsr(), 1, 1), LinearConstraint(bits[None, :], -np.inf, limit)],
            options={"mip_rel_gap": 0.0},
        )
        if result.x is None:
            raise BudgetError(f"the solver found no allocation within {budget_bits:,} bits ({result.message})")
        chosen = np.round(result.x).astype(bool)
        picked = {g: o for (g, o), take in zip(flat, chosen) if take}
        total = sum(o.bits for o in picked.values())
        if len(picked) == len(names) and total <= budget_bits:
            return picked
        limit -= max(total - budget_bits, 1)
    raise BudgetError(f"could not meet the budget of {budget_bits:,} bits exactly; loosen it slightly")

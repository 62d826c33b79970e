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

import contextlib
import math
import os
import re
import sys
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
    # HiGHS's tolerances are absolute: scale the objective so the largest damage is 1.
    damage = damage / max(np.abs(damage).max(), 1e-300)
    one_each = lil_matrix((len(names), len(flat)))
    column = 0
    for row, g in enumerate(names):
        for _ in groups[g]:
            one_each[row, column] = 1
            column += 1
    limit = budget_bits
    for _ in range(8):
        with quiet_stdout():
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


@contextlib.contextmanager
def quiet_stdout():
    """Send file descriptor 1 to /dev/null for a while.

    HiGHS's MIP solver writes some diagnostics straight to descriptor 1, past
    Python and past `disp=False`; they would mix into `--json` output.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 at all: nothing to protect
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


# In whole-model budgets, layers outside the allocation (an embedding or head not among its choices) count at
# 16 bits, as they are stored; norms, biases and routers at 32, as the checkpoint keeps them.
OTHER_PARAMETER_BITS = 16
FLOAT_PARAMETER_BITS = 32
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Budget:
    """A bit budget: bits per weight of the quantized layers or of the whole model, or a model size in bytes."""

    bits_per_weight: float | None = None
    bytes: int | None = None
    scope: str = "layers"  # for bits_per_weight: "layers" (the quantized ones) or "model" (every parameter)

    def __post_init__(self):
        if (self.bits_per_weight is None) == (self.bytes is None):
            raise BudgetError("give the budget either as bits per weight or as a size in bytes")
        if self.scope not in ("layers", "model"):
            raise BudgetError(f"budget scope {self.scope!r} is not 'layers' or 'model'")
        if (self.bits_per_weight or 0) < 0 or (self.bytes or 0) < 0:
            raise BudgetError("a budget cannot be negative")

    @property
    def whole_model(self) -> bool:
        """Whether the budget counts every parameter (a size, or bits per weight of the whole model): then the
        embedding and an untied head are allocated too."""
        return self.bytes is not None or self.scope == "model"

    def layer_bits(self, weights: int, other_parameters: int, float_parameters: int = 0) -> int:
        """Bits the allocated layers (holding `weights` weights) may use, beside `other_parameters` stored in 16
        bits and `float_parameters` in 32."""
        fixed = OTHER_PARAMETER_BITS * other_parameters + FLOAT_PARAMETER_BITS * float_parameters
        if self.bytes is not None:
            return 8 * self.bytes - fixed
        if self.scope == "model":
            return math.floor(self.bits_per_weight * (weights + other_parameters + float_parameters)) - fixed
        return math.floor(self.bits_per_weight * weights)

    def __str__(self) -> str:
        if self.bytes is not None:
            return f"{self.bytes:,} bytes"
        return f"{self.bits_per_weight:g} bits per weight of the {'quantized layers' if self.scope == 'layers' else 'whole model'}"

    def as_dict(self) -> dict:
        return {"bits_per_weight": self.bits_per_weight, "bytes": self.bytes, "scope": self.scope}


def parse_size(text: str) -> int:
    """'60MB', '57.2 MiB', '1e6' -> bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmg]i?b|b)?\s*", text.lower())
    try:
        value = float(match.group(1)) * _UNITS[match.group(2) or "b"]
    except (AttributeError, ValueError):
        raise BudgetError(f"size {text!r} is not a size; write it like 60MB, 57.5MiB or 60000000") from None
    return int(value)

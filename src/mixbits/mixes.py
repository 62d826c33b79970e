"""Plans built from a sensitivity table: the allocated mix, uniform plans, and a fixed heuristic mix.

- `allocated_plan`: the exact multiple-choice knapsack (`allocate`) over the
  measured damage of every (group, option), at the budget.
- `uniform_plan`: one option everywhere.
- `heuristic_plan`: what llama.cpp's quant mixes do, as the baseline a
  measured allocation must beat. The ladder has one rung per code width (the
  smallest option of that width). Groups holding the layers the
  architecture's adapter names (`bumped`: v_proj and down_proj for llama, as
  llama.cpp bumps attn_v and ffn_down) get one rung more, and so do groups in
  the first and last eighth of the blocks;
  the base rung is the largest whose mix fits the budget, and the remaining
  bits raise groups one rung each in that priority order.
"""

from __future__ import annotations

from torch import nn

from .allocate import Budget, BudgetError, Option, allocate
from .sensitivity import GroupSensitivity, Sensitivity, SensitivityError, other_parameters
from .menu import Choice, MenuError, Pin, check_pins_match, embedding_choices, group_choices, pinned_choice
from .models.structure import outer_layers, quantizable_linears
from .plan import KEEP, LayerPlan, Plan, option_bits
from .selective import predicted_kl

def allocated_plan(sensitivity: Sensitivity, budget: Budget, damage: str = "kl", pins: list[Pin] = (),
                   menu: list[Choice] | None = None) -> Plan:
    """The least-damage plan within `budget`, by `damage` ("kl" or "proxy"), from the options of `menu`
    (None: every option the sensitivity measured; a file can hold more than one menu's).

    A budget over the whole model also allocates the embedding and an untied head where the sensitivity measured
    them (`measure(outer=True)`); otherwise they stay in 16 bits, counted as fixed."""
    if damage not in sensitivity.damages:
        raise SensitivityError(f"this sensitivity has no {damage!r} damage (it has {', '.join(sensitivity.damages)}); "
                               "measure it, or allocate by proxy")
    groups: dict[str, list[Option]] = {}
    for group in _allocated_groups(sensitivity, budget):
        measured = group.options if menu is None else [o for o in group.options if o.choice in _menu_of(group, menu)]
        pinned = pinned_choice(group.layers, list(pins))
        if pinned is not None:
            pinned = group.applicable(pinned)
            measured = [o for o in group.options if o.choice == pinned]
            if not measured:
                raise SensitivityError(f"group {group.name} is pinned to {pinned}, which the sensitivity file did not "
                                       "measure; measure again with the pin")
        if not measured:
            raise SensitivityError(f"the sensitivity file measured none of the options for {group.name}; "
                                   "measure them, or give options it holds")
        found = group_damages(group, damage)
        groups[group.name] = [Option(str(o.choice), o.bits, found[o.choice]) for o in measured]
    chosen = allocate(groups, _budget_bits(sensitivity, budget))
    by_name = {(g.name, str(o.choice)): o.choice for g in _allocated_groups(sensitivity, budget) for o in g.options}
    return _plan(sensitivity, {name: by_name[name, option.name] for name, option in chosen.items()}, damage, budget)


def group_damages(group: GroupSensitivity, damage: str) -> dict[Choice, float]:
    """Each option's `damage`; a KL not measured (`measure(kl_budgets=...)`) predicted from the proxy."""
    if damage == "kl":
        return predicted_kl(group)
    return {o.choice: getattr(o, damage) for o in group.options}


def _allocated_groups(sensitivity: Sensitivity, budget: Budget | None) -> list[GroupSensitivity]:
    return sensitivity.groups + (sensitivity.outer if budget is not None and budget.whole_model else [])


def _menu_of(group: GroupSensitivity, menu: list[Choice]) -> list[Choice]:
    return embedding_choices(menu) if group.embedding else menu


def uniform_plan(sensitivity: Sensitivity, choice: Choice, damage: str = "proxy") -> Plan:
    return _plan(sensitivity, {g.name: choice for g in sensitivity.groups}, damage, None)


def heuristic_plan(sensitivity: Sensitivity, menu: list[Choice], budget: Budget, damage: str = "proxy",
                   bumped: tuple[str, ...] = ()) -> Plan:
    """llama.cpp-style fixed mix at `budget` (see the module docstring); `bumped`: the adapter's layer names."""
    groups = sensitivity.groups

    def size(choice: Choice) -> int:
        return sum(g.bits(choice) for g in groups)

    # One rung per code width (the smallest option of that width): a step up is a bit more, not a finer group.
    rungs: dict[int, Choice] = {}
    for choice in menu:
        if choice.option != KEEP:
            width = choice.format.code_bits_per_weight
            if width not in rungs or size(choice) < size(rungs[width]):
                rungs[width] = choice
    ladder = sorted(rungs.values(), key=size)
    if not ladder:
        raise BudgetError("the heuristic mix needs at least one quantized option")
    limit = _budget_bits(sensitivity, budget, allocate_outer=False)  # the mix holds the embedding at 16 bits
    blocks = max(g.block for g in groups) + 1
    edge = max(1, blocks // 8)
    extra = {g.name: int(any(layer.endswith(tuple(bumped)) for layer in g.layers) if bumped else 0)
             + int(g.block < edge or g.block >= blocks - edge) for g in groups}
    top = len(ladder) - 1

    def levels(base: int, bumps: bool) -> dict[str, int]:
        return {g.name: min(base + (extra[g.name] if bumps else 0), top) for g in groups}

    def total(level: dict[str, int]) -> int:
        return sum(g.bits(ladder[level[g.name]]) for g in groups)

    level = next((levels(b, True) for b in reversed(range(len(ladder))) if total(levels(b, True)) <= limit), None)
    if level is None:
        level = levels(0, False)
        if total(level) > limit:
            raise BudgetError(f"{budget} is below the smallest option everywhere ({total(level):,} bits); raise it")
    used = total(level)
    for group in sorted(groups, key=lambda g: -extra[g.name]):  # stable: block order within a priority
        step = level[group.name]
        if step < top:
            more = group.bits(ladder[step + 1]) - group.bits(ladder[step])
            if used + more <= limit:
                level[group.name], used = step + 1, used + more
    return _plan(sensitivity, {name: ladder[step] for name, step in level.items()}, damage, budget, groups)


def check_budget(model: nn.Module, menu: list[Choice], pins: list[Pin], budget: Budget, target: str | None = None) -> None:
    """Refuse, before any measuring, a budget that no choice of options can meet.

    Ties are ignored here (each layer takes its own smallest option), so this
    catches every budget below the true minimum but not those just above it;
    the allocator's exact check catches the rest.
    """
    linears = quantizable_linears(model)
    outside = outer_layers(model)
    check_pins_match(list(pins), [name for name, _ in linears + outside])
    if not budget.whole_model:
        for pin in pins:
            if not any(pin.matches(name) for name, _ in linears):
                raise MenuError(f"pin {pin.pattern!r} names only layers outside the blocks; they join plans whose "
                                "budget counts the whole model (--scope model or --size)")
    allocated = linears + (outside if budget.whole_model else [])
    smallest = largest = 0
    for name, layer in allocated:
        rows, cols = layer.weight.shape
        embedding = isinstance(layer, nn.Embedding)
        choices = group_choices([name], [(rows, cols)], menu, list(pins), target, embedding)
        pinned = pinned_choice([name], list(pins))
        if pinned is not None:
            choices = embedding_choices([pinned]) if embedding else [pinned]
        sizes = [option_bits(c.option, rows, cols) for c in choices]
        smallest, largest = smallest + min(sizes), largest + max(sizes)
    weights = sum(layer.weight.numel() for _, layer in allocated)
    held = [layer for layer in outside if not budget.whole_model]  # outside the allocation: stored in 16 bits
    limit = budget.layer_bits(weights, sum(layer.weight.numel() for _, layer in held),
                              other_parameters(model, linears + outside))
    if limit < smallest:
        raise BudgetError(f"{budget} is below the smallest achievable ({smallest / weights:.4f} bits per weight of the "
                          f"quantized layers, {smallest:,} bits; the largest useful is {largest / weights:.4f}); "
                          "raise the budget or add smaller options")


def _budget_bits(sensitivity: Sensitivity, budget: Budget, allocate_outer: bool = True) -> int:
    """The allocated groups' bits: the budget less the rest at the bits it is stored in (a sensitivity without
    the embedding's measurements does not tell it from the norms: all of it at 16 bits, as before)."""
    outer_groups = _allocated_groups(sensitivity, budget)[len(sensitivity.groups):] if allocate_outer else []
    allocated = sum(g.weights for g in outer_groups)
    outer = sum(g.weights for g in sensitivity.outer)
    floats = sensitivity.other_parameters - outer if sensitivity.outer else 0
    bits = budget.layer_bits(sensitivity.weights + allocated, sensitivity.other_parameters - allocated - floats, floats)
    if bits <= 0:
        raise BudgetError(f"{budget} leaves no bits for the quantized layers after the other "
                          f"{sensitivity.other_parameters:,} parameters; raise it")
    return bits


def _damage(group: GroupSensitivity, choice: Choice, damage: str) -> float | None:
    found = group.find(choice)
    return group_damages(group, damage)[found.choice] if found is not None and damage in ("kl", "proxy") else None


def _plan(sensitivity: Sensitivity, chosen: dict[str, Choice], damage: str, budget: Budget | None,
          groups: list[GroupSensitivity] | None = None) -> Plan:
    layers = [
        LayerPlan(name, group.name, chosen[group.name].option, chosen[group.name].solver, shape,
                  _damage(group, chosen[group.name], damage))
        for group in (_allocated_groups(sensitivity, budget) if groups is None else groups)
        for name, shape in zip(group.layers, group.shapes)
    ]
    return Plan(layers, dict(sensitivity.model), budget.as_dict() if budget else {}, damage)

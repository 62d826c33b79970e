"""Selective KL: the KL measured only where a budget's plan depends on it, the rest predicted from the proxy."""

import math

import pytest

from mixbits.allocate import Budget
from mixbits.measure import measure
from mixbits.menu import parse_menu
from mixbits.mixes import allocated_plan
from mixbits.plan import KEEP
from mixbits.selective import anchor, predicted_kl
from mixbits.sensitivity import GroupSensitivity, OptionDamage

from test_mixed import tiny_llama, windows

MENU = "int2:g16:asym@rtn,int3:g16:asym@rtn,int4:g16:asym@rtn,int5:g16:asym@rtn,int6:g16:asym@rtn,int8:ch:sym@rtn,fp16"
SETTINGS = {"calibration": windows(), "kl_windows": 2, "kl_len": 16, "fisher_windows": 2, "progress": False}


def test_unmeasured_kl_is_the_proxy_times_the_groups_measured_ratio():
    options = [OptionDamage("int2:g16:asym", "rtn", 100, 1.0, 0.0, None, 0.0),
               OptionDamage("int3:g16:asym", "rtn", 150, 2.0, 0.0, 4.0, 0.0),   # KL / proxy = 2
               OptionDamage("int4:g16:asym", "rtn", 200, 8.0, 0.0, 8.0, 0.0),   # KL / proxy = 1
               OptionDamage(KEEP, "rtn", 800, 0.5, 0.0, 0.5, 0.0)]              # fp16: not a ratio
    group = GroupSensitivity("g", ["model.layers.0.mlp.down_proj"], [(10, 10)], 0, options)
    predicted = predicted_kl(group)
    assert predicted[options[0].choice] == pytest.approx(math.sqrt(2))  # geometric mean of 2 and 1
    assert [predicted[o.choice] for o in options[1:]] == [4.0, 8.0, 0.5]
    assert anchor([o.choice for o in options], lambda c: group.bits(c)) == options[1].choice  # median quantized


def test_a_measurement_for_a_budget_has_the_kls_its_plan_needs_and_they_equal_the_full_ones():
    model, menu, budget = tiny_llama(), parse_menu(MENU), Budget(4.5)
    full = measure(model, menu, **SETTINGS)
    selective = measure(model, menu, kl_budgets=[budget], **SETTINGS)
    measured = [(g.name, o) for g in selective.groups for o in g.options if o.kl is not None and o.option != KEEP]
    everything = sum(o.option != KEEP for g in full.groups for o in g.options)
    assert len(measured) < everything
    truth = {(g.name, o.choice): o for g in full.groups for o in g.options}
    for name, option in measured:
        assert option.kl == pytest.approx(truth[name, option.choice].kl, rel=1e-9)
        assert option.proxy == pytest.approx(truth[name, option.choice].proxy, rel=1e-9)

    plan = allocated_plan(selective, budget, "kl")
    chosen = {layer.group: (layer.option, layer.solver) for layer in plan.layers}
    for group in selective.groups:
        ordered = sorted(group.options, key=lambda o: o.bits)
        at = next(i for i, o in enumerate(ordered) if (o.option, o.solver) == chosen[group.name]
                  or o.option == KEEP == chosen[group.name][0])
        assert all(o.kl is not None for o in ordered[max(at - 1, 0):at + 2])  # the chosen one and its neighbours
    # Allocated from measured KLs only where it matters, the plan is as good as the full measurement's here.
    best = allocated_plan(full, budget, "kl")
    true_kl = {(g.name, o.option): o.kl for g in full.groups for o in g.options}
    found = sum(true_kl[g, option] for g, (option, _) in chosen.items())
    optimal = sum(true_kl[l.group, l.option] for l in {l.group: l for l in best.layers}.values())
    assert found <= optimal * 1.02


def test_later_rounds_take_the_first_rounds_solutions_and_measure_the_same(monkeypatch):
    """Options whose KL a later round measures are solved once (the first round keeps them); with nothing kept,
    they are solved again, to the same damages."""
    import mixbits.damage as damage

    model, menu, budget = tiny_llama(), parse_menu(MENU), Budget(4.5)
    solved = []

    def counting(matrices, formats, *args, **kwargs):
        solved.extend((float(matrices[0].double().sum()), str(fmt)) for fmt in formats)  # group, option
        return solve_options(matrices, formats, *args, **kwargs)

    solve_options = damage.solve_options
    monkeypatch.setattr(damage, "solve_options", counting)
    kept = measure(model, menu, kl_budgets=[budget], **SETTINGS)
    assert len(solved) == len(set(solved)) == sum(len(g.options) for g in kept.groups)
    solved.clear()
    monkeypatch.setattr(damage, "KEPT_CODES", 0)
    again = measure(model, menu, kl_budgets=[budget], **SETTINGS)
    assert len(solved) > len(set(solved))
    for first, second in zip(kept.groups, again.groups):
        assert [(o.proxy, o.kl) for o in first.options] == [(o.proxy, o.kl) for o in second.options]


def test_plans_at_other_budgets_are_told_apart_and_a_sweep_says_so(capsys):
    """A table measured for 4.5 bpw holds every KL its plan takes and not all that a 3.25 bpw plan takes; a sweep
    allocating from it names the budgets that rest on predictions."""
    from mixbits.selective import predicted_groups
    from mixbits.sweep import sweep

    model, menu = tiny_llama(), parse_menu(MENU)
    selective = measure(model, menu, kl_budgets=[Budget(4.5)], **SETTINGS)
    kls = {(g.name, o.option, o.solver): o.kl for g in selective.groups for o in g.options}
    for budget in (4.5, 3.25):
        plan = allocated_plan(selective, Budget(budget), "kl")
        unmeasured = {layer.group for layer in plan.layers if kls[layer.group, layer.option, layer.solver] is None}
        assert predicted_groups(selective, plan) == unmeasured
        assert bool(unmeasured) == (budget == 3.25)
    capsys.readouterr()
    sweep(None, selective, menu, [3.25, 4.5], [], series=("allocated",), calibration=None, references=[None],
          skip={("allocated", "3.25 bpw"), ("allocated", "4.5 bpw")})
    assert "sweep: the allocated plans at 3.25 bpw take options whose KL was predicted" in capsys.readouterr().err

"""A plan to a budget in one call: the sensitivity reused from its file (options it lacks measured and added),
or measured now, then allocated.

    plan, sensitivity = mixbits.plan_for_budget(loaded, mixbits.Budget(3.0), sensitivity="sens.json")
    mixbits.quantize(loaded, plan=plan)

This is what `mixbits plan`, `mixbits quantize --bpw` and `mixbits sweep` do; the CLI only parses and prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from . import defaults
from .allocate import Budget
from .calibrate import calibration_name
from .errors import MixbitsError
from .measure import measure
from .sensitivity import Sensitivity, SensitivityError
from .menu import Choice, Pin, parse_menu
from .mixes import allocated_plan, check_budget
from .models.loaded import LoadedModel
from .models.loader import load_model
from .models.structure import outer_layers
from .plan import Plan
from .selective import predicted_groups
from .solvers import GptqSettings


def sensitivity_for(
    loaded: LoadedModel | nn.Module,
    menu: list[Choice] | None = None,
    *,
    path: str | Path | None = None,
    damage: str = "kl",
    pins: list[Pin] = (),
    target: str | None = None,
    calibration: str | Path | torch.Tensor | None = None,
    calibration_windows: int = defaults.CALIBRATION_WINDOWS,
    calibration_len: int = defaults.CALIBRATION_LEN,
    gptq: GptqSettings | None = None,
    clip_search: bool = True,
    kl_windows: int = defaults.KL_WINDOWS,
    kl_len: int = defaults.KL_LEN,
    fisher_windows: int = defaults.FISHER_WINDOWS,
    ties: bool = True,
    outer: bool = False,
    resume: str | Path | None = None,
    cluster=None,
    kl_budgets: list[Budget] | None = None,
    progress: bool = True,
) -> Sensitivity:
    """The damage of every option of `menu` (None: the default menu) on every layer group of `loaded`, and with
    `outer` on the embedding and an untied head (what budgets over the whole model allocate too).

    With `path` naming an existing file, its measurements are reused after checking they were taken on this model,
    calibration, GPTQ settings and clip search; options it lacks are measured alike and written back. With `path`
    naming no file yet, the measurement is saved there. `damage` "kl" measures the KL (slow), "proxy" only the proxy.
    `resume` is a folder that keeps finished measurements for a rerun after an interruption, `cluster` a Ray
    cluster to measure on, `kl_budgets` the budgets whose plans the KL is measured for (None: every option's;
    `measure`; options added to a file, or the embedding and head, are measured in full, as their budget's plan
    depends on the rest of the file). A file measured for other budgets is reused, its missing KLs predicted, with a
    warning when the plan depends on them.
    """
    menu = parse_menu(None) if menu is None else menu
    gptq = GptqSettings() if gptq is None else gptq
    if damage not in ("kl", "proxy"):
        raise MixbitsError(f"damage must be 'kl' or 'proxy', got {damage!r}")
    loaded = load_model(loaded)  # an nn.Module is named by its weights' digest, which a file's reuse checks

    def measured(options: list[Choice], kl: bool, blocks: bool = True, selective: bool = False) -> Sensitivity:
        return measure(loaded, options, calibration=calibration, calibration_windows=calibration_windows,
                       calibration_len=calibration_len, pins=pins, ties=ties, kl=kl, kl_windows=kl_windows,
                       kl_len=kl_len, fisher_windows=fisher_windows, target=target, clip_search=clip_search,
                       gptq=gptq, outer=outer, blocks=blocks, resume=resume, cluster=cluster,
                       kl_budgets=kl_budgets if kl and selective else None, progress=progress)

    if path is None or not Path(path).exists():
        found = measured(menu, kl=damage == "kl", selective=True)
        if path is not None:
            found.save(path)
        return found

    found = Sensitivity.load(path)
    outer = outer or bool(found.outer)  # its embedding and head measurements are kept up with the menu too
    if isinstance(calibration, torch.Tensor):  # the windows are given: their own count and length
        calibration_windows, calibration_len = calibration.shape
    found.check(loaded, [], target, calibration=(calibration_name(calibration), calibration_windows, calibration_len),
                gptq=gptq, clip_search=clip_search)
    if damage not in found.damages:
        raise SensitivityError(f"{path} holds no {damage} damage; use --damage proxy or measure again")
    lacks_outer = outer and not found.outer and bool(outer_layers(loaded.model))
    missing = found.missing(menu, target)
    if not missing and not lacks_outer:
        if progress:
            print(f"sensitivity: reusing {path}", file=sys.stderr)
        return found
    if found.kl_windows and found.kl_windows != {"count": kl_windows, "length": kl_len}:
        raise SensitivityError(f"{path} measured its KL on {found.kl_windows['count']} x {found.kl_windows['length']} "
                               "tokens; pass the same --kl-windows/--kl-window-len to add options to it")
    if lacks_outer:
        if progress:
            print(f"sensitivity: measuring the embedding and head, missing from {path}", file=sys.stderr)
        found = found.extended(measured(menu, kl=bool(found.kl_windows), blocks=False))
        missing = found.missing(menu, target)
    if missing:
        if progress:
            print(f"sensitivity: measuring {', '.join(map(str, missing))}, missing from {path}", file=sys.stderr)
        found = found.extended(measured(missing, kl=bool(found.kl_windows)))
    found.save(path)
    return found


def plan_for_budget(
    loaded: LoadedModel | nn.Module,
    budget: Budget,
    menu: list[Choice] | None = None,
    *,
    sensitivity: Sensitivity | str | Path | None = None,
    damage: str = "kl",
    pins: list[Pin] = (),
    target: str | None = None,
    kl_all: bool = False,
    progress: bool = True,
    **measure_options,
) -> tuple[Plan, Sensitivity]:
    """The least-damage plan of `menu`'s options within `budget`, and the sensitivity it was allocated from.

    `sensitivity` is a measured table, a file to reuse or write (see `sensitivity_for`, which also takes
    `measure_options`), or None to measure now. The budget is checked against the model before any measuring.
    A new measurement takes the KL only where this budget's plan depends on it, or with `kl_all` of every option
    (slower; the table then serves any budget).
    """
    menu = parse_menu(None) if menu is None else menu
    loaded = load_model(loaded)
    check_budget(loaded.model, menu, list(pins), budget, target)
    if not isinstance(sensitivity, Sensitivity):
        sensitivity = sensitivity_for(loaded, menu, path=sensitivity, damage=damage, pins=pins, target=target,
                                      outer=budget.whole_model, kl_budgets=None if kl_all else [budget],
                                      progress=progress, **measure_options)
    plan = allocated_plan(sensitivity, budget, damage, list(pins), menu)
    if damage == "kl" and progress:
        predicted = predicted_groups(sensitivity, plan)
        if predicted:
            print(f"plan: {len(predicted)} groups take options whose KL was predicted from the proxy, not measured "
                  "(the sensitivity was measured for other budgets); measure with --kl-all for this one",
                  file=sys.stderr)
    return plan, sensitivity

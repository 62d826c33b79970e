"""Measure the damage of each option on each group of tied layers (`layer_stats`, `damage`, `sensitivity`).

The statistics pass runs once; then every (group, options) job measures one
group on the float model, locally or on Ray workers (`distributed`), each
kept in a resume folder as it finishes (`resume`). The options are quantized
from the float model's statistics, each group on its own; `quantize` later
solves them block-sequentially, so a plan's realised damage differs somewhat
from the sum of the measured ones.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from . import defaults
from .calibrate import calibration_data
from .damage import GroupMeter, group_stats
from .hashing import sha256_state_dict, sha256_tensor
from .layer_stats import layer_statistics
from .menu import Choice, Pin, check_pins_match, group_choices, parse_menu
from .models.loaded import LoadedModel
from .models.registry import adapter_for
from .models.structure import outer_layers, output_head, quantizable_linears, transformer_blocks
from .resume import RunState
from .selective import anchor, undecided
from .sensitivity import GroupSensitivity, Sensitivity, group_dict, group_from_dict, group_name, other_parameters
from .solvers import GptqSettings

if TYPE_CHECKING:
    from .allocate import Budget
    from .distributed import Cluster


def _kept_group(state: RunState, index: int, layers: list[str], choices: list[Choice],
                complete: bool) -> GroupSensitivity | None:
    """Group `index`'s kept measurements, if they are of these layers under these choices (and if `complete`, hold
    every option's KL)."""
    found = state.load(f"group-{index:04d}")
    try:
        group = group_from_dict(found[0]) if found is not None else None
    except (KeyError, TypeError, ValueError):
        return None
    if group is None or group.layers != layers or [o.choice for o in group.options] != list(choices):
        return None
    if complete and any(o.kl is None for o in group.options):
        return None
    return group


@torch.no_grad()
def measure(
    model: nn.Module | LoadedModel,
    menu: list[Choice] | None = None,
    *,
    calibration: str | Path | torch.Tensor | None = None,
    calibration_windows: int = defaults.CALIBRATION_WINDOWS,
    calibration_len: int = defaults.CALIBRATION_LEN,
    pins: list[Pin] = (),
    ties: bool = True,
    kl: bool = True,
    kl_windows: int = defaults.KL_WINDOWS,
    kl_len: int = defaults.KL_LEN,
    fisher_windows: int = defaults.FISHER_WINDOWS,
    clip_search: bool = True,
    target: str | None = None,
    gptq: GptqSettings = GptqSettings(),
    outer: bool = False,
    blocks: bool = True,
    resume: str | Path | None = None,
    cluster: "Cluster | None" = None,
    kl_budgets: "list[Budget] | None" = None,
    progress: bool = True,
) -> Sensitivity:
    """Damage of each option of `menu` (default: `menu.DEFAULT_OPTIONS`) and of any pinned option,
    on every group of the float `model`.

    Calibration windows come from `calibration` (None: the default calibration
    mix; a source name, text file or folder; or a [windows, tokens] tensor of
    token ids): all give H, the first `fisher_windows` the Fisher, the first
    `kl_windows` cut to `kl_len` tokens the measured KL (skipped without
    `kl`). `ties` groups Linears that read the same input; otherwise every
    Linear is its own group. A pinned group is measured under its pin too;
    with a `target` ("gguf"), a group only under options that target can hold.
    `gptq` is how GPTQ options are solved (as `quantize` will solve them).
    `outer` also measures the input embedding (under the options it can look
    up, rounded to nearest; a head tied to it changes with it) and an output
    head with its own weight (`models.structure.outer_layers`), for budgets
    over the whole model; `blocks=False` measures only those. With `resume` (a folder), each group's
    measurements are kept there as they finish, and a run with the same settings takes them instead of measuring
    again (`resume.RunState`). With a `cluster` (`distributed.Cluster`), the groups are measured by Ray workers,
    with the same results. With `kl_budgets`, the KL is measured only where plans at those budgets depend on it
    (`selective`); the other options' KL is None, predicted from the proxy when allocating.
    """
    menu = parse_menu(None) if menu is None else menu
    windows, spec = calibration_data(model, calibration, calibration_windows, calibration_len)
    identity = {"name": model.name, "sha256": model.sha256} if isinstance(model, LoadedModel) else {}
    model = model.model if isinstance(model, LoadedModel) else model
    adapter_for(model).prepare(model)
    linears = quantizable_linears(model)
    outside = outer_layers(model) if outer else []
    modules = dict(linears + outside)
    check_pins_match(list(pins), [name for name, _ in linears + outer_layers(model)])
    prefix, block_list = transformer_blocks(model)
    timer = time.perf_counter()
    stats, shared = layer_statistics(model, windows, min(fisher_windows, len(windows)), progress, outer=bool(outside))
    seconds = {"statistics": time.perf_counter() - timer, "quantize": 0.0, "kl": 0.0}
    grouping = (shared if ties else [[name] for name, _ in linears]) if blocks else []
    head = output_head(model)

    plans = []  # (layers, block, choices)
    for layers in grouping:
        shapes = [tuple(modules[name].weight.shape) for name in layers]
        block = int(layers[0][len(prefix) + 1:].split(".")[0])
        plans.append((layers, block, group_choices(layers, shapes, list(menu), list(pins), target)))
    for name, module in outside:
        embedding = isinstance(module, nn.Embedding)
        choices = group_choices([name], [tuple(module.weight.shape)], list(menu), list(pins), target, embedding)
        plans.append(([name], -1 if embedding else len(block_list), choices))
    selective = kl and kl_budgets is not None
    state = None if resume is None else RunState(resume, {
        "run": "measure", "model": identity or sha256_state_dict(model), "windows": sha256_tensor(windows),
        "groups": [[layers, [str(c) for c in choices]] for layers, _, choices in plans], "kl": kl,
        "kl_windows": kl_windows, "kl_len": kl_len, "fisher_windows": fisher_windows, "clip_search": clip_search,
        "gptq": gptq.measurement_key()})
    # A selective run's groups lack some KLs: a run measuring every KL takes them again, one for other budgets
    # measures what they lack.
    kept = [_kept_group(state, index, layers, choices, complete=kl and not selective) if state else None
            for index, (layers, _, choices) in enumerate(plans)]
    todo = [index for index, group in enumerate(kept) if group is None]
    results = dict(enumerate(kept))
    kl_windows_used = windows[:kl_windows, :kl_len] if kl else None
    meter = None

    def run(jobs: list[tuple[int, list[Choice], set[Choice] | None]], finished) -> None:
        """Measure (group index, choices, choices to measure the KL of) jobs, locally or on the cluster, calling
        `finished(index, group)` as each is done."""
        nonlocal meter
        if cluster is not None:
            from .distributed import measure_groups

            spent = measure_groups(model, [(index, plans[index][0], plans[index][1], choices,
                                            group_stats(stats, plans[index][0], head), kl_for)
                                           for index, choices, kl_for in jobs],
                                   kl_windows_used, clip_search, gptq, bool(outside), cluster, finished)
        else:
            before = dict(meter.seconds) if meter is not None else {}
            if meter is None:
                meter = GroupMeter(model, kl_windows_used, clip_search, gptq, bool(outside))
            for index, choices, kl_for in jobs:
                finished(index, meter.measure(plans[index][0], plans[index][1], choices, stats, kl_for))
            spent = {key: value - before.get(key, 0.0) for key, value in meter.seconds.items()}
        for key, value in spent.items():
            seconds[key] += value

    def keep(index: int, group: GroupSensitivity) -> None:
        results[index] = group
        if state is not None:
            state.save(f"group-{index:04d}", group_dict(group))

    def first(index: int) -> set[Choice] | None:
        """With budgets, the first pass measures each group's KL at its anchor only."""
        if not selective:
            return None
        layers, block, choices = plans[index]
        probe = GroupSensitivity(group_name(layers), layers, [tuple(modules[n].weight.shape) for n in layers], block, [])
        return {anchor(choices, probe.bits)}

    total = sum(len(plans[index][2]) for index in todo)
    with tqdm(total=total, desc="measure", disable=not progress, leave=False) as bar:
        if todo:
            run([(index, plans[index][2], first(index)) for index in todo],
                lambda index, group: (keep(index, group), bar.update(len(group.options))))

    def table() -> Sensitivity:
        groups = [results[index] for index in range(len(plans))]
        kl_spec = {"count": min(kl_windows, len(windows)), "length": min(kl_len, windows.shape[1])} if kl else None
        return Sensitivity(groups[:len(grouping)], identity, spec, kl_spec, other_parameters(model, linears),
                           seconds, groups[len(grouping):])

    def merge(index: int, group: GroupSensitivity) -> None:
        """The KLs measured in a later round put into the group's options."""
        found = {o.choice: o for o in group.options}
        for option in results[index].options:
            if option.choice in found:
                option.kl = found[option.choice].kl
                option.seconds += found[option.choice].seconds
        keep(index, results[index])

    spec["fisher_windows"] = min(fisher_windows, len(windows))
    spec["gptq"] = gptq.measurement_key()
    spec["clip_search"] = clip_search
    index_of = {group_name(layers): index for index, (layers, _, _) in enumerate(plans)}
    for budget in kl_budgets if selective else ():
        # Allocate from the predictions, measure the KLs the plan hinges on, until it hinges on measured ones only.
        while needed := undecided(table(), budget, list(pins), None):
            if progress:
                print(f"measure: the KL of {sum(map(len, needed.values()))} more options for the plan at {budget}",
                      file=sys.stderr)
            run([(index_of[name], choices, None) for name, choices in needed.items()], merge)
    if state is not None and state.kept and progress:
        print(f"measure: {len(state.kept)} measured groups taken from {state.root}", file=sys.stderr)
    return table()

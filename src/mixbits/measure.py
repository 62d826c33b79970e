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
from .sensitivity import GroupSensitivity, Sensitivity, group_dict, group_from_dict, other_parameters
from .solvers import GptqSettings

if TYPE_CHECKING:
    from .distributed import Cluster


def _kept_group(state: RunState, index: int, layers: list[str], choices: list[Choice]) -> GroupSensitivity | None:
    """Group `index`'s kept measurements, if they are of these layers under these choices."""
    found = state.load(f"group-{index:04d}")
    try:
        group = group_from_dict(found[0]) if found is not None else None
    except (KeyError, TypeError, ValueError):
        return None
    if group is None or group.layers != layers or [o.choice for o in group.options] != list(choices):
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
    with the same results.
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
    state = None if resume is None else RunState(resume, {
        "run": "measure", "model": identity or sha256_state_dict(model), "windows": sha256_tensor(windows),
        "groups": [[layers, [str(c) for c in choices]] for layers, _, choices in plans], "kl": kl,
        "kl_windows": kl_windows, "kl_len": kl_len, "fisher_windows": fisher_windows, "clip_search": clip_search,
        "gptq": gptq.as_dict()})
    kept = [_kept_group(state, index, layers, choices) if state else None
            for index, (layers, _, choices) in enumerate(plans)]
    todo = [index for index, group in enumerate(kept) if group is None]
    results = dict(enumerate(kept))
    kl_windows_used = windows[:kl_windows, :kl_len] if kl else None

    def finished(index: int, group: GroupSensitivity) -> None:
        results[index] = group
        if state is not None:
            state.save(f"group-{index:04d}", group_dict(group))

    total = sum(len(plans[index][2]) for index in todo)
    with tqdm(total=total, desc="measure", disable=not progress, leave=False) as bar:
        if todo and cluster is not None:
            from .distributed import measure_groups

            jobs = [(index, *plans[index], group_stats(stats, plans[index][0], head)) for index in todo]
            spent = measure_groups(model, jobs, kl_windows_used, clip_search, gptq, bool(outside), cluster,
                                   lambda index, group: (finished(index, group), bar.update(len(group.options))))
        elif todo:
            meter = GroupMeter(model, kl_windows_used, clip_search, gptq, bool(outside))
            for index in todo:
                finished(index, meter.measure(*plans[index], stats))
                bar.update(len(plans[index][2]))
            spent = meter.seconds
        for key, value in (spent if todo else {}).items():
            seconds[key] += value
    groups = [results[index] for index in range(len(plans))]
    if state is not None and state.kept and progress:
        print(f"measure: {len(state.kept)} measured groups taken from {state.root}", file=sys.stderr)
    spec["fisher_windows"] = min(fisher_windows, len(windows))
    spec["gptq"] = gptq.as_dict()
    spec["clip_search"] = clip_search
    kl_spec = {"count": min(kl_windows, len(windows)), "length": min(kl_len, windows.shape[1])} if kl else None
    return Sensitivity(groups[:len(grouping)], identity, spec, kl_spec, other_parameters(model, linears), seconds,
                       groups[len(grouping):])

"""Where the sensitivity measurement's time goes, and what solving a group's options in one pass saves.

On the default model and menu (the settings of bench/results/mixed/sensitivity.json): the statistics pass,
then for every group its options quantized one at a time (`solve_many` per option, as the measurement did
before) and in one pass (`solve_options`, as it does now), checked equal; then the full measurement of every
group (`damage.GroupMeter`: quantizing, proxies, KL on 4x128 tokens), whose damages are compared with the
committed file's. One process, one run: the ratios are side by side.

    python bench/measure_time.py              # about 25 minutes
    python bench/measure_time.py --groups 2   # a check of the script on the first groups; writes nothing
"""

from __future__ import annotations

import argparse
import time

import torch

from mixbits import defaults
from mixbits.calibrate import calibration_data
from mixbits.damage import GroupMeter
from mixbits.layer_stats import LayerStats, layer_statistics
from mixbits.menu import group_choices, parse_menu
from mixbits.models import load_model
from mixbits.models.registry import adapter_for
from mixbits.models.structure import quantizable_linears, transformer_blocks
from mixbits.record import provenance
from mixbits.report import format_table
from mixbits.sensitivity import Sensitivity
from mixbits.solvers import GptqSettings, solve_many, solve_options

from common import RESULTS, write_results

NAME = "measure_time"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=None, help="only the first N groups; nothing is written")
    only = parser.parse_args().groups
    committed = Sensitivity.load(RESULTS / "mixed" / "sensitivity.json")
    loaded = load_model()
    record = provenance(loaded.name, loaded.sha256)
    model = loaded.model
    adapter_for(model).prepare(model)
    windows, record["calibration"] = calibration_data(loaded, None, defaults.CALIBRATION_WINDOWS,
                                                      defaults.CALIBRATION_LEN)
    menu, settings = parse_menu(None), GptqSettings()
    modules = dict(quantizable_linears(model))
    prefix, _ = transformer_blocks(model)

    timer = time.perf_counter()
    stats, groups = layer_statistics(model, windows, defaults.FISHER_WINDOWS, False)
    statistics = time.perf_counter() - timer

    plans, one_by_one, one_pass, unequal = [], 0.0, 0.0, 0
    for layers in groups[:only]:
        weights = [modules[name].weight.detach() for name in layers]
        choices = group_choices(layers, [tuple(w.shape) for w in weights], menu, [], None)
        plans.append((layers, int(layers[0][len(prefix) + 1:].split(".")[0]), choices))
        hessian = stats[layers[0]].hessian if isinstance(stats[layers[0]], LayerStats) else None
        formats = [choice.format for choice in choices]
        timer = time.perf_counter()
        alone = [solve_many(weights, fmt, "gptq", hessian, True, settings) for fmt in formats]
        one_by_one += time.perf_counter() - timer
        timer = time.perf_counter()
        together = solve_options(weights, formats, "gptq", hessian, True, settings)
        one_pass += time.perf_counter() - timer
        for first, second in zip(alone, together):
            for a, b in zip(first, second):
                unequal += not ((a is None and b is None) or torch.equal(a.dequantize(), b.dequantize()))
        print(f"{layers[0]}: one by one {one_by_one:.0f} s, one pass {one_pass:.0f} s", flush=True)

    meter = GroupMeter(model, windows[:defaults.KL_WINDOWS, :defaults.KL_LEN], True, settings, False)
    measured = [meter.measure(layers, block, choices, stats) for layers, block, choices in plans]
    by_name = {group.name: group for group in committed.groups}
    proxy_error = kl_error = 0.0
    for group in measured:
        for option in group.options:
            old = by_name[group.name].find(option.choice)
            proxy_error = max(proxy_error, abs(option.proxy / old.proxy - 1) if old.proxy else 0.0)
            if option.option != "fp16" and old.kl:
                kl_error = max(kl_error, abs(option.kl / old.kl - 1))
    options = sum(len(choices) for _, _, choices in plans)
    record.update({
        "groups": len(plans), "options": options, "statistics_s": statistics,
        "quantize_one_by_one_s": one_by_one, "quantize_one_pass_s": one_pass, "unequal_results": unequal,
        "measurement_s": {"statistics": statistics, **meter.seconds},
        "max_relative_difference_from_committed": {"proxy": proxy_error, "kl": kl_error},
    })
    total = statistics + meter.seconds["quantize"] + meter.seconds["kl"]
    rows = [["statistics (H, Fisher)", f"{statistics:.0f}", f"{statistics:.0f}"],
            ["quantizing every option (GPTQ only)", f"{one_by_one:.0f}", f"{one_pass:.0f}"],
            ["quantizing and proxies (measurement)", "—", f"{meter.seconds['quantize']:.0f}"],
            ["KL of every option", "—", f"{meter.seconds['kl']:.0f}"],
            ["measurement in all", "—", f"{total:.0f}"]]
    header = (f"# Measurement time on the default model\n\n`python bench/measure_time.py` — "
              f"{time.strftime('%Y-%m-%d')}. {loaded.name}, default menu ({len(menu)} options), {len(plans)} groups, "
              f"{options} (group, option) pairs; calibration {len(windows)}x{windows.shape[1]} tokens, Fisher on "
              f"{defaults.FISHER_WINDOWS} windows, KL on {defaults.KL_WINDOWS}x{defaults.KL_LEN} tokens. Seconds, one "
              f"run, side by side: every group's options quantized one at a time (as before) and in one GPTQ pass "
              f"(now); {unequal} of {options} results differ between the two. The full measurement's damages against "
              f"the committed bench/results/mixed/sensitivity.json (measured on another machine): proxies within "
              f"{proxy_error:.1e} relative, KLs within {kl_error:.1e}.\n")
    table = format_table(["step", "one option at a time (s)", "one pass per group (s)"], rows)
    if only is None:
        write_results(NAME, record, header + "\n" + table)
    print(header + "\n" + table)


if __name__ == "__main__":
    main()

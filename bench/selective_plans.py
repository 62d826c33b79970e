"""Selective KL on the model: measurement time and the plans' perplexity against the full measurement's.

On the default model and menu: `measure(kl_budgets=[3.0 bpw])` (what `mixbits quantize --bpw 3.0` measures),
timed, with its groups kept in a resume folder; then the same for 2.5 and 3.5 bpw, taking the kept groups and
measuring only the KLs those plans add (the statistics are computed again). The plans at 2.5, 3.0 and 3.5 bpw
allocated from this table and from the full measurement (bench/results/mixed/sensitivity.json, every KL
measured) are quantized (block-sequential GPTQ, the default calibration) and evaluated on every domain of the
protocol; a plan equal to the full one's is scored once. The plans come from the table measured for all three
budgets, so the 3.0 bpw plan may rest on a few KLs the other budgets' rounds added.

    python bench/selective_plans.py
"""

from __future__ import annotations

import copy
import gc
import shutil
import tempfile
import time
from pathlib import Path

from mixbits.allocate import Budget
from mixbits.eval import evaluate_domains
from mixbits.measure import measure
from mixbits.mixes import allocated_plan
from mixbits.plan import KEEP
from mixbits.quantize import quantize
from mixbits.report import format_table
from mixbits.sensitivity import Sensitivity

from common import RESULTS, calibrated_protocol, fp32_references, pct, write_results

NAME = "selective_plans"
BUDGETS = (2.5, 3.0, 3.5)
FIRST = 3.0  # the budget measured from scratch


def measured_kls(sensitivity: Sensitivity) -> int:
    return sum(o.kl is not None and o.option != KEEP for g in sensitivity.groups for o in g.options)


def main() -> None:
    full = Sensitivity.load(RESULTS / "mixed" / "sensitivity.json")
    loaded, domains, record, windows = calibrated_protocol()
    references = fp32_references(loaded, domains, record)
    names = [d.name for d in domains]
    resume = Path(tempfile.mkdtemp(prefix="selective-"))
    try:
        timer = time.perf_counter()
        first = measure(loaded, calibration=windows, kl_budgets=[Budget(FIRST)], resume=resume)
        first_seconds = time.perf_counter() - timer
        timer = time.perf_counter()
        table = measure(loaded, calibration=windows, kl_budgets=[Budget(b) for b in BUDGETS], resume=resume)
        more_seconds = time.perf_counter() - timer
    finally:
        shutil.rmtree(resume)
    total = sum(o.option != KEEP for g in full.groups for o in g.options)
    record.update({"budgets": list(BUDGETS), "first_budget": FIRST, "first_seconds": first_seconds,
                   "first_split": first.seconds, "first_kls": measured_kls(first), "more_seconds": more_seconds,
                   "kls": measured_kls(table), "kls_full": total, "full_seconds": full.seconds, "plans": []})

    scored = {}

    def score(plan) -> dict:
        key = tuple((layer.name, layer.option, layer.solver) for layer in plan.layers)
        if key not in scored:
            quantized = copy.deepcopy(loaded.model)
            timer = time.perf_counter()
            quantize(quantized, plan=plan, calibration=windows, progress=False)
            seconds = time.perf_counter() - timer
            result = evaluate_domains(quantized, domains, references, progress=False)
            del quantized
            gc.collect()
            scored[key] = {"quantize_seconds": seconds, "bits_per_weight": plan.bits_per_weight,
                           "perplexity": {d.name: r.perplexity for d, r in zip(domains, result.results)},
                           "delta": {d.name: result.delta(r) for d, r in zip(domains, result.results)}}
        return scored[key]

    rows = []
    for bpw in BUDGETS:
        plans = {"selective": allocated_plan(table, Budget(bpw), "kl"), "full": allocated_plan(full, Budget(bpw), "kl")}
        full_options = {layer.name: layer.option for layer in plans["full"].layers}
        same = sum(layer.option == full_options[layer.name] for layer in plans["selective"].layers)
        for kind, plan in plans.items():
            found = score(plan)
            record["plans"].append({"budget": bpw, "table": kind, "layers_as_full": same, **found})
            rows.append([f"{bpw:g}", kind, f"{found['bits_per_weight']:.3f}", f"{same} of {len(plan.layers)}"]
                        + [f"{found['perplexity'][n]:.2f} ({pct(found['delta'][n])})" for n in names])
        print(rows[-2], rows[-1], flush=True)
    first_split = ", ".join(f"{key} {value:.0f} s" for key, value in first.seconds.items())
    header = (f"# Selective KL: measurement time and plans against the full measurement\n\n"
              f"`python bench/selective_plans.py` — {time.strftime('%Y-%m-%d')}. {loaded.name}, default menu; the "
              f"measurement for {FIRST:g} bpw from scratch took {first_seconds:.0f} s ({first_split}) with "
              f"{record['first_kls']} of {total} KLs measured; adding {', '.join(f'{b:g}' for b in BUDGETS if b != FIRST)} "
              f"bpw took {more_seconds:.0f} s more (statistics again, then the KLs those plans add: "
              f"{record['kls']} of {total} in all). Full table: bench/results/mixed/sensitivity.json, every KL measured "
              f"(on another machine). Each plan quantized by block-sequential GPTQ on the default calibration and "
              f"evaluated on every domain (fp32: "
              + ", ".join(f"{n} {record['fp32_perplexity'][n]:.2f}" for n in names) + ").\n")
    table_md = format_table(["budget (bpw)", "KL table", "bpw", "layers as the full plan"]
                            + [f"ppl {n} (Δ)" for n in names], rows)
    write_results(NAME, record, header + "\n" + table_md)
    print(header + "\n" + table_md)


if __name__ == "__main__":
    main()

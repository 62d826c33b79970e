"""The selective measurement for 3.0 bpw as `mixbits quantize --bpw 3.0` runs it, with and without three savings.

Side by side in one process on the default model and menu, `measure(kl_budgets=[3.0 bpw])`:
- before: the statistics' X^T X converted to float64 window by window (`calibrate.FLUSH_ROWS` = 1), every
  option's groups fitted alone in GPTQ (no `gptq.affine_cohort`), and later rounds solving their options again
  (`damage.KEPT_CODES` = 0);
- now: float32 products summed over 4096 rows before float64, integer options of one group size fitted in one
  clip search, and the first round's solutions kept for the later rounds.
The two tables are compared: the options whose KL was measured, and the damages (the Hessians differ in float
rounding only).

    python bench/selective_time.py   # about 30 minutes
"""

from __future__ import annotations

import time
from importlib import import_module

from mixbits import calibrate, damage
from mixbits.allocate import Budget
from mixbits.measure import measure
from mixbits.models import load_model
from mixbits.record import provenance
from mixbits.report import format_table

from common import write_results

NAME = "selective_time"
gptq = import_module("mixbits.solvers.gptq")  # the module: the package exports its function of that name
BUDGET = 3.0


def measured(before: bool):
    saved = calibrate.FLUSH_ROWS, damage.KEPT_CODES, gptq.affine_cohort
    if before:
        calibrate.FLUSH_ROWS, damage.KEPT_CODES, gptq.affine_cohort = 1, 0, lambda fmt: None
    try:
        timer = time.perf_counter()
        found = measure(load_model(), kl_budgets=[Budget(BUDGET)], progress=False)
        return found, time.perf_counter() - timer
    finally:
        calibrate.FLUSH_ROWS, damage.KEPT_CODES, gptq.affine_cohort = saved


def main() -> None:
    runs = {name: measured(name == "before") for name in ("before", "now")}
    (old, old_seconds), (new, new_seconds) = runs["before"], runs["now"]
    record = provenance(new.model["name"], new.model["sha256"])  # the sensitivity records what it measured
    pairs = [(a, b) for g, h in zip(old.groups, new.groups) for a, b in zip(g.options, h.options)]
    same_kls = sum((a.kl is None) == (b.kl is None) for a, b in pairs)
    proxy = max(abs(b.proxy / a.proxy - 1) for a, b in pairs if a.proxy)
    kl = max((abs(b.kl / a.kl - 1) for a, b in pairs if a.kl and b.kl and a.option != "fp16"), default=0.0)
    rows = [[step, f"{old.seconds[step]:.0f}", f"{new.seconds[step]:.0f}", f"{old.seconds[step] / new.seconds[step]:.2f}x"]
            for step in ("statistics", "quantize", "kl")]
    rows.append(["measurement (wall)", f"{old_seconds:.0f}", f"{new_seconds:.0f}", f"{old_seconds / new_seconds:.2f}x"])
    record.update({"budget_bpw": BUDGET, "seconds": {"before": {**old.seconds, "wall": old_seconds},
                                                     "now": {**new.seconds, "wall": new_seconds}},
                   "options": len(pairs), "same_kls_measured": same_kls,
                   "measured_kls": [sum(o.kl is not None and o.option != "fp16" for o in run) for run in zip(*pairs)],
                   "max_relative_difference": {"proxy": proxy, "kl": kl}})
    header = (f"# Selective measurement for {BUDGET} bpw: before and now\n\n`python bench/selective_time.py` — "
              f"{time.strftime('%Y-%m-%d')}. {record['model']['name']}, default menu, `measure(kl_budgets=[{BUDGET} "
              f"bpw])` as `mixbits quantize --bpw {BUDGET}` runs it, twice in one process: before (X^T X converted "
              f"to float64 per window, each option's GPTQ groups fitted alone, later rounds solving again) and now. "
              f"Seconds. {same_kls} of {len(pairs)} options have a KL measured in both or in neither "
              f"({record['measured_kls'][0]} and {record['measured_kls'][1]} measured); the damages differ by at "
              f"most {proxy:.1e} (proxy) and {kl:.1e} (KL) relative.\n")
    table = format_table(["step", "before (s)", "now (s)", "speed-up"], rows)
    write_results(NAME, record, header + "\n" + table)
    print(header + "\n" + table)


if __name__ == "__main__":
    main()

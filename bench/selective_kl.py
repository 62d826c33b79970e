"""How few measured KLs a plan needs: selective measurement simulated on a full measurement.

Measuring the KL of every (group, option) of the default menu is most of `mixbits plan`'s time (647 s of 1108 s
on the default model). This replays, on the committed full measurement (bench/results/mixed/sensitivity.json,
120 groups x 12 options, every KL measured), a rule that measures only some: each group's KL is measured at one
anchor option, and the others' are predicted as proxy x (the group's measured KL / proxy ratio); then, for each
budget, the plan is allocated from the predictions, the KLs of every option it chose and of the options next to
them (one size down and up in the group's list) are measured, and the allocation repeats until every chosen
option's KL is a measured one. No model runs: a "measurement" reads the full file's KL.

Reported per budget: how many KLs were measured in all, and the true summed KL (the allocator's objective, from
the full measurement) of the plan found against the plan allocated with every KL measured.

    python bench/selective_kl.py
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from mixbits.allocate import Option, allocate
from mixbits.menu import parse_menu
from mixbits.plan import KEEP
from mixbits.report import format_table
from mixbits.sensitivity import Sensitivity

from common import RESULTS, write_results

NAME = "selective_kl"
BUDGETS = (2.5, 3.0, 3.5, 4.0)
ANCHOR = "int3:g64:asym"  # the option measured in every group first


def main() -> None:
    sensitivity = Sensitivity.load(RESULTS / "mixed" / "sensitivity.json")
    menu = {str(choice) for choice in parse_menu(None, "gptq")}
    groups = {}
    for group in sensitivity.groups:
        options = sorted((o for o in group.options if str(o.choice) in menu), key=lambda o: o.bits)
        groups[group.name] = options
    weights = sum(group.weights for group in sensitivity.groups)
    total = sum(len(options) for options in groups.values())
    kept = sum(1 for options in groups.values() for o in options if o.option == KEEP)

    def allocated(damage) -> dict:
        return {name: [Option(str(o.choice), o.bits, damage(name, o)) for o in options]
                for name, options in groups.items()}

    def true_kl(chosen: dict) -> float:
        by_name = {name: {str(o.choice): o for o in options} for name, options in groups.items()}
        return sum(by_name[name][option.name].kl for name, option in chosen.items())

    rows, record = [], {"anchor": ANCHOR, "budgets": []}
    measured: set[tuple[str, str]] = {(name, str(o.choice)) for name, options in groups.items() for o in options
                                      if o.option == KEEP or str(o.choice) == ANCHOR}

    def predicted(name, option):
        if (name, str(option.choice)) in measured:
            return option.kl
        ratios = [o.kl / o.proxy for o in groups[name] if (name, str(o.choice)) in measured and o.option != KEEP
                  and o.proxy > 0 and o.kl > 0]
        ratio = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else 1.0
        return option.proxy * ratio

    for bpw in BUDGETS:
        budget_bits = round(bpw * weights)
        best = allocate(allocated(lambda name, o: o.kl), budget_bits)
        rounds = 0
        while True:
            rounds += 1
            chosen = allocate(allocated(predicted), budget_bits)
            new = set()
            for name, option in chosen.items():
                names = [str(o.choice) for o in groups[name]]
                at = names.index(option.name)
                new |= {(name, names[i]) for i in (at - 1, at, at + 1) if 0 <= i < len(names)}
            new -= measured
            if not new:
                break
            measured |= new
        found, optimal = true_kl(chosen), true_kl(best)
        same = sum(chosen[name].name == best[name].name for name in groups)
        record["budgets"].append({"bits_per_weight": bpw, "measured": len(measured), "rounds": rounds,
                                  "true_kl": found, "optimal_kl": optimal, "groups_as_optimal": same})
        rows.append([bpw, f"{len(measured) - kept} of {total - kept}", rounds, f"{found:.4f}", f"{optimal:.4f}",
                     f"{100 * (found / optimal - 1):+.2f}%", f"{same} of {len(groups)}"])
    header = (f"# Selective KL measurement, simulated\n\n`python bench/selective_kl.py` — {time.strftime('%Y-%m-%d')}. "
              f"On the full measurement of the default menu (bench/results/mixed/sensitivity.json; {len(groups)} "
              f"groups, {total - kept} (group, option) KLs besides fp16's): each group measured at {ANCHOR} first, "
              "the other options predicted as proxy x the group's measured KL/proxy ratio (geometric mean), then "
              "for each budget in turn: allocate from the predictions, measure the chosen options and their "
              "neighbours one size down and up, repeat until every chosen KL is measured. Budgets run in this "
              "order and share what was measured, so the count is cumulative. True KL: the summed measured KL of "
              "the plan found (the allocator's objective), against the plan allocated with every KL measured.\n")
    table = format_table(["budget (bpw)", "KLs measured (cumulative)", "rounds", "true KL of the plan",
                          "with every KL", "excess", "groups as the full plan"], rows)
    write_results(NAME, record, header + "\n" + table)
    print(header + "\n" + table)


if __name__ == "__main__":
    main()

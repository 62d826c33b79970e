"""Mixed precision on the default model: the allocated plan against uniform formats and a heuristic mix.

Runs the user's commands, in this order (each quantization is a full GPTQ pass):

    mixbits sweep --bpw 2.5,3.0,3.5,4.0 --out bench/results/mixed --sensitivity bench/results/mixed/sensitivity.json
    mixbits sweep --bpw 2.5,3.0,3.5,4.0 --series allocated --damage proxy --out bench/results/mixed-proxy \
                  --sensitivity bench/results/mixed/sensitivity.json

    mixbits sweep --bpw 3.0,4.0 --series allocated --options OLD_MENU --calib-text pydoc --shrink 0 --kl-windows 2 \
                  --out bench/results/mixed-old-protocol --sensitivity bench/results/mixed-old-protocol/sensitivity.json
    mixbits quantize --format FORMAT --solver rtn --json      (FORMAT in EXTRA_RTN)

Calibration is the default mix and every plan is evaluated on the default
evaluation domains (pydoc, whose first half is in the mix, and austen and kjv,
kinds of text the mix does not hold); each cell is the mean over the unseen
kinds, and a second table gives every domain.

The first measures every (group, option) of the default menu (proxy and KL)
and writes the sensitivity file, then quantizes and evaluates the allocated
plan (by measured KL) and the heuristic mix at each budget and every uniform
option in range; the second reuses the measurements to allocate by the
Fisher-weighted proxy alone; the third plans as mixbits did before the
calibration mix (the old protocol: the old menu, calibration and KL on pydoc's
first 32 x 512 and 2 x 128 tokens, GPTQ without Hessian shrinkage), with its
own sensitivity file, so the study of causes has plans on every domain too.
Data-free round to nearest at sizes near the
budgets (EXTRA_RTN, kept in mixed/uniform-extra.json) is scored too: every
allocated plan must beat it at equal size or up to a bit larger.
Then it writes bench/results/mixed.md: per budget, the allocated plans
against the heuristic mix, the uniform configurations just below and just
above the budget, and the plans allocated from the previous default menu
(OLD_MENU; its points are kept in mixed-old-menu/, measured on the same
sensitivity file); which options each plan uses; the time measurement and
allocation took, and how well the proxies rank options against the measured KL.

    python bench/mixed.py [--report] [--steps sweep,proxy,old-protocol,extra] [--series allocated,heuristic,uniform] [--budgets 2.5,3.0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import RESULTS, pct

from mixbits.allocate import Budget
from mixbits.sensitivity import Sensitivity
from mixbits.mixes import allocated_plan
from mixbits.report import format_table

BUDGETS = "2.5,3.0,3.5,4.0"
MAIN = RESULTS / "mixed"
PROXY = RESULTS / "mixed-proxy"
SENSITIVITY = MAIN / "sensitivity.json"
EXTRA = MAIN / "uniform-extra.json"
OLD = RESULTS / "mixed-old-menu"
OLD_MENU = ("int2:g128:asym", "int2:g64:asym", "int3:g128:asym", "int3:g64:asym", "int4:g64:asym", "int5:g64:asym", "fp16")
OLD_PROTOCOL = RESULTS / "mixed-old-protocol"
OLD_PROTOCOL_BUDGETS = "3.0,4.0"
# Data-free round to nearest near the budgets: 3.16, 3.30, 4.16 and 4.31 bpw.
EXTRA_RTN = ("int3:g128:asym", "int3:g64:asym", "int4:g128:asym", "int4:g64:asym")


STEPS = ("sweep", "proxy", "old-protocol", "extra")


def run_sweeps(steps: tuple[str, ...], series: str, budgets: str) -> None:
    commands = {
        "sweep": ["sweep", "--bpw", budgets, "--series", series, "--out", str(MAIN), "--sensitivity", str(SENSITIVITY)],
        "proxy": ["sweep", "--bpw", budgets, "--series", "allocated", "--damage", "proxy", "--out", str(PROXY),
                  "--sensitivity", str(SENSITIVITY)],
        "old-protocol": ["sweep", "--bpw", OLD_PROTOCOL_BUDGETS, "--series", "allocated", "--options", ",".join(OLD_MENU),
                         "--calib-text", "pydoc", "--shrink", "0", "--kl-windows", "2", "--out", str(OLD_PROTOCOL),
                         "--sensitivity", str(OLD_PROTOCOL / "sensitivity.json")],
    }
    for step in steps:
        if step in commands:
            print("mixbits " + " ".join(commands[step]), file=sys.stderr)
            subprocess.run([sys.executable, "-m", "mixbits", *commands[step]], check=True)
    if "extra" in steps:
        run_extra()


def run_extra() -> None:
    extra = json.loads(EXTRA.read_text()) if EXTRA.exists() else {}
    for fmt in EXTRA_RTN:
        label = f"{fmt}@rtn"
        if label in extra:
            continue
        command = ["quantize", "--format", fmt, "--solver", "rtn", "--json"]
        print("mixbits " + " ".join(command), file=sys.stderr)
        record = json.loads(subprocess.run([sys.executable, "-m", "mixbits", *command], check=True, capture_output=True,
                                           text=True).stdout)
        quantization, evaluation = record["quantization"], record["evaluation"]
        extra[label] = {"series": "rtn", "label": label, "budget": None,
                        "bits_per_weight": quantization["bits_per_weight"], "bits": quantization["bits"],
                        "delta_perplexity": evaluation["mean"]["delta_perplexity"],
                        "delta_unseen": evaluation["mean_unseen"]["delta_perplexity"],
                        "kl": evaluation["mean"]["kl"], "agreement": evaluation["mean"]["agreement"],
                        "quantize_seconds": quantization["seconds"],
                        "domains": {d["name"]: {k: d[k] for k in ("perplexity", "delta_perplexity", "kl", "agreement")}
                                    for d in evaluation["domains"]}}
        EXTRA.write_text(json.dumps(extra, indent=1) + "\n")


def report() -> str:
    main = json.loads((MAIN / "sweep.json").read_text())
    proxy = json.loads((PROXY / "sweep.json").read_text()) if (PROXY / "sweep.json").exists() else {"points": []}
    old, old_protocol = ({"points": []} if not (d / "sweep.json").exists() else json.loads((d / "sweep.json").read_text())
                         for d in (OLD, OLD_PROTOCOL))
    sensitivity = Sensitivity.load(SENSITIVITY)
    points = main["points"]
    extra = list(json.loads(EXTRA.read_text()).values()) if EXTRA.exists() else []
    uniform = sorted((p for p in points if p["series"] == "uniform"), key=lambda p: p["bits_per_weight"])
    rtn = sorted([p for p in extra if p["series"] == "rtn"], key=lambda p: p["bits_per_weight"])
    names = [d["name"] for d in main["domains"]]
    unseen = [d["name"] for d in main["domains"] if not d["in_calibration_mix"]]

    def point(series, budget, source=points):
        return next((p for p in source if p["series"] == series and p["budget"] == budget), None)

    def cell(found):
        if found is None:
            return "—"
        name = f", {found['label'].split('@')[0]}" if found["series"] in ("uniform", "rtn") else ""
        return f"{pct(found['delta_unseen'])} ({found['bits_per_weight']:.2f}{name})"

    plans = (("KL, default menu", points), ("KL, old menu", old["points"]), ("proxy, default menu", proxy["points"]),
             ("old protocol", old_protocol["points"]))
    rows, by_domain, usage = [], [], []
    for budget in main["budgets"]:
        below = [p for p in uniform if p["bits_per_weight"] <= budget]
        above = [p for p in uniform if p["bits_per_weight"] >= budget]
        rtn_above = [p for p in rtn if p["bits_per_weight"] >= budget]
        rows.append([budget] + [cell(found) for found in (
            point("allocated", budget), point("allocated", budget, old["points"]),
            point("allocated", budget, proxy["points"]), point("heuristic", budget),
            min(below, key=lambda p: p["delta_unseen"]) if below else None, above[0] if above else None,
            rtn_above[0] if rtn_above else None)])
        for plan, source in plans:
            found = point("allocated", budget, source)
            if found is None:
                continue
            beaten = [p for p in rtn if 0 <= p["bits_per_weight"] - found["bits_per_weight"] < 1]
            wins = all(found["domains"][n]["delta_perplexity"] < p["domains"][n]["delta_perplexity"]
                       for p in beaten for n in names)
            verdict = "no RTN measured" if not beaten else ("yes" if wins else "no") + f" ({len(beaten)} RTN configs)"
            by_domain.append([budget, plan, round(found["bits_per_weight"], 3)]
                             + [pct(found["domains"][n]["delta_perplexity"]) for n in names]
                             + [pct(found["delta_unseen"]), found["kl"], verdict])
            counts = sorted(found["options"].items(), key=lambda item: -item[1])
            # A proxy plan's predicted damage is its summed proxy, not a KL.
            predicted = "—" if plan.startswith("proxy") else f"{found['predicted_damage']:.3f}"
            usage.append([budget, plan, predicted] + [f"{found['domains'][n]['kl']:.3f}" for n in names]
                         + [", ".join(f"{option.split('@')[0]} {count}" for option, count in counts)])
    uniform_damage = []
    for option in [o for o in sensitivity.groups[0].options]:
        found = [g.find(option.choice) for g in sensitivity.groups]
        uniform_damage.append([str(option.choice).split("@")[0], f"{sum(o.bits for o in found) / sensitivity.weights:.3f}",
                               f"{sum(o.kl for o in found):.3f}", f"{sum(o.proxy for o in found):.3f}"])
    uniform_damage.sort(key=lambda row: float(row[1]))
    table = format_table(["budget (bpw)", "allocated by KL", "allocated by KL, old menu", "allocated by proxy", "heuristic mix",
                          "best uniform GPTQ ≤ budget", "uniform GPTQ next size up", "RTN next size up"], rows)
    domain_table = format_table(
        ["budget", "plan", "bpw"] + [f"Δ ppl {n}" + ("" if n in unseen else " (in calibration)") for n in names]
        + ["mean Δ, unseen kinds", "mean KL", "beats every RTN of +0 to +1 bpw on every domain"], by_domain)

    timings = []
    for budget in main["budgets"]:
        start = time.perf_counter()
        allocated_plan(sensitivity, Budget(budget), "kl")
        timings.append(time.perf_counter() - start)
    seconds = sensitivity.seconds
    correlation = sensitivity.rank_correlation()
    options = len(sensitivity.groups[0].options)
    fp32 = ", ".join(f"{n} {v:.3f}" for n, v in main["fp32_perplexity"].items())
    lines = [
        "# Mixed precision: allocated plans against uniform formats and a heuristic mix",
        "",
        f"Model {main['model']['name']} (sha256 {main['model']['sha256'][:12]}), fp32 perplexity {fp32} "
        f"({len(names)} domains, each {main['domains'][0]['windows']['count']}x{main['domains'][0]['windows']['length']} "
        f"tokens from its middle). Calibration: {main['calibration']['text']}, {main['calibration']['count']}x"
        f"{main['calibration']['length']} tokens. Options: {', '.join(main['options'])}. Every plan is quantized with its "
        "options' solvers (block-sequential GPTQ) and evaluated on every domain. Cells: mean Δ ppl against fp32 over "
        f"the kinds of text the calibration mix does not hold ({', '.join(unseen)}); bits per weight of the quantized "
        "layers in brackets.",
        "",
        table,
        "",
        "The allocated plans on every domain, and whether each beats data-free round to nearest of equal size or up "
        "to one bit per weight larger on every domain. Plans: allocated by measured KL from the default menu and "
        "from the old menu, by the Fisher-weighted proxy from the default menu, and the old protocol (how mixbits "
        "planned before the calibration mix: old menu, GPTQ without Hessian shrinkage, calibration and KL on pydoc's "
        "start, so pydoc is its seen domain too):",
        "",
        domain_table,
        "",
        f"Measuring {len(sensitivity.groups)} groups x {options} options took {sum(seconds.values()):.0f} s, summed over "
        "the runs that measured them (the old menu's options, then the options the default menu added; each run computes "
        "the statistics again) "
        f"(statistics with the Fisher pass {seconds['statistics']:.0f} s, quantizing every option {seconds['quantize']:.0f} s, "
        f"KL on {sensitivity.kl_windows['count']}x{sensitivity.kl_windows['length']} tokens {seconds['kl']:.0f} s); "
        f"allocation took {max(timings) * 1000:.0f} ms at most per budget.",
        "",
        "Spearman rank correlation of the proxies with the measured KL (all (group, option) pairs; mean within a group "
        f"over its options): Fisher-weighted proxy {correlation['proxy_all']:.3f} / {correlation['proxy_within_groups']:.3f}, "
        f"plain output error tr(ΔW H ΔWᵀ) {correlation['output_error_all']:.3f} / {correlation['output_error_within_groups']:.3f}.",
        "",
        "Round to nearest near the budgets (`mixed/uniform-extra.json`; mean Δ ppl over unseen kinds): "
        + ("; ".join(f"{p['label']} {p['bits_per_weight']:.2f} bpw {pct(p['delta_unseen'])} (mean KL {p['kl']:.3f})"
                     for p in sorted(extra, key=lambda p: p["bits_per_weight"])) or "none yet") + ".",
        "",
        "What the allocator predicts: each option of the sensitivity file uniform over the model (its groups' measured "
        "KL and Fisher-weighted proxy, summed as the allocator sums them):",
        "",
        format_table(["option", "bpw", "summed KL", "summed proxy"], uniform_damage),
        "",
        "The options each allocated plan gives its layers (of 210), the KL the allocator predicted for it (the sum "
        "of its groups' KL, each measured alone on its calibration windows; none for proxy plans) and the KL measured on each evaluation "
        f"domain with every layer quantized (old menu: {', '.join(OLD_MENU)}):",
        "",
        format_table(["budget", "plan", "predicted KL"] + [f"KL {n}" for n in names] + ["layers per option"], usage),
        "",
        "Every point of the sweeps (`mixed/sweep.md`, plot `mixed/sweep.png`, page `mixed/sweep.html`):",
        "",
        (MAIN / "sweep.md").read_text().split("\n", 2)[2].strip(),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only rewrite mixed.md from the committed results")
    parser.add_argument("--steps", default=",".join(STEPS), help="which of sweep, proxy, extra to run (default: all)")
    parser.add_argument("--series", default="allocated,heuristic,uniform", help="series of the main sweep (default: all)")
    parser.add_argument("--budgets", default=BUDGETS, help="budgets of the sweeps (default: %(default)s)")
    args = parser.parse_args()
    if not args.report:
        steps = tuple(s for s in args.steps.split(",") if s)
        if set(steps) - set(STEPS):
            parser.error(f"--steps takes {', '.join(STEPS)}")
        run_sweeps(steps, args.series, args.budgets)
    text = report()
    (RESULTS / "mixed.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

"""Mixed precision on the default model: the allocated plan against uniform formats and a heuristic mix.

Runs the user's commands, in this order (each quantization is a full GPTQ pass):

    mixbits sweep --bpw 2.5,3.0,3.5 --out bench/results/mixed --sensitivity bench/results/mixed/sensitivity.json
    mixbits sweep --bpw 2.5,3.0,3.5 --series allocated --damage proxy --out bench/results/mixed-proxy \
                  --sensitivity bench/results/mixed/sensitivity.json

    mixbits quantize --format FORMAT --solver gptq --json     (FORMAT in EXTRA_UNIFORM)

The first measures every (group, option) of the default menu (proxy and KL)
and writes the sensitivity file, then quantizes and evaluates the allocated
plan (by measured KL) and the heuristic mix at each budget and every uniform
option in range; the second reuses the measurements to allocate by the
Fisher-weighted proxy alone. The default menu's uniform options sit far from
the budgets (2.28, 3.16, 3.30, 4.31 bpw), so uniform formats just above each
budget are scored too (EXTRA_UNIFORM, kept in mixed/uniform-extra.json).
Then it writes bench/results/mixed.md: per budget, the allocated plans
against the heuristic mix and the uniform configurations just below and
just above the budget, the time measurement and allocation took, and how
well the proxies rank options against the measured KL.

    python bench/mixed.py [--report]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import RESULTS

from mixbits.allocate import Budget
from mixbits.measure import Sensitivity
from mixbits.mixes import allocated_plan
from mixbits.report import format_table

BUDGETS = "2.5,3.0,3.5"
MAIN = RESULTS / "mixed"
PROXY = RESULTS / "mixed-proxy"
SENSITIVITY = MAIN / "sensitivity.json"
EXTRA = MAIN / "uniform-extra.json"
# Uniform GPTQ formats just above each budget: 2.56, 3.10 and 3.59 bpw.
EXTRA_UNIFORM = ("int2:g32:asym", "int3:g192:asym", "int3:g32:asym")


def run_sweeps() -> None:
    commands = [
        ["sweep", "--bpw", BUDGETS, "--out", str(MAIN), "--sensitivity", str(SENSITIVITY)],
        ["sweep", "--bpw", BUDGETS, "--series", "allocated", "--damage", "proxy", "--out", str(PROXY),
         "--sensitivity", str(SENSITIVITY)],
    ]
    for command in commands:
        print("mixbits " + " ".join(command), file=sys.stderr)
        subprocess.run([sys.executable, "-m", "mixbits", *command], check=True)
    extra = json.loads(EXTRA.read_text()) if EXTRA.exists() else {}
    for fmt in EXTRA_UNIFORM:
        if fmt in extra:
            continue
        command = ["quantize", "--format", fmt, "--solver", "gptq", "--json"]
        print("mixbits " + " ".join(command), file=sys.stderr)
        record = json.loads(subprocess.run([sys.executable, "-m", "mixbits", *command], check=True, capture_output=True,
                                           text=True).stdout)
        quantization, evaluation = record["quantization"], record["evaluation"]
        extra[fmt] = {"series": "uniform", "label": f"{fmt}@gptq", "budget": None,
                      "bits_per_weight": quantization["bits_per_weight"], "bits": quantization["bits"],
                      "perplexity": evaluation["perplexity"],
                      "delta_perplexity": evaluation["perplexity"] / evaluation["reference_perplexity"] - 1,
                      "kl": evaluation["kl"], "agreement": evaluation["agreement"],
                      "quantize_seconds": quantization["seconds"]}
        EXTRA.write_text(json.dumps(extra, indent=1) + "\n")


def _pct(value: float) -> str:
    return f"{value:+.1%}" if value < 10 else f"{value:+.0%}"


def report() -> str:
    main = json.loads((MAIN / "sweep.json").read_text())
    proxy = json.loads((PROXY / "sweep.json").read_text()) if (PROXY / "sweep.json").exists() else {"points": []}
    sensitivity = Sensitivity.load(SENSITIVITY)
    points = main["points"]
    extra = list(json.loads(EXTRA.read_text()).values()) if EXTRA.exists() else []
    uniform = sorted([p for p in points if p["series"] == "uniform"] + extra, key=lambda p: p["bits_per_weight"])

    def point(series, budget, source=points):
        return next((p for p in source if p["series"] == series and p["budget"] == budget), None)

    rows = []
    for budget in main["budgets"]:
        below = [p for p in uniform if p["bits_per_weight"] <= budget]
        above = [p for p in uniform if p["bits_per_weight"] >= budget]
        cells = [budget]
        for found in (point("allocated", budget), point("allocated", budget, proxy["points"]), point("heuristic", budget),
                      min(below, key=lambda p: p["perplexity"]) if below else None, above[0] if above else None):
            cells.append("—" if found is None else
                         f"{_pct(found['delta_perplexity'])} ({found['bits_per_weight']:.2f}"
                         + (f", {found['label'].split('@')[0]})" if found["series"] == "uniform" else ")"))
        rows.append(cells)
    table = format_table(["budget (bpw)", "allocated by KL", "allocated by proxy", "heuristic mix",
                          "best uniform ≤ budget", "uniform next size up"], rows)

    timings = []
    for budget in main["budgets"]:
        start = time.perf_counter()
        allocated_plan(sensitivity, Budget(budget), "kl")
        timings.append(time.perf_counter() - start)
    seconds = sensitivity.seconds
    correlation = sensitivity.rank_correlation()
    options = len(sensitivity.groups[0].options)
    lines = [
        "# Mixed precision: allocated plans against uniform formats and a heuristic mix",
        "",
        f"Model {main['model']['name']} (sha256 {main['model']['sha256'][:12]}), fp32 perplexity "
        f"{main['fp32_perplexity']:.3f} on {main['windows']['count']}x{main['windows']['length']} tokens from token "
        f"{main['windows']['start']}; calibration {main['calibration']['count']}x{main['calibration']['length']} tokens "
        f"from token 0. Options: {', '.join(main['options'])}. Every plan is quantized with its options' solvers "
        "(block-sequential GPTQ) and evaluated; Δ ppl against fp32, bits per weight of the quantized layers in brackets.",
        "",
        table,
        "",
        f"Measuring {len(sensitivity.groups)} groups x {options} options took {sum(seconds.values()):.0f} s "
        f"(statistics with the Fisher pass {seconds['statistics']:.0f} s, quantizing every option {seconds['quantize']:.0f} s, "
        f"KL on {sensitivity.kl_windows['count']}x{sensitivity.kl_windows['length']} tokens {seconds['kl']:.0f} s); "
        f"allocation took {max(timings) * 1000:.0f} ms at most per budget.",
        "",
        "Spearman rank correlation of the proxies with the measured KL (all (group, option) pairs; mean within a group "
        f"over its options): Fisher-weighted proxy {correlation['proxy_all']:.3f} / {correlation['proxy_within_groups']:.3f}, "
        f"plain output error tr(ΔW H ΔWᵀ) {correlation['output_error_all']:.3f} / {correlation['output_error_within_groups']:.3f}.",
        "",
        "Uniform GPTQ formats added near the budgets (`mixed/uniform-extra.json`): "
        + "; ".join(f"{p['label'].split('@')[0]} {p['bits_per_weight']:.2f} bpw {_pct(p['delta_perplexity'])} (KL {p['kl']:.3f})"
                    for p in sorted(extra, key=lambda p: p["bits_per_weight"])) + ".",
        "",
        "Every point of the sweeps (`mixed/sweep.md`, plot `mixed/sweep.png`, page `mixed/sweep.html`):",
        "",
        (MAIN / "sweep.md").read_text().split("\n", 2)[2].strip(),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only rewrite mixed.md from the committed results")
    args = parser.parse_args()
    if not args.report:
        run_sweeps()
    text = report()
    (RESULTS / "mixed.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

"""How many calibration tokens does each method need? The methods of bench/low_bit.py on fewer and more windows.

Each row quantizes the default model as a row of bench/low_bit.py does
(same targets, methods and evaluation domains), but calibrated on W windows
of 512 tokens of the default mix instead of 32 (the mix spreads its windows
evenly over its four sources, so every count holds all four kinds of text).
A method needs no more tokens than the count past which its unseen-domain
Δ ppl stops falling. Rows at the default count (32 windows) are bench/low_bit.py's own, read from
bench/results/low_bit.json, not run again.

Resumable: finished rows in bench/results/calib_tokens.json are kept.

    python bench/calib_tokens.py [--only int3] [--method gptq]
"""

from __future__ import annotations

import argparse
import json
import time

from mixbits import defaults
from mixbits.calibrate import calibration_data
from mixbits.report import format_table

from common import RESULTS, domain_cells, domain_protocol, earlier_results, fp32_references, rewrite_report, write_results
from low_bit import quantized_row, sensitivity_tables

NAME = "calib_tokens"
SWEEPS = [  # (target, method, window counts)
    ("int3:g64:asym", "gptq", (4, 8, 32)),
    ("int3:g64:asym", "gptaq a=0.25", (4, 8, 32)),
    ("int3:g64:asym", "gptaq a=0.25+tune", (8, 32)),
    ("plan 3.0 +tc", "gptaq a=0.25", (8, 32)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="run only targets containing this text (repeatable)")
    parser.add_argument("--method", action="append", default=[], help="run only this method (repeatable)")
    parser.add_argument("--report", action="store_true", help="only rewrite the Markdown from the committed JSON")
    args = parser.parse_args()
    if args.report:
        rewrite_report(NAME, _markdown)
        return

    loaded, domains, record = domain_protocol()
    record["results"] = earlier_results(NAME, record, ("domains", "model"))
    done = {(r["target"], r["method"], r["windows"]) for r in record["results"]}
    default_rows = _default_count_rows(record)
    tables = sensitivity_tables()
    references = None
    for target, label, counts in SWEEPS:
        if (args.only and not any(text in target for text in args.only)) or (args.method and label not in args.method):
            continue
        for count in counts:
            if (target, label, count) in done:
                continue
            if count == defaults.CALIBRATION_WINDOWS:
                row = default_rows.get((target, label))
                if row is None:
                    print(f"{target} {label}: no 32-window row in low_bit.json yet; run bench/low_bit.py first")
                    continue
            else:
                references = references or fp32_references(loaded, domains, record)
                windows, calibration = calibration_data(loaded, None, count, defaults.CALIBRATION_LEN)
                row = {**quantized_row(loaded, target, label, windows, tables, domains, references),
                       "calibration": calibration}
            row["windows"] = count
            record["results"].append(row)
            write_results(NAME, record, _markdown(record))
            deltas = ", ".join(f"{d['name']} {d['delta_perplexity']:+.1%}" for d in row["domains"])
            print(f"{target:14} {label:18} {count:3} windows  {deltas} ({row['quantize_seconds']:.0f} s)", flush=True)
    if "fp32_perplexity" not in record and default_rows:
        record["fp32_perplexity"] = json.loads((RESULTS / "low_bit.json").read_text())["fp32_perplexity"]
        write_results(NAME, record, _markdown(record))


def _default_count_rows(record: dict) -> dict:
    """bench/low_bit.py's rows (at the default calibration) by (target, method), if measured under this protocol."""
    path = RESULTS / "low_bit.json"
    if not path.exists():
        return {}
    low_bit = json.loads(path.read_text())
    if low_bit["domains"] != record["domains"] or low_bit["model"] != record["model"]:
        return {}
    return {(r["target"], r["method"]): {**r, "calibration": low_bit["calibration"]} for r in low_bit["results"]}


def _markdown(record: dict) -> str:
    names = [d["name"] for d in record["domains"]]
    seen = {d["name"] for d in record["domains"] if d["in_calibration_mix"]}
    headers = ["target", "method", "windows", "tokens"] + [
        f"Δ ppl {n}" + (" (in mix)" if n in seen else "") for n in names] + ["mean Δ, unseen kinds", "mean KL",
                                                                            "quantize s"]
    order = [(target, label) for target, label, _ in SWEEPS]
    rows = []
    for r in sorted(record["results"], key=lambda r: (order.index((r["target"], r["method"])), r["windows"])):
        rows.append([r["target"], r["method"], r["windows"], r["windows"] * defaults.CALIBRATION_LEN,
                     *domain_cells(r, names), f"{sum(d['kl'] for d in r['domains']) / len(r['domains']):.3f}",
                     round(r["quantize_seconds"])])
    fp32 = ", ".join(f"{n} {p:.3f}" for n, p in record.get("fp32_perplexity", {}).items())
    return "\n".join([
        "# Calibration tokens each method needs",
        "",
        f"`python bench/calib_tokens.py` (resumable; the last run was `{record['command']}`, "
        f"{time.strftime('%Y-%m-%d')}). {record['model']['name']}; each row the target and method of "
        "bench/low_bit.py (see its table for what they are), calibrated on `windows` windows of "
        f"{defaults.CALIBRATION_LEN} tokens of the default mix, spread evenly over its four sources; rows at "
        f"{defaults.CALIBRATION_WINDOWS} windows are bench/low_bit.py's. fp32 perplexity: {fp32}; each domain "
        f"{defaults.EVAL_WINDOWS} windows of {defaults.WINDOW_LEN} tokens from its middle; austen and kjv are kinds "
        "of text no calibration here holds. Quantize seconds on this machine, one process, one row at a time.",
        "",
        format_table(headers, rows),
    ])


if __name__ == "__main__":
    main()

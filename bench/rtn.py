"""Round-to-nearest on the default model: INT8/4/3/2, groups of 128 and 64, sym and asym.

Prints a Markdown table (bits per weight of the decoder linears, perplexity,
KL against fp32, top-1 agreement) and writes bench/results/rtn.{md,json}.
Group 32 at 4 bits is left out on purpose: the default model's weights came
from 4-bit blocks of 32 (DESIGN.md), which would flatter that configuration.

    python bench/rtn.py [--windows 24]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import mixbits
from mixbits.eval import ReferenceScores, score_windows
from mixbits.formats import parse_format
from mixbits.models import quantizable_linears
from mixbits.quantize import LayerReport
from mixbits.solvers import round_to_nearest
from mixbits.report import format_table

from common import protocol, write_results

# Clip search: "weighted" (the default, magnitude-weighted error), "mse" (plain weight MSE), "none".
CONFIGS = [(f"int{bits}:g{group}:{kind}", "weighted") for bits in (8, 4, 3, 2) for group in (128, 64) for kind in ("asym", "sym")]
CONFIGS += [(fmt, search) for fmt in ("int4:g64:asym", "int3:g64:asym") for search in ("none", "mse")]


def quantize(model, fmt: str, search: str) -> mixbits.QuantizationReport:
    if search != "mse":
        return mixbits.quantize(model, fmt, clip_search=search == "weighted")
    # Plain MSE: the same search with every weight's error counted equally.
    parsed, started = parse_format(fmt), time.perf_counter()
    report = mixbits.QuantizationReport(fmt, True)
    with torch.no_grad():
        for name, linear in quantizable_linears(model):
            weight = linear.weight
            weight.copy_(round_to_nearest(weight, parsed, importance=torch.ones_like(weight)).dequantize())
            report.layers.append(LayerReport(name, tuple(weight.shape), parsed.bits(*weight.shape)))
    report.seconds = time.perf_counter() - started
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=24)
    args = parser.parse_args()

    loaded, windows, record = protocol(args.windows)
    reference = ReferenceScores(loaded.model, windows)
    rows = [["fp32", "—", 32.0, reference.perplexity, None, None, None, None]]
    record["results"] = [{"format": "fp32", "bits_per_weight": 32.0, "perplexity": reference.perplexity}]
    for fmt, search in CONFIGS:
        model = copy.deepcopy(loaded.model)
        report = quantize(model, fmt, search)
        result = score_windows(model, windows, reference)
        delta = result.perplexity / reference.perplexity - 1
        rows.append([fmt, search, report.bits_per_weight, result.perplexity,
                     f"{delta:+.1%}", result.kl, result.agreement, round(report.seconds, 1)])
        record["results"].append({**report.as_dict(), "clip_search": search, "evaluation": result.as_dict(), "delta_perplexity": delta})
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
        del model
    table = format_table(["format", "clip search", "bpw", "perplexity", "Δ ppl", "KL", "top-1 agree", "quantize s"], rows)
    print(table)
    header = (f"RTN on {record['model']['name']} (sha256 {record['model']['sha256'][:12]}), "
              f"{args.windows} windows x 512 tokens of {record['text']['name']}; bpw counts the 210 decoder linears.\n\n"
              f"Command: `{record['command']}`\n")
    write_results("rtn", record, header + "\n" + table)


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"total {time.time() - started:.0f} s")

"""Round-to-nearest on the default model: INT8/4/3/2, groups of 128 and 64, sym and asym.

Prints a Markdown table (bits per weight of the decoder linears, perplexity
change on every evaluation domain and the mean over the kinds of text no
calibration holds, mean KL against fp32 and top-1 agreement) and writes
bench/results/rtn.{md,json} after every row; a run resumes from the rows
already there (same model and domains). RTN uses no data, so no domain is "seen".
Group 32 at 4 bits is left out on purpose: the default model's weights came
from 4-bit blocks of 32 (DESIGN.md), which would flatter that configuration.

    python bench/rtn.py
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import mixbits
from mixbits.eval import evaluate_domains
from mixbits.formats import parse_format
from mixbits.models import quantizable_linears
from mixbits.quantize import LayerReport
from mixbits.solvers import round_to_nearest
from mixbits.report import format_table

from common import domain_cells, domain_protocol, earlier_results, fp32_references, write_results

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
            report.layers.append(LayerReport(name, tuple(weight.shape), parsed.bits(*weight.shape), fmt, "rtn"))
    report.seconds = time.perf_counter() - started
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()

    loaded, domains, record = domain_protocol()
    record["results"] = earlier_results("rtn", record, ("domains", "model"))
    done = {(r["format"], r["clip_search"]) for r in record["results"]}
    references = fp32_references(loaded, domains, record)
    for fmt, search in CONFIGS:
        if (fmt, search) in done:
            continue
        model = copy.deepcopy(loaded.model)
        report = quantize(model, fmt, search)
        result = evaluate_domains(model, domains, references, progress=False).as_dict()
        record["results"].append({**report.as_dict(), "clip_search": search, **result})
        write_results("rtn", record, _markdown(record))
        print(f"{fmt} {search}: mean Δ ppl on unseen kinds {result['mean_unseen']['delta_perplexity']:+.1%}", flush=True)
        del model
    print(_markdown(record))


def _markdown(record: dict) -> str:
    names = [d["name"] for d in record["domains"]]
    order = {config: i for i, config in enumerate(CONFIGS)}
    rows = [[r["format"], r["clip_search"], r["bits_per_weight"], *domain_cells(r, names), r["mean"]["kl"],
             r["mean"]["agreement"], round(r["seconds"], 1)]
            for r in sorted(record["results"], key=lambda r: order.get((r["format"], r["clip_search"]), len(order)))]
    table = format_table(["format", "clip search", "bpw", *(f"Δ ppl {n}" for n in names), "mean Δ, unseen kinds",
                          "mean KL", "top-1 agree", "quantize s"], rows)
    fp32 = ", ".join(f"{n} {p:.3f}" for n, p in record["fp32_perplexity"].items())
    header = (f"RTN on {record['model']['name']} (sha256 {record['model']['sha256'][:12]}): {len(names)} domains of "
              f"24 x 512 tokens from each one's middle (fp32 perplexity {fp32}); bpw counts the 210 decoder linears. "
              "'unseen kinds' are the domains whose kind of text the default calibration mix does not hold (RTN itself "
              f"uses no data).\n\nCommand: `{record['command']}`\n")
    return header + "\n" + table


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"total {time.time() - started:.0f} s")

"""Calibrated solvers on the default model: RTN vs GPTQ vs GPTQ+AWQ vs GPTQ+rotation.

For INT4/INT3/INT2 (asymmetric, groups of 64), FP4 E2M1 with fp16 scales
per 32, MXFP4, NVFP4 and NF4 (groups of 64): bits per weight of the
decoder linears, perplexity, KL against fp32, top-1 agreement, quantization
time and peak resident memory during quantization (the process's model,
reference scores and calibration activations included; "+MiB" is the rise
above the resident size just before quantizing). NVFP4 runs RTN and GPTQ
only (see SKIPPED).

RTN is the data-free round-to-nearest with its magnitude-weighted clip search.
GPTQ, AWQ and rotation use the default calibration: 32 windows of 512 tokens
of the calibration mix (mixbits.corpus). Every row is evaluated on the
evaluation domains (pydoc, whose first half is in the mix; austen and kjv,
kinds of text the mix does not hold). The rotation is QuaRot's: a residual-stream
Hadamard (with random signs) plus an online Hadamard before every down_proj.

The run is resumable: finished rows are kept in bench/results/calibrated.json
and skipped, so it can be continued after an interruption.

    python bench/calibrated.py [--only int3]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import mixbits
from mixbits import defaults
from mixbits.eval import evaluate_domains
from mixbits.memory import resident_bytes
from mixbits.report import format_table

from common import calibrated_protocol, domain_cells, earlier_results, fp32_references, rewrite_report, write_results

# In the order they run: the formats the study and the allocator's menu lean on first.
# Groups of 128 are left to bench/formats.py (round to nearest): four solvers on them cost 40 more minutes.
FORMATS = ["int4:g64:asym", "int3:g64:asym", "int2:g64:asym", "nf4:g64", "nvfp4", "mxfp4", "fp4_e2m1:g32:scale=fp16"]
METHODS = {
    "rtn": {},
    "gptq": {"solver": "gptq"},
    "gptq+awq": {"solver": "gptq", "awq": True},
    "gptq+rotate": {"solver": "gptq", "rotate": True, "online_hadamard": True},
}
# NVFP4 runs RTN and GPTQ only: its E4M3 scales under one tensor scale make a GPTQ pass 22 CPU minutes here
# (the others 5 to 15), and AWQ and rotation are measured on the six other formats.
SKIPPED = {("nvfp4", "gptq+awq"), ("nvfp4", "gptq+rotate")}
NAME = "calibrated"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only formats containing this text")
    parser.add_argument("--report", action="store_true", help="only rewrite the Markdown from the committed JSON")
    args = parser.parse_args()
    if args.report:
        rewrite_report(NAME, _markdown)
        return

    loaded, domains, record, calibration = calibrated_protocol()
    done = {(r["format"], r["method"]): r for r in earlier_results(NAME, record, ("domains", "model", "calibration"))}
    references = fp32_references(loaded, domains, record)

    for name in FORMATS:
        if args.only not in name:
            continue
        for method, options in METHODS.items():
            if (name, method) in done or (name, method) in SKIPPED:
                continue
            model = copy.deepcopy(loaded.model)
            before = resident_bytes()
            cpu = time.process_time()
            report = mixbits.quantize(model, name, calibration=calibration, progress=False, **options)
            cpu = time.process_time() - cpu
            result = evaluate_domains(model, domains, references, progress=False)
            row = {**report.as_dict(), "rss_before_bytes": before, **result.as_dict(), "cpu_seconds": cpu}
            row.pop("awq_scales")
            done[(name, method)] = row
            print(f"{name} {method}: bpw {row['bits_per_weight']:.3f} mean Δ ppl {row['mean']['delta_perplexity']:+.1%}, "
                  f"unseen kinds {row['mean_unseen']['delta_perplexity']:+.1%} {row['seconds']:.0f} s", flush=True)
            del model
            record["results"] = [done[key] for key in sorted(done, key=_order)]
            write_results(NAME, record, _markdown(record))


def _order(key):
    name, method = key
    return (FORMATS.index(name) if name in FORMATS else len(FORMATS), list(METHODS).index(method))


def _markdown(record: dict) -> str:
    names = [d["name"] for d in record["domains"]]
    seen = {d["name"] for d in record["domains"] if d["in_calibration_mix"]}
    rows = []
    for r in record["results"]:
        rows.append([r["format"], r["method"], r["bits_per_weight"], *domain_cells(r, names), r["mean"]["kl"],
                     r["mean"]["agreement"], round(r["cpu_seconds"]), round(r["peak_memory_bytes"] / 2**20),
                     round((r["peak_memory_bytes"] - r["rss_before_bytes"]) / 2**20)])
    c = record["calibration"]
    rotations = {json.dumps(r["rotation"]) for r in record["results"] if r["rotation"]}
    fp32 = ", ".join(f"{n} {p:.3f}" for n, p in record["fp32_perplexity"].items())
    header = (f"# Calibrated solvers\n\n`python bench/calibrated.py` — {time.strftime('%Y-%m-%d')}. Calibration: "
              f"{c['text']}, {c['count']} x {c['length']} tokens. Evaluation: {len(names)} domains of "
              f"{defaults.EVAL_WINDOWS} x {defaults.WINDOW_LEN} tokens from each one's middle, fp32 perplexity {fp32}; "
              f"{', '.join(sorted(seen)) or 'none'} in the calibration mix (its first half), the others kinds of text "
              "the mix does not hold. KL and agreement are means over the domains.\n\n"
              f"Rotation used: {', '.join(sorted(rotations)) or 'none yet'}. NVFP4 runs RTN and GPTQ only: a GPTQ "
              "pass of it takes about 22 CPU minutes here, and AWQ and rotation are measured on the six other formats. "
              "quantize CPU s is the process's CPU time while quantizing (two threads: wall time is about half; "
              "unlike wall time, it is not stretched when the run is paused); peak MiB is the process's peak resident memory while quantizing "
              "(model, reference scores of every domain and all); +MiB its rise above the resident size just before, a "
              "lower bound, since memory freed by earlier rows is reused.\n")
    headers = ["format", "method", "bpw"] + [f"Δ ppl {n}" + (" (in mix)" if n in seen else "") for n in names] + [
        "mean Δ, unseen kinds", "mean KL", "top-1 agree", "quantize CPU s", "peak MiB", "+MiB"]
    return header + "\n" + format_table(headers, rows)


if __name__ == "__main__":
    main()

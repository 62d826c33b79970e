"""Calibrated solvers on the default model: RTN vs GPTQ vs GPTQ+AWQ vs GPTQ+rotation.

For INT4/INT3/INT2 (asymmetric, groups of 128 and 64), FP4 E2M1 with fp16
scales per 32, MXFP4, NVFP4 and NF4 (groups of 64): bits per weight of the
decoder linears, perplexity, KL against fp32, top-1 agreement, quantization
time and peak resident memory during quantization (the process's model,
reference scores and calibration activations included; "+MiB" is the rise
above the resident size just before quantizing).

RTN is the data-free round-to-nearest with its magnitude-weighted clip search.
GPTQ, AWQ and rotation use the default calibration: 32 windows of 512 tokens
from the start of the text. The rotation is QuaRot's: a residual-stream
Hadamard (with random signs) plus an online Hadamard before every down_proj.

The run is resumable: finished rows are kept in bench/results/calibrated.json
and skipped, so it can be continued after an interruption.

    python bench/calibrated.py [--windows 24] [--only int3]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import mixbits
from mixbits import defaults
from mixbits.data import calibration_windows, load_text, tokenize
from mixbits.eval import ReferenceScores, score_windows
from mixbits.memory import resident_bytes
from mixbits.report import format_table

from common import RESULTS, protocol, write_results

FORMATS = ["int3:g128:asym", "int3:g64:asym", "int4:g128:asym", "int4:g64:asym", "int2:g128:asym", "int2:g64:asym",
           "fp4_e2m1:g32:scale=fp16", "mxfp4", "nvfp4", "nf4:g64"]
METHODS = {
    "rtn": {},
    "gptq": {"solver": "gptq"},
    "gptq+awq": {"solver": "gptq", "awq": True},
    "gptq+rotate": {"solver": "gptq", "rotate": True, "online_hadamard": True},
}
NAME = "calibrated"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=defaults.EVAL_WINDOWS)
    parser.add_argument("--only", default="", help="run only formats containing this text")
    parser.add_argument("--report", action="store_true", help="only rewrite the Markdown from the committed JSON")
    args = parser.parse_args()
    if args.report:
        record = json.loads((RESULTS / f"{NAME}.json").read_text())
        write_results(NAME, record, _markdown(record))
        return

    loaded, windows, record = protocol(args.windows)
    calibration, spec = calibration_windows(tokenize(load_text(), loaded.tokenizer),
                                            defaults.CALIBRATION_WINDOWS, defaults.CALIBRATION_LEN)
    record["calibration"] = spec.as_dict()
    previous = RESULTS / f"{NAME}.json"
    done = {}
    if previous.exists():
        old = json.loads(previous.read_text())
        if old.get("windows") == record["windows"] and old.get("model") == record["model"] and old.get("calibration") == record["calibration"]:
            done = {(r["format"], r["method"]): r for r in old["results"]}
    reference = ReferenceScores(loaded.model, windows)
    record["fp32_perplexity"] = reference.perplexity

    for name in FORMATS:
        if args.only not in name:
            continue
        for method, options in METHODS.items():
            if (name, method) in done:
                continue
            model = copy.deepcopy(loaded.model)
            before = resident_bytes()
            cpu = time.process_time()
            report = mixbits.quantize(model, name, calibration=calibration, **options)
            cpu = time.process_time() - cpu
            result = score_windows(model, windows, reference)
            row = {**report.as_dict(), "rss_before_bytes": before, "perplexity": result.perplexity,
                   "delta_perplexity": result.perplexity / reference.perplexity - 1, "kl": result.kl,
                   "agreement": result.agreement, "eval_seconds": result.seconds, "cpu_seconds": cpu}
            row.pop("awq_scales")
            done[(name, method)] = row
            print(f"{name} {method}: bpw {row['bits_per_weight']:.3f} ppl {row['perplexity']:.3f} "
                  f"({row['delta_perplexity']:+.1%}) KL {row['kl']:.4f} {row['seconds']:.0f} s", flush=True)
            del model
            record["results"] = [done[key] for key in sorted(done, key=_order)]
            write_results(NAME, record, _markdown(record))


def _order(key):
    name, method = key
    return (FORMATS.index(name) if name in FORMATS else len(FORMATS), list(METHODS).index(method))


def _markdown(record: dict) -> str:
    rows = [["fp32", "", 32.0, record["fp32_perplexity"], None, None, None, None, None, None]]
    for r in record["results"]:
        rows.append([r["format"], r["method"], r["bits_per_weight"], r["perplexity"], f"{r['delta_perplexity']:+.1%}",
                     r["kl"], r["agreement"], round(r["seconds"]), round(r["peak_memory_bytes"] / 2**20),
                     round((r["peak_memory_bytes"] - r["rss_before_bytes"]) / 2**20)])
    w, c = record["windows"], record["calibration"]
    rotations = {json.dumps(r["rotation"]) for r in record["results"] if r["rotation"]}
    header = (f"# Calibrated solvers\n\n`python bench/calibrated.py` — {w['count']} windows x {w['length']} tokens from "
              f"token {w['start']}; calibration {c['count']} x {c['length']} tokens from token {c['start']}; "
              f"{time.strftime('%Y-%m-%d')}\n\nRotation used: {', '.join(sorted(rotations)) or 'none yet'}. "
              "quantize s is wall time; peak MiB is the process's peak resident memory while quantizing "
              "(model, 2.4 GB of reference scores and all); +MiB its rise above the resident size just before, a lower "
              "bound, since memory freed by earlier rows is reused.\n")
    return header + "\n" + format_table(
        ["format", "method", "bpw", "perplexity", "Δ ppl", "KL", "top-1 agree", "quantize s", "peak MiB", "+MiB"], rows)


if __name__ == "__main__":
    main()

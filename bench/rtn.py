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

import mixbits
from mixbits.eval import ReferenceScores, score_windows
from mixbits.report import format_table

from common import protocol, write_results

CONFIGS = [(f"int{bits}:g{group}:{kind}", True) for bits in (8, 4, 3, 2) for group in (128, 64) for kind in ("asym", "sym")]
# The effect of the clipping search, shown where it matters.
CONFIGS += [("int4:g64:asym", False), ("int3:g64:asym", False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=24)
    args = parser.parse_args()

    loaded, windows, record = protocol(args.windows)
    reference = ReferenceScores(loaded.model, windows)
    rows = [["fp32", "—", 32.0, reference.perplexity, None, None, None, None]]
    record["results"] = [{"format": "fp32", "bits_per_weight": 32.0, "perplexity": reference.perplexity}]
    for fmt, clip_search in CONFIGS:
        model = copy.deepcopy(loaded.model)
        report = mixbits.quantize(model, fmt, clip_search=clip_search)
        result = score_windows(model, windows, reference)
        delta = result.perplexity / reference.perplexity - 1
        rows.append([fmt, "yes" if clip_search else "no", report.bits_per_weight, result.perplexity,
                     f"{delta:+.1%}", result.kl, result.agreement, round(report.seconds, 1)])
        record["results"].append({**report.as_dict(), **result.as_dict(), "delta_perplexity": delta})
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

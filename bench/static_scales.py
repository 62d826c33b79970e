"""Why one static input scale per layer fails on the default model: where each layer's largest input sits.

Runs the fp32 default model over the default calibration windows and, for the
input of every decoder Linear (the inputs `int8:static` takes its scale
from; layers reading one input listed once), records the largest magnitude over all tokens, over all tokens but
each window's first, and the 99.9th percentile of per-token maxima. A layer
whose largest input is far above the typical token's loses every other
token's resolution to one scale: at int8 a token whose largest input is r
times below the layer's keeps about 127 / r levels.

    python bench/static_scales.py
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from mixbits.models.structure import quantizable_linears
from mixbits.report import format_table

from common import calibrated_protocol, write_results

NAME = "static_scales"


def main() -> None:
    loaded, _, record, windows = calibrated_protocol()
    model = loaded.model
    token_max = defaultdict(list)  # layer -> [windows, tokens] per-token largest |input|

    def record_input(name, args):
        token_max[name].append(args[0].detach().abs().amax(dim=-1)[0])

    names = [name for name, _ in quantizable_linears(model, False)]
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda m, args, n=n: record_input(n, args)) for n in names]
    with torch.no_grad():
        for window in windows:
            model(window[None])
    for hook in hooks:
        hook.remove()
    rows, results, seen = [], [], []
    for name in names:
        maxima = torch.stack(token_max[name])  # [windows, tokens]
        if any(torch.equal(maxima, other) for other in seen):
            continue  # a layer reading the same input as one listed (k/v beside q, up beside gate)
        seen.append(maxima)
        largest = float(maxima.max())
        later = float(maxima[:, 1:].max())
        typical = float(maxima.median())
        p999 = float(torch.quantile(maxima.flatten(), 0.999))
        at_first = bool(largest > later)
        results.append({"layer": name, "largest": largest, "largest_after_first": later, "median_token": typical,
                        "p99.9_token": p999})
        rows.append([name, round(largest, 1), round(later, 1), round(p999, 1), round(typical, 2),
                     round(largest / typical), "yes" if at_first else "no"])
    record["results"] = results
    ratio = sorted(r["largest"] / r["median_token"] for r in results)
    first = sum(r["largest"] > r["largest_after_first"] for r in results)
    c = record["calibration"]
    header = (f"# Largest layer inputs on the calibration text\n\n`python bench/static_scales.py` — "
              f"{time.strftime('%Y-%m-%d')}. fp32 default model, {c['text']}, {c['count']} x {c['length']} tokens; "
              f"per decoder Linear input: the largest magnitude over all tokens, over all but each window's first, "
              f"the 99.9th percentile and the median of per-token maxima, and largest / median. In {first} of "
              f"{len(results)} layers the largest input is at a window's first token; largest / median token: median "
              f"{ratio[len(ratio) // 2]:.0f}, maximum {ratio[-1]:.0f}.\n")
    table = format_table(["layer input", "largest", "largest, first tokens left out", "p99.9 token", "median token",
                          "largest / median", "at a first token"], rows)
    write_results(NAME, record, header + "\n" + table)
    print(header)


if __name__ == "__main__":
    main()

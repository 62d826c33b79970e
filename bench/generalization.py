"""Does quality carry over to text the calibration never saw? Causes and fixes, on every evaluation domain.

For int3:g64 and int4:g64 (asymmetric), each row quantizes the default model
one way and evaluates it on the evaluation domains of `mixbits.corpus`:
pydoc (its first half is in the calibration mix; the old protocol calibrated
on it alone), Jane Austen's novels and the King James Bible (kinds of text no
calibration here contains). Rows:

- rtn: data-free round to nearest (the floor any calibration must beat);
- gptq, calib pydoc: the old protocol, 32 x 512 tokens from pydoc's start;
- gptq, calib fortunes: one other single kind (quotations and dialogue);
- gptq, calib mix: the default mix (pydoc, python, fortunes, jargon), 32 x 512;
- then on the mix: damping 0.1 instead of 0.01; the Hessian shrunk toward
  its diagonal, H <- (1 - s) H + s diag(H), for s from 0.1 to 1 (at 1 only
  per-input importances remain, as in llama.cpp's importance matrix); columns
  in natural order (no act-order);
  no clip search (GPTQ's group fit searches a clip ratio on the calibration
  output error); 128 windows instead of 32, alone and with shrinkage.

Resumable: finished rows in bench/results/generalization.json are kept.

    python bench/generalization.py [--only int3] [--row rtn --row 'calib mix, shrink 0.25']
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import mixbits
from mixbits import defaults
from mixbits.eval import evaluate_domains
from mixbits.report import format_table
from mixbits.solvers import GptqSettings

from common import domain_cells, domain_protocol, earlier_results, fp32_references, rewrite_report, write_results

NAME = "generalization"
FORMATS = ["int3:g64:asym", "int4:g64:asym"]
# label -> quantize() options. Settings are explicit, so rows keep their meaning when defaults change.
PLAIN = GptqSettings(damp=0.01, shrink=0.0, act_order=True)  # GPTQ as published (and mixbits before this study)


def _gptq(**options) -> dict:
    settings = dataclasses.replace(PLAIN, **{k: options.pop(k) for k in ("damp", "shrink", "act_order") if k in options})
    return {"solver": "gptq", "gptq": settings, **options}


ROWS = {
    "rtn": {"solver": "rtn"},
    "gptq, calib pydoc": _gptq(calibration="pydoc"),
    "gptq, calib mix": _gptq(),
    "gptq, calib mix, damp 0.1": _gptq(damp=0.1),
    "gptq, calib mix, shrink 0.1": _gptq(shrink=0.1),
    "gptq, calib mix, shrink 0.25": _gptq(shrink=0.25),
    "gptq, calib mix, shrink 0.5": _gptq(shrink=0.5),
    "gptq, calib mix, shrink 0.75": _gptq(shrink=0.75),
    "gptq, calib mix, shrink 1": _gptq(shrink=1.0),
    "gptq, calib mix, no act-order": _gptq(act_order=False),
    "gptq, calib mix, no clip search": _gptq(clip_search=False),
    "gptq, calib mix, shrink 0.25, no clip search": _gptq(shrink=0.25, clip_search=False),
    "gptq, calib mix, 128 windows": _gptq(calibration_windows=128),
    "gptq, calib mix, shrink 0.25, 128 windows": _gptq(shrink=0.25, calibration_windows=128),
    "gptq, calib fortunes": _gptq(calibration="fortunes"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only formats containing this text")
    parser.add_argument("--row", action="append", default=[],
                        help="run only this row: its label, or a text the labels to run contain (repeatable)")
    parser.add_argument("--report", action="store_true", help="only rewrite the Markdown from the committed JSON")
    args = parser.parse_args()
    if args.report:
        rewrite_report(NAME, _markdown)
        return

    loaded, domains, record = domain_protocol()
    record["results"] = earlier_results(NAME, record, ("domains", "model"))
    done = {(r["format"], r["row"]) for r in record["results"]}
    references = fp32_references(loaded, domains, record)
    wanted = args.row

    for name in FORMATS:
        if args.only not in name:
            continue
        for label, options in ROWS.items():
            if (name, label) in done or (wanted and not any(w == label or (w not in ROWS and w in label) for w in wanted)):
                continue
            model = copy.deepcopy(loaded.model)
            target = dataclasses.replace(loaded, model=model)
            started = time.perf_counter()
            report = mixbits.quantize(target, name, progress=False, **options)
            seconds = time.perf_counter() - started
            result = evaluate_domains(model, domains, references, progress=False)
            row = {"format": name, "row": label, "bits_per_weight": report.bits_per_weight,
                   "quantize_seconds": seconds, "quantization": {"calibration": report.calibration,
                                                                 "gptq": report.gptq.as_dict(), "solver": report.solver},
                   **result.as_dict()}
            record["results"].append(row)
            write_results(NAME, record, _markdown(record))
            deltas = ", ".join(f"{d['name']} {d['delta_perplexity']:+.1%}" for d in row["domains"])
            print(f"{name:14} {label:32} {deltas} ({seconds:.0f} s)", flush=True)
            del model, target


def _markdown(record: dict) -> str:
    names = [d["name"] for d in record["domains"]]
    seen = {d["name"] for d in record["domains"] if d["in_calibration_mix"]}
    headers = ["format", "row", "bpw"] + [f"Δ ppl {n}" + (" (in mix)" if n in seen else "") for n in names] + [
        "mean Δ, unseen kinds", "KL " + "/".join(names), "s"]
    rows = []
    order = list(ROWS)
    for r in sorted(record["results"], key=lambda r: (FORMATS.index(r["format"]), order.index(r["row"]))):
        by_name = {d["name"]: d for d in r["domains"]}
        rows.append([r["format"], r["row"], r["bits_per_weight"], *domain_cells(r, names),
                     " / ".join(f"{by_name[n]['kl']:.3f}" for n in names), round(r["quantize_seconds"])])
    fp32 = ", ".join(f"{n} {p:.3f}" for n, p in record["fp32_perplexity"].items())
    return "\n".join([
        f"# Quality on text the calibration never saw ({record['model']['name']})",
        "",
        "`python bench/generalization.py` (resumable: rows accumulate over runs; the last run was "
        f"`{record['command']}`)",
        "",
        f"fp32 perplexity: {fp32}. Each domain: {defaults.EVAL_WINDOWS} windows of {defaults.WINDOW_LEN} tokens "
        "from its middle. 'calib mix' is the default calibration mix (pydoc's first half, CPython source, fortunes, "
        "jargon; 32 x 512 tokens unless the row says otherwise); 'calib pydoc' the old protocol (32 x 512 tokens "
        "from pydoc's start). austen and kjv are kinds of text no calibration here contains.",
        "",
        format_table(headers, rows),
    ])


if __name__ == "__main__":
    main()

"""Below 3 bits: the solvers and formats of issue 17 against GPTQ, uniform and allocated, on every domain.

Each row quantizes the default model one way and evaluates it on the
evaluation domains of `mixbits.corpus` (pydoc, whose first half is in the
calibration mix, and austen and kjv, kinds of text no calibration here
holds). Targets: a uniform format (every block Linear alike: integer grids,
or vector codebooks vqDxI:ch of D weights per I-bit index with a scale per
row), or a plan
allocated by measured KL from the full sensitivity table
(bench/results/mixed/sensitivity.json) to a budget in bpw; a method's plan
is that same allocation with the method's solver on every calibrated layer,
so rows of one budget differ only by the method. 'plan B +vq' allocates
from that table extended by the vector codebooks of VECTOR_OPTIONS
(bench/results/low_bit/sensitivity.json, measured by `mixbits plan` as the
docstring's commands say), so plans mix them with the integer options
per layer; 'plan B +tc' from that table extended by the trellis codes of
TRELLIS_OPTIONS (bench/results/low_bit/sensitivity_trellis.json). Methods:

- gptq: block-sequential GPTQ (default settings: damping 0.01, Hessian shrink 0.25);
- gptaq a=A: GPTAQ, each layer fitted to the float model's output from the
  partly quantized model's input (`solvers.gptq.asymmetric_target`), a step
  A toward the least-squares target;
- +tune: then block-wise tuning of rounding offsets (for vector codebooks,
  the codebooks) and scales to the float block's output (`solvers.tuning`,
  default settings: 100 signed-gradient steps of 4 windows per block);
- +distill: then the scales tuned to the float model's logits
  (`solvers.distill`, default settings: 50 signed-gradient steps of one
  calibration window).

Resumable: finished rows in bench/results/low_bit.json are kept.

    python bench/low_bit.py [--only int3] [--method gptq --method 'gptaq a=0.25']

The '+vq' sensitivity table (the mixed table's options and VECTOR_OPTIONS; only the latter are measured), and the
'+tc' table (that one's options and TRELLIS_OPTIONS; only the latter are measured):

    mkdir -p bench/results/low_bit && cp bench/results/mixed/sensitivity.json bench/results/low_bit/
    mixbits plan --bpw 2.5 --sensitivity bench/results/low_bit/sensitivity.json --out /tmp/plan.json \
        --options OPTIONS_OF_THE_MIXED_TABLE,vq2x4:ch,vq2x5:ch,vq2x6:ch,vq4x8:ch
    cp bench/results/low_bit/sensitivity.json bench/results/low_bit/sensitivity_trellis.json
    mixbits plan --bpw 2.5 --sensitivity bench/results/low_bit/sensitivity_trellis.json --out /tmp/plan.json \
        --options OPTIONS_OF_THE_VQ_TABLE,trellis2x3:ch,trellis2x4:ch,trellis2x5:ch,trellis2x6:ch,trellis2x7:ch --kl-all
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import time

from mixbits import defaults
from mixbits.allocate import Budget
from mixbits.eval import evaluate_domains
from mixbits.mixes import allocated_plan
from mixbits.plan import KEEP, Plan
from mixbits.quantize import quantize
from mixbits.report import format_table
from mixbits.sensitivity import Sensitivity
from mixbits.solvers import GptqSettings
from mixbits.solvers.distill import DistillSettings
from mixbits.solvers.tuning import TuneSettings

from common import (RESULTS, calibrated_protocol, domain_cells, earlier_results, fp32_references, rewrite_report,
                    write_results)

NAME = "low_bit"
TARGETS = ["plan 2.0 +tc", "int2:g64:asym", "vq2x4:ch", "vq4x8:ch", "trellis2x4:ch", "vq2x5:ch", "trellis2x5:ch",
           "plan 2.5", "plan 2.5 +vq", "plan 2.5 +tc", "vq2x6:ch", "trellis2x6:ch", "int3:g64:asym", "plan 3.0",
           "plan 3.0 +vq", "plan 3.0 +tc", "plan 3.5", "plan 3.5 +tc"]
VECTOR_OPTIONS = ["vq2x4:ch", "vq2x5:ch", "vq2x6:ch", "vq4x8:ch"]  # what the '+vq' plans add to the menu
VECTOR_SENSITIVITY = RESULTS / "low_bit" / "sensitivity.json"
TRELLIS_OPTIONS = ["trellis2x3:ch", "trellis2x4:ch", "trellis2x5:ch", "trellis2x6:ch", "trellis2x7:ch"]  # '+tc' adds
TRELLIS_SENSITIVITY = RESULTS / "low_bit" / "sensitivity_trellis.json"
METHODS = {  # label -> (solver, GPTQ settings, block-wise tuning, distillation)
    "gptq": ("gptq", GptqSettings(), None, None),
    "gptaq a=0.25": ("gptaq", GptqSettings(asymmetry=0.25), None, None),
    "gptaq a=1": ("gptaq", GptqSettings(asymmetry=1.0), None, None),
    "gptq+tune": ("gptq", GptqSettings(), TuneSettings(), None),
    "gptaq a=0.25+tune": ("gptaq", GptqSettings(asymmetry=0.25), TuneSettings(), None),
    "gptaq a=0.25+distill": ("gptaq", GptqSettings(asymmetry=0.25), None, DistillSettings()),
}


def plan_with_solver(plan: Plan, solver: str) -> Plan:
    """`plan` with `solver` on every layer its allocation solves by GPTQ."""
    layers = [dataclasses.replace(layer, solver=solver) if layer.option != KEEP and layer.solver == "gptq" else layer
              for layer in plan.layers]
    return Plan(layers, plan.model, plan.budget, plan.damage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[],
                        help="run only this target, or targets containing this text, in this order (repeatable)")
    parser.add_argument("--method", action="append", default=[], help="run only this method (repeatable)")
    parser.add_argument("--report", action="store_true", help="only rewrite the Markdown from the committed JSON")
    args = parser.parse_args()
    if args.report:
        rewrite_report(NAME, _markdown)
        return

    tables = sensitivity_tables()
    loaded, domains, record, windows = calibrated_protocol()
    record["results"] = earlier_results(NAME, record, ("domains", "model", "calibration"))
    done = {(r["target"], r["method"]) for r in record["results"]}
    references = fp32_references(loaded, domains, record)

    # a text naming a target exactly picks it alone; other texts, every target containing them
    chosen = [t for text in args.only for t in TARGETS if (t == text if text in TARGETS else text in t)] \
        if args.only else TARGETS
    for target in dict.fromkeys(chosen):  # in the order --only names them
        for label in METHODS:
            if (target, label) in done or (args.method and label not in args.method):
                continue
            row = quantized_row(loaded, target, label, windows, tables, domains, references)
            record["results"].append(row)
            write_results(NAME, record, _markdown(record))
            deltas = ", ".join(f"{d['name']} {d['delta_perplexity']:+.1%}" for d in row["domains"])
            print(f"{target:14} {label:14} {row['bits_per_weight']:.3f} bpw  {deltas} ({row['quantize_seconds']:.0f} s)",
                  flush=True)


def sensitivity_tables() -> dict:
    """The sensitivity table of each kind of plan: '' the mixed table's, '+vq' and '+tc' its extensions (None if
    not measured)."""
    paths = {"+vq": VECTOR_SENSITIVITY, "+tc": TRELLIS_SENSITIVITY}
    tables = {suffix: Sensitivity.load(path) if path.exists() else None for suffix, path in paths.items()}
    return {"": Sensitivity.load(RESULTS / "mixed" / "sensitivity.json"), **tables}


def quantized_row(loaded, target: str, label: str, windows, tables: dict, domains, references) -> dict:
    """Quantize a copy of the model to `target` by method `label` on the calibration `windows` and evaluate it on
    every domain: the result row."""
    solver, settings, tune, distill = METHODS[label]
    model = copy.deepcopy(loaded.model)
    started = time.perf_counter()
    if target.startswith("plan "):
        suffix = target.split()[-1] if target.endswith(("+vq", "+tc")) else ""
        if tables[suffix] is None:
            raise SystemExit(f"{target} needs its sensitivity table; measure it as bench/low_bit.py's docstring says")
        plan = plan_with_solver(allocated_plan(tables[suffix], Budget(float(target.split()[1])), "kl"), solver)
        report = quantize(model, plan=plan, calibration=windows, gptq=settings, tune=tune, distill=distill,
                          progress=False)
    else:
        report = quantize(model, target, solver=solver, calibration=windows, gptq=settings, tune=tune,
                          distill=distill, progress=False)
    seconds = time.perf_counter() - started
    result = evaluate_domains(model, domains, references, progress=False)
    row = {"target": target, "method": label, "bits_per_weight": report.bits_per_weight, "quantize_seconds": seconds,
           "quantization": {"solver": report.solver, "gptq": report.gptq.as_dict(),
                            "tuning": report.as_dict()["tuning"], "distillation": report.as_dict()["distillation"]},
           **result.as_dict()}
    del model, report
    gc.collect()
    return row


def _markdown(record: dict) -> str:
    names = [d["name"] for d in record["domains"]]
    seen = {d["name"] for d in record["domains"] if d["in_calibration_mix"]}
    headers = ["target", "method", "bpw"] + [f"Δ ppl {n}" + (" (in mix)" if n in seen else "") for n in names] + [
        "mean Δ, unseen kinds", "mean KL", "quantize s"]
    rows = []
    for r in sorted(record["results"], key=lambda r: (TARGETS.index(r["target"]), list(METHODS).index(r["method"]))):
        rows.append([r["target"], r["method"], f"{r['bits_per_weight']:.3f}", *domain_cells(r, names),
                     f"{sum(d['kl'] for d in r['domains']) / len(r['domains']):.3f}", round(r["quantize_seconds"])])
    fp32 = ", ".join(f"{n} {p:.3f}" for n, p in record["fp32_perplexity"].items())
    return "\n".join([
        "# Below 3 bits: methods against GPTQ, uniform and allocated",
        "",
        f"`python bench/low_bit.py` (resumable: rows accumulate over runs; the last run was `{record['command']}`, "
        f"{time.strftime('%Y-%m-%d')}). {record['model']['name']}; calibration: the default mix, "
        f"{defaults.CALIBRATION_WINDOWS} x {defaults.CALIBRATION_LEN} tokens. fp32 perplexity: {fp32}; each domain "
        f"{defaults.EVAL_WINDOWS} windows of {defaults.WINDOW_LEN} tokens from its middle; austen and kjv are kinds of "
        "text no calibration here holds. 'plan B': the allocation by measured KL to B bpw from "
        "bench/results/mixed/sensitivity.json, the same for every method; 'plan B +vq': the same from that table and "
        f"the vector codebooks {', '.join(VECTOR_OPTIONS)} (bench/results/low_bit/sensitivity.json); 'plan B +tc': "
        f"from that table and the trellis codes {', '.join(TRELLIS_OPTIONS)} "
        "(bench/results/low_bit/sensitivity_trellis.json). vqDxI:ch: D "
        "weights per I-bit index into a codebook learned per matrix, a scale per row. trellisDxK:ch: rows rotated "
        "(random signs, Hadamard), then a walk through a 4096-state bit-shift trellis, D weights per K-bit step, "
        "codewords from a fixed Gaussian table, a scale per row. gptaq a=A: GPTAQ with a step A "
        "toward "
        "the float model's least-squares target; +tune: then block-wise tuning of rounding offsets (codebooks, for "
        "vector formats; nothing, for trellis codes) and scales to the float block's output (100 signed-gradient steps of 4 windows per block); "
        "+distill: then the scales to the float model's logits (50 signed-gradient steps of one window). "
        "Quantize seconds on this machine, one process, one row at a time.",
        "",
        format_table(headers, rows),
    ])


if __name__ == "__main__":
    main()

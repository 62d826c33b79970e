"""Quantized activations on the default model: W8A8 and W4A8 against weight-only, with and without SmoothQuant.

Every row quantizes the decoder's Linears (weights by the named solver; the
default calibration mix for GPTQ and SmoothQuant), rounds their inputs to
the activation format as the model runs (`mixbits quantize --act`), and is
scored on every evaluation domain against fp32 as every other table is.
Activation formats: `int8:token` (a float32 scale per token, dynamic),
`int8:g32` (per 32 inputs of a token, as llama.cpp's Q8_0 activations),
`int8:static` (one float32 scale per layer input, from the largest value the
calibration mix gives it),
`int4:token` (W8A4 and W4A4 research points; W4A4 also with QuaRot's
rotation, an online Hadamard before every down_proj included, in fake
quantization only: checkpoints do not hold online rotations). The embedding
and the head stay 16-bit.

Prefill speed: the 512-token prompt of bench/speed.py through mixbits'
decoder, for the fp32 model and for the W8A8 and W4A8 checkpoints of this
table (built here, kept in bench/work/activations/), in this process, best
of 3; the integer path multiplies int8 activation codes by the weight codes.

The run is resumable: finished rows are kept in bench/results/activations.json.

    python bench/activations.py
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import mixbits
from mixbits import defaults
from mixbits.eval import evaluate_domains
from mixbits.report import format_table

from common import calibrated_protocol, domain_cells, earlier_results, fp32_references, rewrite_report, write_results

NAME = "activations"
WORK = Path(__file__).parent / "work" / "activations"
# (label, weight format, solver, activation format or None, options: SmoothQuant, QuaRot rotation)
SMOOTH, ROTATE = {"smooth": True}, {"rotate": True, "online_hadamard": True}
ROWS = [
    ("W8A16", "int8:ch:sym", "rtn", None, {}),
    ("W8A8", "int8:ch:sym", "rtn", "int8:token", {}),
    ("W8A8 + SmoothQuant", "int8:ch:sym", "rtn", "int8:token", SMOOTH),
    ("W8A8 (blocks of 32)", "int8:ch:sym", "rtn", "int8:g32", {}),
    ("W8A8 static", "int8:ch:sym", "rtn", "int8:static", {}),
    ("W8A8 static + SmoothQuant", "int8:ch:sym", "rtn", "int8:static", SMOOTH),
    ("W4A16", "q4_0", "gptq", None, {}),
    ("W4A8", "q4_0", "gptq", "int8:g32", {}),
    ("W4A8 + SmoothQuant", "q4_0", "gptq", "int8:g32", SMOOTH),
    ("W4A16 NF4", "nf4:g64", "gptq", None, {}),
    ("W4A8 NF4", "nf4:g64", "gptq", "int8:g32", {}),
    ("W4A16 NVFP4", "nvfp4", "rtn", None, {}),  # RTN: one GPTQ pass of NVFP4 takes over 20 CPU minutes
    ("W4A8 NVFP4", "nvfp4", "rtn", "int8:g32", {}),
    ("W4A8 per token", "int4:g128:asym", "gptq", "int8:token", {}),
    ("W4A8 per token + SmoothQuant", "int4:g128:asym", "gptq", "int8:token", SMOOTH),
    ("W8A4", "int8:ch:sym", "rtn", "int4:token", {}),
    ("W8A4 + SmoothQuant", "int8:ch:sym", "rtn", "int4:token", SMOOTH),
    ("W4A4", "int4:g128:asym", "gptq", "int4:token", {}),
    ("W4A4 + rotation", "int4:g128:asym", "gptq", "int4:token", ROTATE),
]
SPEED = ["W8A8", "W8A8 static", "W4A8", "W4A8 NF4", "W4A8 NVFP4"]  # rows whose checkpoints are timed against fp32
PROMPT, REPEATS = 512, 3


def prefill_tokens_per_s(model) -> float:
    import torch

    from mixbits.runtime.decode import Decoder

    decoder = Decoder(model)
    ids = torch.randint(100, 40000, (PROMPT,), generator=torch.Generator().manual_seed(0))
    decoder.generate(ids[:16], 2)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        decoder.generate(ids, 1)
        times.append(time.perf_counter() - start)
    return PROMPT / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only rewrite the Markdown from the committed JSON")
    args = parser.parse_args()
    if args.report:
        rewrite_report(NAME, _markdown)
        return

    from mixbits.io.checkpoint import is_checkpoint, load_quantized, save_quantized

    loaded, domains, record, calibration = calibrated_protocol()
    done = {r["label"]: r for r in earlier_results(NAME, record, ("domains", "model", "calibration"))}
    for label in SPEED:  # a timed row is redone if its checkpoint is gone
        if label in done and not is_checkpoint(WORK / label):
            del done[label]
    references = fp32_references(loaded, domains, record)
    import torch

    record["threads"] = torch.get_num_threads()
    record["prefill"] = {"fp32": prefill_tokens_per_s(loaded.model)}
    for label, fmt, solver, act, options in ROWS:
        if label in done:
            row = done[label]
        else:
            model = copy.deepcopy(loaded.model)
            cpu = time.process_time()
            report = mixbits.quantize(model, fmt, solver=solver, activation=act, calibration=calibration,
                                      progress=False, **options)
            cpu = time.process_time() - cpu
            result = evaluate_domains(model, domains, references, progress=False)
            row = {"label": label, **report.as_dict(), "activation": act, **result.as_dict(), "cpu_seconds": cpu}
            row.pop("awq_scales")
            if label in SPEED:
                save_quantized(model, report, WORK / label, tokenizer=loaded.tokenizer,
                               source={"name": loaded.name, "sha256": loaded.sha256})
            done[label] = row
            del model
            print(f"{label}: mean Δ ppl {row['mean']['delta_perplexity']:+.1%}, unseen kinds "
                  f"{row['mean_unseen']['delta_perplexity']:+.1%}", flush=True)
        record["results"] = [done[r[0]] for r in ROWS if r[0] in done]
        write_results(NAME, record, _markdown(record))
    for label in SPEED:
        record["prefill"][label] = prefill_tokens_per_s(load_quantized(WORK / label).model)
    write_results(NAME, record, _markdown(record))


def _markdown(record: dict) -> str:
    names = [d["name"] for d in record["domains"]]
    seen = {d["name"] for d in record["domains"] if d["in_calibration_mix"]}
    rows = [[r["label"], r["format"], r["method"], r["activation"] or "float", *domain_cells(r, names),
             r["mean"]["kl"], r["mean"]["agreement"], round(r["cpu_seconds"])] for r in record["results"]]
    fp32 = ", ".join(f"{n} {p:.3f}" for n, p in record["fp32_perplexity"].items())
    prefill = record.get("prefill", {})
    speed = "; ".join(f"{label} {value:.0f} tok/s ({value / prefill['fp32']:.2f}x fp32)" if label != "fp32"
                      else f"fp32 {value:.0f} tok/s" for label, value in prefill.items())
    c = record["calibration"]
    header = (f"# Quantized activations: W8A8 and W4A8\n\n`python bench/activations.py` — {time.strftime('%Y-%m-%d')}. "
              f"Calibration (GPTQ, SmoothQuant): {c['text']}, {c['count']} x {c['length']} tokens. Evaluation: "
              f"{len(names)} domains of {defaults.EVAL_WINDOWS} x {defaults.WINDOW_LEN} tokens, fp32 perplexity {fp32}; "
              f"{', '.join(sorted(seen)) or 'none'} in the calibration mix. Embedding and head in 16 bits.\n\n"
              f"Prefill of a {PROMPT}-token prompt through mixbits' decoder, {record.get('threads', '?')} threads, best of "
              f"{REPEATS}: {speed}.\n")
    headers = ["row", "weights", "method", "activations"] + [
        f"Δ ppl {n}" + (" (in mix)" if n in seen else "") for n in names] + [
        "mean Δ, unseen kinds", "mean KL", "top-1 agree", "quantize CPU s"]
    return header + "\n" + format_table(headers, rows)


if __name__ == "__main__":
    main()

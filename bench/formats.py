"""Number formats compared on the default model.

Part 1, model level: round-to-nearest (default magnitude-weighted clip search)
with every format class at about 4 and 3 bits per weight: bpw of the decoder
linears, perplexity change on every evaluation domain and the mean over the
kinds of text the calibration mix does not hold, mean KL against fp32 and
top-1 agreement. RTN uses no data, so no domain is "seen".

Part 2, tensor level: signal-to-quantization-noise ratio over all 210 decoder
linear weights, MXINT8 vs MXFP8 (E4M3) and NVINT4 vs NVFP4, each with and
without a Hadamard rotation of the input dimension (W -> W R, R orthogonal).
Plain absmax scaling (no clip search), as in "INT v.s. FP" (Chen et al.).

Writes bench/results/formats.{md,json}.

    python bench/formats.py [--sqnr-only]
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

import mixbits
from mixbits.eval import evaluate_domains
from mixbits.formats import parse_format
from mixbits.models import quantizable_linears
from mixbits.report import format_table
from mixbits.transforms import rotation_matrix

from common import domain_cells, domain_protocol, fp32_references, write_results

CLASSES = {
    "4-bit": ["int4:g128:asym", "int4:g64:asym", "int4:g64:sym", "fp4_e2m1:g64", "fp4_e2m1:g32:scale=fp16",
              "mxfp4", "nvfp4", "nvint4", "nf4:g64", "lut4:ch", "lut4:g128"],
    "3-bit": ["int3:g128:asym", "int3:g64:asym", "int3:g64:sym", "fp3_e2m0:g64", "log3:g64", "lut3:ch", "lut3:g128"],
}
SQNR_PAIRS = [("mxint8", "mxfp8_e4m3"), ("nvint4", "nvfp4")]


def model_level(loaded, domains, record) -> str:
    names = [d.name for d in domains]
    references = fp32_references(loaded, domains, record)
    rows, results = [], []
    for label, formats in CLASSES.items():
        for name in formats:
            model = copy.deepcopy(loaded.model)
            report = mixbits.quantize(model, name)
            result = evaluate_domains(model, domains, references, progress=False).as_dict()
            results.append({"class": label, **report.as_dict(), **result})
            rows.append([name, label, report.bits_per_weight, *domain_cells(results[-1], names), result["mean"]["kl"],
                         result["mean"]["agreement"], round(report.seconds, 1)])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
            del model
    record["model_level"] = {"results": results}
    return format_table(["format", "class", "bpw", *(f"Δ ppl {n}" for n in names), "mean Δ, unseen kinds", "mean KL",
                         "top-1 agree", "quantize s"], rows)


def tensor_level(weights: list[torch.Tensor]) -> tuple[str, dict]:
    """SQNR of each integer/float pair over `weights`, without and with rotation: (Markdown, record)."""
    signal = sum(w.double().square().sum().item() for w in weights)
    rotations = {cols: rotation_matrix(cols) for cols in sorted({w.shape[1] for w in weights})}
    noise: dict[tuple[str, bool], float] = {}
    per_layer: dict[tuple[str, bool], list[float]] = {}
    for name in [n for pair in SQNR_PAIRS for n in pair]:
        fmt = parse_format(name)
        for rotate in (False, True):
            total, layers = 0.0, []
            for weight in weights:
                weight = weight.detach().float()
                if rotate:
                    weight = weight @ rotations[weight.shape[1]][0]
                error = (fmt.quantize(weight).dequantize() - weight).double().square().sum().item()
                total += error
                layers.append(10 * math.log10(weight.double().square().sum().item() / error))
            noise[(name, rotate)] = total
            per_layer[(name, rotate)] = layers
    rows, results = [], []
    for integer, floating in SQNR_PAIRS:
        for rotate in (False, True):
            sqnr_int = 10 * math.log10(signal / noise[(integer, rotate)])
            sqnr_fp = 10 * math.log10(signal / noise[(floating, rotate)])
            int_wins = sum(a > b for a, b in zip(per_layer[(integer, rotate)], per_layer[(floating, rotate)]))
            rows.append([f"{integer} vs {floating}", "yes" if rotate else "no", sqnr_int, sqnr_fp,
                         f"{sqnr_int - sqnr_fp:+.2f}", f"{int_wins}/{len(weights)}"])
            results.append({"integer": integer, "float": floating, "rotated": rotate, "sqnr_int_db": sqnr_int,
                            "sqnr_float_db": sqnr_fp, "layers_int_wins": int_wins, "layers": len(weights)})
    kinds = {str(cols): kind for cols, (_, kind) in rotations.items()}
    note = ", ".join(f"{c} columns: {k}" for c, k in kinds.items())
    table = format_table(["pair", "rotated", "SQNR int dB", "SQNR float dB", "int − float dB", "layers int wins"], rows)
    return f"Rotation used: {note}.\n\n{table}", {"rotations": kinds, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sqnr-only", action="store_true", help="only the tensor-level study")
    args = parser.parse_args()
    started = time.time()
    loaded, domains, record = domain_protocol()
    sqnr, record["tensor_level"] = tensor_level([m.weight for _, m in quantizable_linears(loaded.model)])
    print(sqnr, flush=True)
    sections = [f"Formats on {record['model']['name']} (sha256 {record['model']['sha256'][:12]}).\n\nCommand: `{record['command']}`"]
    if not args.sqnr_only:
        models = model_level(loaded, domains, record)
        print(models)
        fp32 = ", ".join(f"{n} {p:.3f}" for n, p in record["fp32_perplexity"].items())
        sections.append(f"## Round-to-nearest by format class\n\n{len(domains)} domains of 24 x 512 tokens from each "
                        f"one's middle (fp32 perplexity {fp32}); 'unseen kinds' are the domains whose kind of text the "
                        f"default calibration mix does not hold. bpw counts the 210 decoder linears.\n\n{models}")
    sections.append(f"## Tensor-level SQNR over the 210 decoder linear weights\n\n{sqnr}")
    record["seconds"] = time.time() - started
    write_results("formats" if not args.sqnr_only else "formats_sqnr", record, "\n\n".join(sections))


if __name__ == "__main__":
    main()

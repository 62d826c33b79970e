"""Number formats compared on the default model.

Part 1, model level: round-to-nearest (default magnitude-weighted clip search)
with every format class at about 4 and 3 bits per weight: bpw of the decoder
linears, perplexity, KL against fp32, top-1 agreement.

Part 2, tensor level: signal-to-quantization-noise ratio over all 210 decoder
linear weights, MXINT8 vs MXFP8 (E4M3) and NVINT4 vs NVFP4, each with and
without a Hadamard rotation of the input dimension (W -> W R, R orthogonal).
Plain absmax scaling (no clip search), as in "INT v.s. FP" (Chen et al.).

Writes bench/results/formats.{md,json}.

    python bench/formats.py [--windows 24] [--sqnr-only]
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

import mixbits
from mixbits.eval import ReferenceScores, score_windows
from mixbits.formats import parse_format
from mixbits.models import quantizable_linears
from mixbits.report import format_table
from mixbits.transforms import rotation_matrix

from common import protocol, write_results

CLASSES = {
    "4-bit": ["int4:g128:asym", "int4:g64:asym", "int4:g64:sym", "fp4_e2m1:g64", "fp4_e2m1:g32:scale=fp16",
              "mxfp4", "nvfp4", "nvint4", "nf4:g64", "lut4:ch", "lut4:g128"],
    "3-bit": ["int3:g128:asym", "int3:g64:asym", "int3:g64:sym", "fp3_e2m0:g64", "log3:g64", "lut3:ch", "lut3:g128"],
}
SQNR_PAIRS = [("mxint8", "mxfp8_e4m3"), ("nvint4", "nvfp4")]


def model_level(loaded, windows, record) -> str:
    reference = ReferenceScores(loaded.model, windows)
    rows, results = [["fp32", "—", 32.0, reference.perplexity, None, None, None, None]], []
    for label, names in CLASSES.items():
        for name in names:
            model = copy.deepcopy(loaded.model)
            report = mixbits.quantize(model, name)
            result = score_windows(model, windows, reference)
            delta = result.perplexity / reference.perplexity - 1
            rows.append([name, label, report.bits_per_weight, result.perplexity, f"{delta:+.1%}", result.kl,
                         result.agreement, round(report.seconds, 1)])
            results.append({"class": label, **report.as_dict(), "evaluation": result.as_dict(), "delta_perplexity": delta})
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
            del model
    record["model_level"] = {"fp32_perplexity": reference.perplexity, "results": results}
    return format_table(["format", "class", "bpw", "perplexity", "Δ ppl", "KL", "top-1 agree", "quantize s"], rows)


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
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--sqnr-only", action="store_true", help="only the tensor-level study")
    args = parser.parse_args()
    started = time.time()
    loaded, windows, record = protocol(args.windows)
    sqnr, record["tensor_level"] = tensor_level([m.weight for _, m in quantizable_linears(loaded.model)])
    print(sqnr, flush=True)
    sections = [f"Formats on {record['model']['name']} (sha256 {record['model']['sha256'][:12]}).\n\nCommand: `{record['command']}`"]
    if not args.sqnr_only:
        models = model_level(loaded, windows, record)
        print(models)
        sections.append(f"## Round-to-nearest by format class\n\n{args.windows} windows x 512 tokens of "
                        f"{record['text']['name']}; bpw counts the 210 decoder linears.\n\n{models}")
    sections.append(f"## Tensor-level SQNR over the 210 decoder linear weights\n\n{sqnr}")
    record["seconds"] = time.time() - started
    write_results("formats" if not args.sqnr_only else "formats_sqnr", record, "\n\n".join(sections))


if __name__ == "__main__":
    main()

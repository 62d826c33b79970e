"""Speed of the integer-dot kernels for every weight format they serve, on the default model's layer shapes.

For each weight format, random weights of the default model's MLP shapes
(gate/up: 1536 x 576 stacked to 3072 x 576; down: 576 x 1536) are quantized
by rounding to nearest, and their runtime modules multiply int8 inputs
(`int8:g32`, as llama.cpp's Q8_0 activations) for one row (a decode step) and
512 rows (a prefill), through the modules' forward as the decoder's prefill
calls them (a learned table's layer dequantizes itself above 8 rows: its
row-wise kernel is slower there). Reported: microseconds per call of the two layers
together and the ratio to Q4_0's, best of REPEATS; and the float32 product
(torch's F.linear on float weights) as a baseline. All formats run in this
one process, one after another, at the threads given.

    python bench/kernel_formats.py [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torch.nn import functional as F

from mixbits.activations import parse_activation
from mixbits.formats import parse_format
from mixbits.record import command_line, versions
from mixbits.report import format_table
from mixbits.runtime import DequantLinear, IntLinear, TableLinear, quantized_linear
from mixbits.runtime.kernels import native
from mixbits.runtime.linear import with_activation
from mixbits.solvers import round_to_nearest

from common import write_results

SHAPES = [(3072, 576), (576, 1536)]  # gate/up stacked, down: one MLP of the default model
FORMATS = [
    ("q4_0", "INT4, fp16 scales, groups of 32"),
    ("q8_0", "INT8, fp16 scales, groups of 32"),
    ("int4:g128:asym", "INT4 with zero points"),
    ("q4_k", "INT4, two-level scales"),
    ("mxfp4", "FP4 E2M1 table, E8M0 scales"),
    ("nvfp4", "FP4 E2M1 table, groups of 16, E4M3 scales"),
    ("nf4:g64", "NF4 table, 14-bit codes"),
    ("lut4:g128", "learned table per row and group"),
]
FALLBACK = ("lut4:g128", "learned table, dequantized at every call (the path without its kernel)")
ACTIVATION = "int8:g32"
ROWS = (1, 512)


def best_us(run, x: torch.Tensor, repeats: int) -> float:
    run(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if native() is None:
        raise SystemExit("the integer kernels are not built on this machine (no compiler or no AVX2)")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) * 0.02 for shape in SHAPES]
    inputs = {rows: [torch.randn(rows, shape[1], generator=generator) for shape in SHAPES] for rows in ROWS}
    activation = parse_activation(ACTIVATION)
    record = {"command": command_line(), "versions": versions(), "isa": native().qdot_isa(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads},
              "activation": ACTIVATION, "shapes": SHAPES, "repeats": args.repeats, "results": []}

    def timed(label: str, kind: str, layers) -> dict:
        times = {rows: sum(best_us(layer, x, args.repeats) for layer, x in zip(layers, inputs[rows])) for rows in ROWS}
        result = {"format": label, "kernel": kind, **{f"us_{rows}": t for rows, t in times.items()}}
        print(result, flush=True)
        return result

    record["results"].append(timed("float32", "F.linear", [lambda x, w=w: F.linear(x, w) for w in weights]))
    for name, what in FORMATS:
        modules = [quantized_linear(round_to_nearest(w, parse_format(name)), None, activation) for w in weights]
        kind = type(modules[0]).__name__
        if not isinstance(modules[0], (IntLinear, TableLinear)):
            raise SystemExit(f"{name} did not get an integer kernel ({kind})")
        record["results"].append({**timed(name, kind, modules), "what": what})
    name, what = FALLBACK  # what a learned table ran on before its kernel: the layer dequantized at every call
    modules = [with_activation(DequantLinear(round_to_nearest(w, parse_format(name)), None), activation) for w in weights]
    record["results"].append({**timed(name, "DequantLinear", modules), "what": what})
    write_results("kernel_formats", record, markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    q4 = next(r for r in record["results"] if r["format"] == "q4_0")
    rows = [[r["format"], r.get("what", "float32 weights, float inputs"), r["kernel"],
             *[cell for n in ROWS for cell in (round(r[f"us_{n}"], 1), f"{r[f'us_{n}'] / q4[f'us_{n}']:.2f}")]]
            for r in record["results"]]
    headers = ["format", "what", "module"] + [h for n in ROWS for h in (f"{n} row{'s' * (n > 1)}: µs", "× Q4_0")]
    m = record["machine"]
    header = (f"# Integer-dot kernels by weight format\n\n`{record['command']}` — {time.strftime('%Y-%m-%d')}, "
              f"{record['isa']} kernels, {m['torch_threads']} threads, inputs {record['activation']}. One MLP of the "
              f"default model (gate/up {record['shapes'][0][0]} x {record['shapes'][0][1]}, down "
              f"{record['shapes'][1][0]} x {record['shapes'][1][1]}), random weights rounded to nearest; time per call "
              f"of both products, best of {record['repeats']}, all in one process.\n")
    return header + "\n" + format_table(headers, rows)


if __name__ == "__main__":
    main()

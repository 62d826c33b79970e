"""Speed of vector codebooks and trellis codes in the packed runtime, against int4 and int3, side by side in one process.

Two measurements, every format in this one process one after another:

- kernels: one MLP of the default model (gate/up 3072 x 576 stacked, down
  576 x 1536), random weights rounded to nearest; microseconds per call of
  both products through the runtime modules (`quantized_linear`) with float
  inputs, for 1 row (decode) and 512 rows (prefill), best of REPEATS; and the
  bytes the two modules hold;
- decode: the default model with every block Linear replaced by its runtime
  module (RTN of its own weights: the speed does not depend on the codes),
  generated greedily by mixbits' decoder (`runtime.decode.Decoder`), 64
  tokens after a 32-token prompt minus the time of 1, best of 5; and the
  bytes of weights each token reads.

Ratios are to int4:g128:asym, measured in the same run.

    python bench/codebook_speed.py [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import torch
from torch import nn

from mixbits.formats import parse_format
from mixbits.models import load_model
from mixbits.record import command_line, versions
from mixbits.report import format_table
from mixbits.runtime import quantized_linear
from mixbits.runtime.decode import Decoder
from mixbits.runtime.kernels import native
from mixbits.solvers import round_to_nearest

from common import write_results

SHAPES = [(3072, 576), (576, 1536)]
FORMATS = ["int4:g128:asym", "int3:g64:asym", "vq2x6:ch", "vq2x5:ch", "vq4x8:ch", "trellis2x6:ch", "trellis2x5:ch",
           "trellis2x4:ch"]
BASE = "int4:g128:asym"
ROWS = (1, 512)
PROMPT, NEW = 32, 64


def best_seconds(run, repeats: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def held_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def packed_model(model: nn.Module, fmt) -> nn.Module:
    """A copy of `model` with every block Linear as its runtime module under `fmt` (RTN)."""
    model = copy.deepcopy(model)
    for block in model.model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    quantized = round_to_nearest(child.weight.detach(), fmt)
                    setattr(parent, name, quantized_linear(quantized, child.bias))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if native() is None:
        raise SystemExit("the native kernels are not built on this machine (no compiler or no AVX2)")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) * 0.02 for shape in SHAPES]
    inputs = {rows: [torch.randn(rows, shape[1], generator=generator) for shape in SHAPES] for rows in ROWS}
    loaded = load_model()
    prompt = torch.randint(100, 40000, (PROMPT,), generator=torch.Generator().manual_seed(0))
    record = {"command": command_line(), "versions": versions(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads},
              "shapes": SHAPES, "repeats": args.repeats, "model": loaded.name, "results": []}
    for name in FORMATS:
        fmt = parse_format(name)
        modules = [quantized_linear(round_to_nearest(w, fmt)) for w in weights]
        with torch.no_grad():
            times = {rows: sum(best_seconds(lambda m=m, x=x: m(x), args.repeats) for m, x in zip(modules, inputs[rows]))
                     for rows in ROWS}
            model = packed_model(loaded.model, fmt)
            decoder = Decoder(model)
            decoder.generate(prompt[:16], 2)  # warm up
            one = best_seconds(lambda: decoder.generate(prompt, 1), 5)
            many = best_seconds(lambda: decoder.generate(prompt, 1 + NEW), 5)
        per_token = sum(held_bytes(m) for m in model.model.layers.modules() if hasattr(m, "codes") or hasattr(m, "streams"))
        result = {"format": name, "module": type(modules[0]).__name__,
                  "bits_per_weight": sum(fmt.bits(*s) for s in SHAPES) / sum(r * c for r, c in SHAPES),
                  "mlp_bytes": sum(held_bytes(m) for m in modules),
                  **{f"us_{rows}": t * 1e6 for rows, t in times.items()},
                  "decode_tokens_per_s": NEW / (many - one), "block_weight_bytes": per_token}
        record["results"].append(result)
        print(result, flush=True)
        del model, decoder
    write_results("codebook_speed", record, markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    base = next(r for r in record["results"] if r["format"] == BASE)
    rows = [[r["format"], r["module"], f"{r['bits_per_weight']:.3f}", f"{r['mlp_bytes'] / 2**20:.2f}",
             *[cell for n in ROWS for cell in (round(r[f"us_{n}"], 1), f"{r[f'us_{n}'] / base[f'us_{n}']:.2f}")],
             f"{r['block_weight_bytes'] / 1e6:.1f}", f"{r['decode_tokens_per_s']:.1f}",
             f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}"]
            for r in record["results"]]
    headers = ["format", "module", "bpw (stored)", "MLP MiB held", "1 row: µs", f"× {BASE}", "512 rows: µs",
               f"× {BASE}", "block weights MB held", "decode tok/s", f"× {BASE}"]
    m = record["machine"]
    return "\n".join([
        "# Vector codebooks and trellis codes in the packed runtime: kernel and decode speed against int4 and int3",
        "",
        f"`{record['command']}` — {time.strftime('%Y-%m-%d')}, {m['torch_threads']} threads, all in one process. "
        f"Kernels: one MLP of the default model (gate/up {record['shapes'][0][0]} x {record['shapes'][0][1]}, down "
        f"{record['shapes'][1][0]} x {record['shapes'][1][1]}), random weights rounded to nearest, float inputs, time "
        f"per call of both products, best of {record['repeats']}. Decode: {record['model']} with every block Linear "
        f"packed (RTN of its weights), mixbits' decoder, {NEW} greedy tokens after a {PROMPT}-token prompt, best of 5 "
        "(the embedding and head stay float32). Held bytes are the runtime's in memory (codes of up to 8 bits one "
        "per byte, wider ones two; trellis codes as their packed bit streams), not the checkpoint's packed bits. "
        "Trellis layers rotate their inputs (a Hadamard transform) in every call, counted in their times.",
        "",
        format_table(headers, rows),
    ])


if __name__ == "__main__":
    main()

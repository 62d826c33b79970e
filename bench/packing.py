"""Throughput of bit packing and unpacking for every code width 1..8.

Packs and unpacks 16M random uint8 codes per width, keeps the best of 3 runs,
checks the round trip, prints a Markdown table (million codes per second and
MB/s of packed bytes) and writes bench/results/packing.{md,json}. No model is
loaded: packing cost depends only on the number of codes.

    python bench/packing.py [--codes 16777216] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from mixbits.packing import pack, packed_size, unpack
from mixbits.record import command_line, versions
from mixbits.report import format_table

from common import write_results


def best_seconds(run, repeats: int) -> tuple[float, torch.Tensor]:
    """Fastest wall time of `repeats` calls, and the last result."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, default=1 << 24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    record = {
        "command": command_line(),
        "versions": versions(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "codes": args.codes,
        "repeats": args.repeats,
        "results": [],
    }
    generator = torch.Generator().manual_seed(0)
    rows = []
    for width in range(1, 9):
        codes = torch.randint(0, 2**width, (args.codes,), generator=generator, dtype=torch.uint8)
        pack_s, data = best_seconds(lambda: pack(codes, width), args.repeats)
        unpack_s, back = best_seconds(lambda: unpack(data, width, args.codes), args.repeats)
        if not torch.equal(back, codes):
            raise SystemExit(f"round trip failed at width {width}")
        size = packed_size(args.codes, width)
        result = {
            "width": width, "packed_bytes": size, "pack_seconds": pack_s, "unpack_seconds": unpack_s,
            "pack_mcodes_per_s": args.codes / pack_s / 1e6, "pack_mb_per_s": size / pack_s / 1e6,
            "unpack_mcodes_per_s": args.codes / unpack_s / 1e6, "unpack_mb_per_s": size / unpack_s / 1e6,
        }
        record["results"].append(result)
        rows.append([width, size / 1e6, *(round(result[key]) for key in
                     ("pack_mcodes_per_s", "pack_mb_per_s", "unpack_mcodes_per_s", "unpack_mb_per_s"))])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    table = format_table(["width", "packed MB", "pack Mcodes/s", "pack MB/s", "unpack Mcodes/s", "unpack MB/s"], rows)
    print(table)
    header = (f"Bit packing of {args.codes:,} random codes per width, best of {args.repeats} runs, "
              f"torch {record['versions']['torch']} on {record['machine']['torch_threads']} CPU threads. "
              "MB/s counts packed bytes (the output of pack, the input of unpack); MB = 10^6 bytes.\n\n"
              f"Command: `{record['command']}`\n")
    write_results("packing", record, header + "\n" + table)


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"total {time.time() - started:.0f} s")

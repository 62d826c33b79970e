"""Peak resident memory of a whole quantization pass, each in a fresh process.

bench/calibrated.py runs every configuration in one long process that also
holds the reference scores (2.4 GB), so its peaks are only lower bounds of
the rise a pass causes. Here each configuration runs as its own
`mixbits quantize ... --no-eval --json` and reports the process's peak
resident memory during quantization (VmHWM, reset when quantization starts;
the loaded float32 model, about 540 MB, is included).

    python bench/peak_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys

from common import write_results

from mixbits.report import format_table

RUNS = [
    ["--format", "int4:g64:asym"],
    ["--format", "int4:g64:asym", "--solver", "gptq"],
]


def main() -> None:
    rows, results = [], []
    for arguments in RUNS:
        command = [sys.executable, "-m", "mixbits", "quantize", *arguments, "--no-eval", "--json"]
        print(" ".join(["mixbits", "quantize", *arguments, "--no-eval", "--json"]), file=sys.stderr)
        record = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        quantization = record["quantization"]
        results.append({"arguments": arguments, "quantization": {k: v for k, v in quantization.items() if k != "awq_scales"}})
        rows.append([quantization["format"], quantization["method"], round(quantization["seconds"], 1),
                     round(quantization["peak_memory_bytes"] / 2**20)])
    table = format_table(["format", "method", "quantize s", "peak RSS MiB"], rows)
    record = {"command": "python peak_memory.py", "versions": record["versions"], "model": record["model"], "runs": results}
    markdown = "# Peak resident memory of a quantization pass (fresh process each)\n\n" + table
    write_results("peak_memory", record, markdown)
    print(markdown)


if __name__ == "__main__":
    main()

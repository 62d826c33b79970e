"""`mixbits quantize --bpw 3.0` end to end on the default model: wall time of the command as a user runs it.

Measures the sensitivity (selective KL for the budget), allocates, quantizes block-sequentially and writes the
packed checkpoint; `--no-eval`, as evaluation is timed elsewhere. One run; this VM's speed drifts.

    python bench/quantize_time.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mixbits.models import load_model
from mixbits.record import provenance

from common import write_results

NAME = "quantize_time"
COMMAND = ["quantize", "--bpw", "3.0", "--no-eval"]


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="quantize-time-")) / "checkpoint"
    command = [str(Path(sys.executable).with_name("mixbits")), *COMMAND, "--out", str(out)]
    try:
        timer = time.perf_counter()
        finished = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - timer
        if finished.returncode:
            sys.exit(f"mixbits quantize failed: {finished.stderr.strip().splitlines()[-1]}")
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(out.parent)
    loaded = load_model()  # after the run, for its name and hash: never two torch processes at once
    record = provenance(loaded.name, loaded.sha256)
    record.update({"command": "mixbits " + " ".join(COMMAND) + " --out DIR", "seconds": seconds,
                   "checkpoint_bytes": size, "stdout": finished.stdout.splitlines()[-12:]})
    markdown = (f"# `mixbits quantize --bpw 3.0` end to end\n\n`python bench/quantize_time.py` — "
                f"{time.strftime('%Y-%m-%d')}. `{record['command']}` on the default model took {seconds:.0f} s "
                f"({seconds / 60:.1f} min) wall time: loading, the selective measurement, allocation, block-sequential "
                f"GPTQ and writing the {size / 2**20:.1f} MiB checkpoint. Its last lines:\n\n```\n"
                + "\n".join(record["stdout"]) + "\n```")
    write_results(NAME, record, markdown)
    print(markdown)


if __name__ == "__main__":
    main()

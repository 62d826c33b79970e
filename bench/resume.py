"""`mixbits quantize --out` killed part way and run again, against an uninterrupted run, on the default model.

Three runs of the same command (GPTQ, int4:g64:asym, default calibration): one uninterrupted; one killed (SIGKILL,
as a crash or a machine going down: nothing of the process runs after it) after INTERRUPT_AFTER seconds, some
blocks done; the same command again, which resumes from OUT.partial. Records
each run's time, how many blocks the resumed run took from disk, and whether the two checkpoints' files are
identical byte for byte (mixbits.json compared without its timing fields, manifest.json without their hashes).

    python bench/resume.py
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_results

NAME = "resume"
COMMAND = ["quantize", "--format", "int4:g64:asym", "--solver", "gptq", "--no-eval"]
INTERRUPT_AFTER = 100  # seconds: the float model loads and calibrates first, then about a block every 5 s
TIMING = ("seconds", "peak_memory_bytes")


def run(out: Path, interrupt_after: float | None = None) -> dict:
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "mixbits", *COMMAND, "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if interrupt_after is not None:
        try:
            process.wait(interrupt_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
    stdout, stderr = process.communicate()
    kept = [line for line in stderr.splitlines() if "finished blocks taken from" in line]
    return {"seconds": round(time.perf_counter() - start, 1), "exit": process.returncode,
            "kept": kept[0].split(":")[1].split()[0] if kept else "0", "stderr_tail": stderr.strip().splitlines()[-1:]}


def contents(path: Path) -> dict:
    files = {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    info = json.loads(files.pop("mixbits.json"))
    for key in TIMING:
        info["quantization"].pop(key)
    files.pop("manifest.json")
    return {"files": files, "info": info}


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        whole, resumed = Path(work) / "whole", Path(work) / "resumed"
        runs = {"uninterrupted": run(whole), "interrupted": run(resumed, INTERRUPT_AFTER)}
        partial = resumed.with_name(resumed.name + ".partial")
        blocks_kept = len(list(partial.glob("*/block-*.safetensors")))
        runs["resumed"] = run(resumed)
        a, b = contents(whole), contents(resumed)
        same = {name: a["files"][name] == b["files"].get(name) for name in a["files"]}
        record = {"command": "mixbits " + " ".join(COMMAND) + " --out OUT", "runs": runs,
                  "blocks_kept_after_interrupt": blocks_kept, "identical_files": same,
                  "identical_info": a["info"] == b["info"], "partial_removed": not partial.exists()}
    lines = [f"# Resume after an interrupt\n\n`python bench/resume.py` — {time.strftime('%Y-%m-%d')}, default model. "
             f"`{record['command']}` three times: uninterrupted; killed (SIGKILL) after {INTERRUPT_AFTER} s; then again, "
             "resuming from OUT.partial.\n",
             "| run | seconds | exit code |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['seconds']} | {r['exit']} |" for name, r in runs.items()]
    lines += ["", f"Blocks kept on disk after the kill: {blocks_kept}; the resumed run took "
                  f"{runs['resumed']['kept']} from disk. Files identical to the uninterrupted run's, byte for byte: "
                  + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in same.items())
                  + f"; mixbits.json without its timing fields: {'yes' if record['identical_info'] else 'NO'}; "
                  f"OUT.partial removed after the checkpoint was written: {'yes' if record['partial_removed'] else 'NO'}."]
    write_results(NAME, record, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

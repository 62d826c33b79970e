"""Every loader against damaged files: checkpoints (manifest rewritten to match), plans, sensitivity files, GGUFs.

Runs `mixbits.fuzz` over each target with the counts below (over 100,000 mutated inputs in all) and records how
many loaded, how many were refused with a one-line MixbitsError (and which checks refused them), and every raw
exception, which must be none. The files are a tiny random LLaMA's (two blocks, 64 wide, a 64-token vocabulary),
so each trial takes milliseconds; the loaders' checks do not depend on the model's size.

    python bench/fuzz_loaders.py [--scale 0.01]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mixbits.fuzz import TARGETS, fuzz
from mixbits.report import format_table

from common import write_results

NAME = "fuzz_loaders"
COUNTS = {"checkpoint": 45_000, "plan": 10_000, "sensitivity": 35_000, "gguf": 10_000}
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="run this fraction of the mutations (a quick look)")
    args = parser.parse_args()
    record = {"seed": SEED, "targets": []}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, count in COUNTS.items():
            count = max(1, round(count * args.scale))
            outcome = fuzz(TARGETS[name](Path(work)), count, seed=SEED)
            kinds = sorted(outcome.refusals.items(), key=lambda item: -item[1])
            record["targets"].append({"target": name, "trials": outcome.trials, "loaded": outcome.loaded,
                                      "refused": outcome.refused, "raw": outcome.raw, "seconds": outcome.seconds,
                                      "refusals": dict(kinds)})
            rows.append([name, outcome.trials, outcome.loaded, outcome.refused, len(outcome.raw),
                         round(outcome.seconds), "; ".join(f"{k} ({n})" for k, n in kinds[:3])])
            print(f"{name}: {outcome.trials} trials, {outcome.loaded} loaded, {outcome.refused} refused, "
                  f"{len(outcome.raw)} raw, {outcome.seconds:.0f} s", flush=True)
            for line in outcome.raw[:10]:
                print("  ", line)
            _write(record, rows)  # after every target: a run stopped later keeps what it measured
    print(_write(record, rows))


def _write(record: dict, rows: list) -> str:
    total = sum(t["trials"] for t in record["targets"])
    raw = sum(len(t["raw"]) for t in record["targets"])
    header = (f"# Loaders against damaged files\n\n`python bench/fuzz_loaders.py` — {time.strftime('%Y-%m-%d')}. "
              f"{total:,} mutated inputs (seed {SEED}), {raw} raw exceptions. Each trial makes one edit to one file "
              "of a tiny random LLaMA's (a checkpoint's mixbits.json, manifest.json, config.json or a safetensors "
              "header, with the manifest's size and hash rewritten to match; a plan applied by `mixbits.quantize`; "
              "a sensitivity file reused by `plan_for_budget`; a GGUF's metadata or tensor descriptions loaded by "
              "`load_model`) and runs the loader as a command would, the checkpoint's model on 8 tokens too. "
              "Loaded: the edit left a valid file (a changed number, a renamed extra key). Refused: a one-line "
              "MixbitsError, the commonest kinds shown (message words without paths and numbers); a refused GGUF "
              "left nothing in its cache.\n")
    table = format_table(["target", "trials", "loaded", "refused", "raw exceptions", "seconds",
                          "commonest refusals"], rows)
    write_results(NAME, record, header + "\n" + table)
    return header


if __name__ == "__main__":
    main()

"""Budgets over the whole model: the embedding allocated with the layers, or held at 16 bits.

On the default model, for model sizes in bytes (every stored parameter: the
embedding, tied to the output head, as its option stores it; norms counted
at the 32 bits they are stored in), the allocator's plan from the default menu with the embedding
among its choices (the menu's options it can look up row by row, rounded to
nearest, and fp16) against the plan for the same size with the embedding
held at 16 bits (what a size budget allocated before). Both are quantized as
planned (GPTQ), saved as packed checkpoints (files measured) and evaluated
on every domain. The sensitivity is bench/results/mixed/sensitivity.json
(the default menu, measured by bench/mixed.py) copied and extended with the
embedding's measurements. llama.cpp's Q4_0 file (bench/results/llama_cpp.json)
is the size to beat.

    python bench/whole_model.py [--report]
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mixbits
from mixbits import defaults
from mixbits.allocate import Budget
from mixbits.calibrate import calibration_data
from mixbits.errors import MixbitsError
from mixbits.eval import evaluate_domains
from mixbits.io.checkpoint import save_quantized
from mixbits.mixes import allocated_plan
from mixbits.report import format_table

from common import RESULTS, domain_cells, domain_protocol, fp32_references, llama_cpp_file, write_results

SIZES_MB = (88.0, 75.0)  # 88 MB of parameters: with its tokenizer files, the checkpoint is about llama.cpp Q4_0's 91.7
NAME = "whole_model"
LLAMA_CPP_FILES = ("llama.cpp Q4_0", "llama.cpp Q4_0 + imatrix", "llama.cpp Q3_K_M + imatrix")
SENSITIVITY = RESULTS / NAME / "sensitivity.json"


def main() -> None:
    if "--report" in sys.argv:  # only rewrite the Markdown from the committed JSON
        record = json.loads((RESULTS / f"{NAME}.json").read_text())
        write_results(NAME, record, _markdown(record))
        return
    loaded, domains, record = domain_protocol()
    names = [d.name for d in domains]
    if not SENSITIVITY.exists():
        SENSITIVITY.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(RESULTS / "mixed" / "sensitivity.json", SENSITIVITY)
    sensitivity = mixbits.sensitivity_for(loaded, path=SENSITIVITY, outer=True)
    record["embedding_measure_seconds"] = sum(o.seconds for o in sensitivity.outer[0].options)
    record["embedding_options"] = [{"option": str(o.choice), "bits": o.bits, "kl": o.kl, "proxy": o.proxy}
                                   for o in sensitivity.outer[0].options]
    calibration, _ = calibration_data(loaded, None, defaults.CALIBRATION_WINDOWS, defaults.CALIBRATION_LEN)
    references = fp32_references(loaded, domains, record)
    held = dataclasses.replace(sensitivity, outer=[])  # the embedding fixed at 16 bits, counted outside the choice
    results = []
    for size in SIZES_MB:
        budget = Budget(bytes=int(size * 1e6))
        for label, table in (("allocated", sensitivity), ("held at fp16", held)):
            try:
                plan = allocated_plan(table, budget, "kl")
            except MixbitsError as error:
                results.append({"size_mb": size, "embedding": label, "refused": str(error)})
                print(f"{size:g} MB {label}: {error}", flush=True)
                continue
            model = copy.deepcopy(loaded.model)
            report = mixbits.quantize(model, plan=plan, calibration=calibration, progress=False)
            with tempfile.TemporaryDirectory() as scratch:
                saved = save_quantized(model, report, Path(scratch) / "ckpt", tokenizer=loaded.tokenizer, plan=plan,
                                       source={"name": loaded.name, "sha256": loaded.sha256})
                files = {p.name: p.stat().st_size for p in sorted(saved.path.iterdir())}
            result = evaluate_domains(model, domains, references, progress=False).as_dict()
            results.append({"size_mb": size, "embedding": label, "embedding_option": report.outer[0].option,
                            "decoder_bits_per_weight": report.bits_per_weight, "model_bits": report.model_bits,
                            "checkpoint_bytes": sum(files.values()), "files": files,
                            "plan": plan.as_dict()["totals"], **result})
            print(" | ".join(_cells(results[-1], names)), flush=True)
            del model
    record["results"] = results
    write_results(NAME, record, _markdown(record))


def _cells(row: dict, names: list[str]) -> list[str]:
    if "refused" in row:
        return [f"{row['size_mb']:g}", row["embedding"], "no plan fits", *["—"] * (len(names) + 4)]
    return [f"{row['size_mb']:g}", row["embedding"], row["embedding_option"], f"{row['decoder_bits_per_weight']:.3f}",
            f"{row['model_bits'] / 8e6:.1f}", f"{row['checkpoint_bytes'] / 1e6:.1f}", *domain_cells(row, names)]


def _markdown(record: dict) -> str:
    names = [d["name"] for d in record["domains"]]
    rows = [_cells(row, names) for row in record["results"]]
    for label in LLAMA_CPP_FILES:
        found = llama_cpp_file(label, names)
        if found is not None:
            bits = f"{found['bits_per_weight']:.3f}" if found["bits_per_weight"] else "—"
            rows.append(["—", f"{label} (GGUF)", "Q8_0", bits, "—", f"{found['mb']:.1f}", *found["cells"]])
    seen = {d["name"] for d in record["domains"] if d["in_calibration_mix"]}
    fp32 = ", ".join(f"{n} {p:.3f}" for n, p in record["fp32_perplexity"].items())
    options = ", ".join(f"{o['option']} KL {o['kl']:.2g}" for o in record["embedding_options"])
    header = (f"# Budgets over the whole model\n\n`python bench/whole_model.py` — {time.strftime('%Y-%m-%d')}. "
              "SmolLM2-135M-Instruct; the default menu's plan (GPTQ, damage measured as KL) for a model size in "
              "bytes (10^6 per MB: every stored parameter, the tied embedding once, norms at 32 bits as stored), with "
              "the embedding allocated among the options it can look up (rounded to nearest) or held at 16 bits (as "
              "size budgets allocated before: every parameter outside the layers counted at 16 bits, so those plans "
              "overshoot by the norms' 0.07 MB). llama.cpp's files: bench/results/llama_cpp.json, same evaluator. "
              f"Evaluation domains: fp32 perplexity {fp32}; {', '.join(sorted(seen)) or 'none'} in the calibration "
              "mix. 'decoder bpw' counts the 210 block linears; 'model MB' is what the report counts, 'checkpoint MB' "
              "every file of the directory (tokenizer included). Embedding options measured: "
              f"{options} (quantizing and measuring them took {record['embedding_measure_seconds']:.0f} s after the "
              "statistics pass).\n")
    headers = ["size MB", "embedding", "embedding option", "decoder bpw", "model MB", "checkpoint MB",
               *[f"Δ ppl {n}" + (" (in mix)" if n in seen else "") for n in names], "mean Δ, unseen kinds"]
    return header + "\n" + format_table(headers, rows)


if __name__ == "__main__":
    main()

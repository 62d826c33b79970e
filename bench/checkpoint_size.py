"""Checkpoint size on disk with the embedding in 16 bits or quantized, beside llama.cpp's Q4_0 file.

Each row quantizes the default model's decoder linears by round to nearest
(int4:g128:asym, or q4_0 = int4:g32:sym, llama.cpp's Q4_0 layout) and its
input embedding (tied to the output head, which computes with the same
values) in 16 bits or a registry format; saves the packed checkpoint and
reports its files' size, the model bits the report counts, and the quality
on every evaluation domain. llama.cpp's Q4_0 (Q8_0 embedding, reused as the
output) comes from bench/results/llama_cpp.json, measured by
bench/llama_cpp.py on the same model.

    python bench/checkpoint_size.py
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import mixbits
from mixbits.eval import evaluate_domains
from mixbits.io.checkpoint import save_quantized
from mixbits.report import format_table

from common import domain_cells, domain_protocol, fp32_references, llama_cpp_file, write_results

ROWS = [("int4:g128:asym", None), ("int4:g128:asym", "q8_0"), ("int4:g128:asym", "int4:g64:asym"), ("q4_0", "q8_0")]
NAME = "checkpoint_size"


def main() -> None:
    loaded, domains, record = domain_protocol()
    names = [d.name for d in domains]
    references = fp32_references(loaded, domains, record)
    results, rows = [], []
    for fmt, embedding in ROWS:
        model = copy.deepcopy(loaded.model)
        report = mixbits.quantize(model, fmt, embedding_format=embedding, progress=False)
        with tempfile.TemporaryDirectory() as scratch:
            saved = save_quantized(model, report, Path(scratch) / "ckpt", tokenizer=loaded.tokenizer,
                                   source={"name": loaded.name, "sha256": loaded.sha256})
            files = {p.name: p.stat().st_size for p in sorted(saved.path.iterdir())}
            shutil.rmtree(saved.path)
        tensors = files["quantized.safetensors"] + files["float.safetensors"]
        result = evaluate_domains(model, domains, references, progress=False).as_dict()
        row = {"format": fmt, "embedding": embedding or "fp16", "bits_per_weight": report.bits_per_weight,
               "model_bits": report.model_bits, "files": files, "checkpoint_bytes": sum(files.values()),
               "tensor_file_bytes": tensors, **result}
        results.append(row)
        rows.append(_cells(row, names))
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
        del model
    record["results"] = results
    llama = llama_cpp_file("llama.cpp Q4_0", names)
    record["llama_cpp_q4_0"] = llama
    if llama is not None:
        rows.append(["llama.cpp Q4_0 (GGUF)", "Q8_0", 4.5, "—", f"{llama['mb']:.1f}", "—", *llama["cells"]])
    write_results(NAME, record, _markdown(record, rows, names))


def _cells(row: dict, names: list[str]) -> list:
    return [row["format"], row["embedding"], row["bits_per_weight"], f"{row['model_bits'] / 8e6:.1f}",
            f"{row['checkpoint_bytes'] / 1e6:.1f}", f"{row['tensor_file_bytes'] * 8 / row['model_bits'] - 1:+.2%}",
            *domain_cells(row, names)]


def _markdown(record: dict, rows: list, names: list[str]) -> str:
    fp32 = ", ".join(f"{n} {p:.3f}" for n, p in record["fp32_perplexity"].items())
    header = (f"# Checkpoint size with the embedding in 16 bits or quantized\n\n`python bench/checkpoint_size.py`; "
              f"{record['model']['name']}, round to nearest (no data). Evaluation: {len(names)} domains of 24 x 512 "
              f"tokens from each one's middle (fp32 perplexity {fp32}). bpw counts the 210 decoder linears; model MB "
              "is every stored parameter as the report counts it (embedding as stored, tied head not twice, norms in "
              "float32); checkpoint MB is every file of the directory (tensors, config, tokenizer, manifest); "
              "'tensor files vs count' compares the two safetensors files with the count (their headers included). "
              "MB = 10^6 bytes. The llama.cpp row is from bench/results/llama_cpp.json (its file and its quality "
              "under the same evaluator).\n")
    headers = ["decoder format", "embedding", "bpw", "model MB", "checkpoint MB", "tensor files vs count",
               *(f"Δ ppl {n}" for n in names), "mean Δ, unseen kinds"]
    return header + "\n" + format_table(headers, rows)


if __name__ == "__main__":
    main()

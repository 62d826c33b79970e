"""llama.cpp against mixbits: its quants (with and without an importance matrix) and mixbits' GGUF export, scored alike.

Needs a llama.cpp build: LLAMA_CPP_BIN names the directory holding
llama-perplexity, llama-quantize, llama-imatrix and llama-bench (built from
the sources in the llama-cpp-python sdist on PyPI, for example:
`cmake -B build -DGGML_NATIVE=ON && cmake --build build --target llama-perplexity
llama-quantize llama-imatrix llama-bench`). Some VMs report AMX in cpuinfo
without enabling its tile state, and a native build then dies with SIGILL in
its AMX matmul: add `-DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8
-mno-amx-bf16"` and the same CMAKE_CXX_FLAGS.

Files (the embedding Q8_0 in all; llama.cpp's files reuse it as the output
matrix, mixbits' holds a Q8_0 output matrix of its own):

- mixbits Q4_0: `mixbits quantize --format q4_0 --solver gptq --head-format
  q8_0 --embedding-format q8_0 --target gguf --out DIR` (GPTQ on the default calibration mix), then
  `mixbits export DIR --to gguf`.
- llama.cpp: `llama-quantize --allow-requantize --output-tensor-type q8_0
  --token-embedding-type q8_0` of the source GGUF to Q4_0, and to Q4_0, Q4_K_M
  and Q3_K_M with an importance matrix from `llama-imatrix` on the mix's
  32 x 512 calibration windows (decoded to text, so llama.cpp re-tokenizes
  them). k-quants need rows that are whole 256-value blocks: llama-quantize
  stores the tensors whose rows are 576 wide in a fallback type instead
  (Q4_0, Q5_0, Q5_1 here), so the bits per weight of each file are counted
  from the tensors it holds.

Quality: every file is loaded into mixbits (dequantized by the gguf package)
and scored by the same evaluator, windows and fp32 reference as every other
table, on every evaluation domain. As a cross-check, llama-perplexity
(-c 512, it scores the second half of each chunk, so on its own scale) on
pydoc's evaluation windows decoded to text. Speed: `llama-bench -p 256 -n 64
-t 2 -r 3`.

    LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin python bench/llama_cpp.py
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from common import domain_cells, domain_protocol, llama_bench_speeds, write_results
from common import llama_cpp_tool as tool

from mixbits import defaults
from mixbits.corpus import calibration_mix
from mixbits.eval import evaluate_domains
from mixbits.eval.domains import reference_scores
from mixbits.io.checkpoint import is_checkpoint
from mixbits.models import load_model
from mixbits.models.loader import default_gguf_path

WORK = Path(__file__).parent / "work" / "llama_cpp"
CALIBRATION = (defaults.CALIBRATION_WINDOWS, defaults.CALIBRATION_LEN)
LAYOUT = ["--allow-requantize", "--output-tensor-type", "q8_0", "--token-embedding-type", "q8_0"]
LLAMA_FILES = {  # label: (llama-quantize type, with the importance matrix)
    "llama.cpp Q4_0": ("Q4_0", False),
    "llama.cpp Q4_0 + imatrix": ("Q4_0", True),
    "llama.cpp Q4_K_M + imatrix": ("Q4_K_M", True),
    "llama.cpp Q3_K_M + imatrix": ("Q3_K_M", True),
}
DECODER = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")


def run(*command: str) -> str:
    print(" ".join(Path(c).name if i == 0 else c for i, c in enumerate(command)), file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{command[0]} failed:\n{result.stderr[-2000:]}")
    return result.stdout + result.stderr


def texts(loaded, domains) -> tuple[Path, Path]:
    """pydoc's evaluation windows and the calibration mix's windows, decoded to text files for llama.cpp."""
    WORK.mkdir(parents=True, exist_ok=True)
    pydoc = next(d for d in domains if d.name == "pydoc")
    calibration, _ = calibration_mix(loaded.tokenizer, *CALIBRATION)
    eval_path, calib_path = WORK / "eval-pydoc.txt", WORK / "calibration-mix.txt"
    eval_path.write_text(loaded.tokenizer.decode(pydoc.windows.reshape(-1)))
    calib_path.write_text("".join(loaded.tokenizer.decode(window) for window in calibration))
    return eval_path, calib_path


def build_files(calib_path: Path) -> dict[str, Path]:
    source = default_gguf_path()
    files = {"source (Q4_1, the fp32 reference's weights)": source}
    ours = WORK / "mixbits-q4_0-gptq.gguf"
    if not ours.exists():
        checkpoint = WORK / "mixbits-q4_0-gptq"
        if not is_checkpoint(checkpoint):
            run(sys.executable, "-m", "mixbits", "quantize", "--format", "q4_0", "--solver", "gptq", "--head-format",
                "q8_0", "--embedding-format", "q8_0", "--target", "gguf", "--no-eval", "--out", str(checkpoint))
        run(sys.executable, "-m", "mixbits", "export", str(checkpoint), "--to", "gguf", "--out", str(ours))
    files["mixbits Q4_0 (GPTQ)"] = ours
    matrix = WORK / "imatrix-mix.gguf"
    for label, (kind, weighted) in LLAMA_FILES.items():
        path = WORK / f"llama-{kind.lower()}{'-imatrix' if weighted else ''}.gguf"
        if weighted and not matrix.exists():
            run(tool("llama-imatrix"), "-m", str(source), "-f", str(calib_path), "-c", str(CALIBRATION[1]),
                "--chunks", str(CALIBRATION[0]), "-t", "2", "-o", str(matrix))
        if not path.exists():
            run(tool("llama-quantize"), *LAYOUT, *(["--imatrix", str(matrix)] if weighted else []), str(source),
                str(path), kind)
        files[label] = path
    return files


def decoder_bits(path: Path) -> tuple[float, dict[str, int]]:
    """Bits per weight of the decoder matrices a GGUF holds, and how many matrices of each GGML type."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    bits = weights = 0
    types: Counter = Counter()
    for tensor in reader.tensors:
        if DECODER.fullmatch(tensor.name):
            bits += 8 * int(tensor.n_bytes)
            weights += int(tensor.n_elements)
            types[tensor.tensor_type.name] += 1
    return bits / weights, dict(types)


def llama_perplexity(path: Path, eval_path: Path) -> float:
    output = run(tool("llama-perplexity"), "-m", str(path), "-f", str(eval_path), "-c", str(defaults.WINDOW_LEN),
                 "-t", "2")
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
    if not found:
        sys.exit(f"no final perplexity in llama-perplexity's output for {path}")
    return float(found.group(1))


def speed(path: Path) -> dict[str, float]:
    output = run(tool("llama-bench"), "-m", str(path), "-p", "256", "-n", "64", "-t", "2", "-r", "3", "-o", "csv")
    return llama_bench_speeds(output)[0]


def main() -> None:
    from mixbits.report import format_table

    loaded, domains, record = domain_protocol()
    eval_path, calib_path = texts(loaded, domains)
    files = build_files(calib_path)
    references = reference_scores(loaded.model, domains)
    results = []
    for label, path in files.items():
        model = loaded if path == default_gguf_path() else load_model(path)
        evaluation = evaluate_domains(model, domains, references).as_dict()
        bpw, types = decoder_bits(path)
        results.append({"file": label, "path": path.name, "bytes": path.stat().st_size, "decoder_bpw": bpw,
                        "decoder_types": types, "evaluation": evaluation,
                        "llama_perplexity_pydoc": llama_perplexity(path, eval_path), **speed(path)})
        del model
    names = [d.name for d in domains]
    base = results[0]["llama_perplexity_pydoc"]
    rows = [[r["file"], f"{r['decoder_bpw']:.2f}", ", ".join(f"{n} {t}" for t, n in sorted(r["decoder_types"].items())),
             f"{r['bytes'] / 1e6:.1f}", *domain_cells(r["evaluation"], names),
             f"{r['llama_perplexity_pydoc']:.3f} ({r['llama_perplexity_pydoc'] / base - 1:+.1%})",
             f"{r['prefill_tokens_per_s']:.0f}", f"{r['decode_tokens_per_s']:.1f}"] for r in results]
    table = format_table(["GGUF", "decoder bpw", "decoder matrices", "MB"] + [f"Δ ppl {n}" for n in names]
                         + ["mean Δ, unseen kinds", "llama-perplexity pydoc (vs source)", "prefill tok/s",
                            "decode tok/s"], rows)
    version = run(tool("llama-bench"), "--version").strip().splitlines()[0]
    record.update({"command": "LLAMA_CPP_BIN=... python bench/llama_cpp.py", "llama_cpp": version,
                   "calibration": {"text": "calibration mix, decoded", "count": CALIBRATION[0], "length": CALIBRATION[1]},
                   "results": results})
    unseen = ", ".join(d.name for d in domains if not d.in_calibration)
    markdown = "\n".join([
        "# llama.cpp against mixbits: its quants with and without imatrix, and mixbits' GGUF export",
        "",
        f"`LLAMA_CPP_BIN=... python bench/llama_cpp.py`; llama.cpp {version}, 2 threads. Embedding Q8_0 in every "
        "quantized file (llama.cpp's files reuse it as the output matrix; mixbits' has its own Q8_0 output matrix). "
        "The imatrix is computed on the default calibration mix (32 x 512 tokens, decoded to text). Δ ppl: every file "
        "loaded into mixbits and scored by the protocol's evaluator against the fp32 model on every domain "
        f"(24 x 512 tokens from each middle; pydoc's first half is in the calibration mix, {unseen} are kinds it does "
        "not hold). llama-perplexity: llama.cpp's own score on pydoc's evaluation windows (-c 512, second half of "
        "each chunk), a cross-check on its own scale. Speed: llama-bench (-p 256, -n 64, 3 repetitions). Decoder bpw "
        "counts the 210 decoder matrices as stored; llama.cpp stores k-quant tensors whose 576-wide rows are not whole "
        "256-value blocks in a fallback type (Q4_0, Q5_0, Q5_1), so its Q3_K_M is not a 3-bit file on this model.",
        "",
        table,
    ])
    write_results("llama_cpp", record, markdown)
    print(markdown)


if __name__ == "__main__":
    main()

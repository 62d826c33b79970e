"""llama.cpp runs mixbits' GGUF export: perplexity and speed against llama.cpp's own Q4_0, with and without imatrix.

Needs a llama.cpp build: LLAMA_CPP_BIN names the directory holding
llama-perplexity, llama-quantize, llama-imatrix and llama-bench (built from
the sources in the llama-cpp-python sdist on PyPI, for example:
`cmake -B build -DGGML_NATIVE=ON && cmake --build build --target llama-perplexity
llama-quantize llama-imatrix llama-bench`).

The three 4-bit files hold the 210 decoder matrices in Q4_0 (4.5 bits per
weight) and the output matrix in Q8_0, so for quality only how the weights
were rounded differs. The embedding is Q8_0 in all four files (mixbits writes
it so because Q8_0 holds its values exactly); llama.cpp's files reuse it as
the output matrix, mixbits' holds the output matrix separately (rounded with
clip search).

- mixbits: `mixbits quantize --format q4_0 --solver gptq --head-format q8_0
  --target gguf --out DIR` (GPTQ on 32 x 512 tokens from the start of the
  default text), then `mixbits export DIR --to gguf`.
- llama.cpp: `llama-quantize --allow-requantize --output-tensor-type q8_0
  --token-embedding-type q8_0` of the source GGUF to Q4_0; and the same with an
  importance matrix from `llama-imatrix` on the same 32 x 512 calibration tokens.

Perplexity: `llama-perplexity -c 512` on the 24 x 512 evaluation tokens of the
protocol (the middle of the default text, decoded back to text); llama.cpp
scores the second half of each 512-token chunk, so its numbers are on its own
scale, and the source GGUF (the model the fp32 reference dequantizes) is
measured the same way. Speed: `llama-bench -p 256 -n 64 -t 2`.

    LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin python bench/llama_cpp.py
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

from common import write_results

from mixbits import defaults
from mixbits.data import calibration_windows, eval_windows, load_text, tokenize
from mixbits.io.checkpoint import is_checkpoint
from mixbits.models import load_model
from mixbits.models.loader import default_gguf_path
from mixbits.record import provenance

WORK = Path(__file__).parent / "work" / "llama_cpp"
CALIBRATION = (32, 512)


def tool(name: str) -> str:
    directory = os.environ.get("LLAMA_CPP_BIN")
    if not directory or not (Path(directory) / name).exists():
        sys.exit(f"set LLAMA_CPP_BIN to a llama.cpp build's bin directory holding {name}")
    return str(Path(directory) / name)


def run(*command: str) -> str:
    print(" ".join(Path(c).name if i == 0 else c for i, c in enumerate(command)), file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{command[0]} failed:\n{result.stderr[-2000:]}")
    return result.stdout + result.stderr


def texts() -> tuple[Path, Path, dict]:
    """The protocol's evaluation tokens and the calibration tokens, decoded to text files."""
    loaded = load_model()
    text = load_text()
    tokens = tokenize(text, loaded.tokenizer)
    evaluation, eval_spec = eval_windows(tokens, defaults.EVAL_WINDOWS, defaults.WINDOW_LEN)
    calibration, calib_spec = calibration_windows(tokens, *CALIBRATION)
    eval_path, calib_path = WORK / "eval.txt", WORK / "calibration.txt"
    eval_path.write_text(loaded.tokenizer.decode(evaluation.reshape(-1)))
    calib_path.write_text(loaded.tokenizer.decode(calibration.reshape(-1)))
    return eval_path, calib_path, {"evaluation": eval_spec.as_dict(), "calibration": calib_spec.as_dict()}


def build_files(calib_path: Path) -> dict[str, Path]:
    source = default_gguf_path()
    files = {"source (Q4_1, the fp32 reference's weights)": source}
    ours = WORK / "mixbits-q4_0-gptq.gguf"
    if not ours.exists():
        checkpoint = WORK / "mixbits-q4_0-gptq"
        if not is_checkpoint(checkpoint):
            run(sys.executable, "-m", "mixbits", "quantize", "--format", "q4_0", "--solver", "gptq", "--head-format",
                "q8_0", "--target", "gguf", "--no-eval", "--out", str(checkpoint))
        run(sys.executable, "-m", "mixbits", "export", str(checkpoint), "--to", "gguf", "--out", str(ours))
    files["mixbits Q4_0 (GPTQ)"] = ours
    layout = ["--allow-requantize", "--output-tensor-type", "q8_0", "--token-embedding-type", "q8_0"]
    plain = WORK / "llama-q4_0.gguf"
    if not plain.exists():
        run(tool("llama-quantize"), *layout, str(source), str(plain), "Q4_0")
    files["llama.cpp Q4_0"] = plain
    matrix, weighted = WORK / "imatrix.gguf", WORK / "llama-q4_0-imatrix.gguf"
    if not weighted.exists():
        run(tool("llama-imatrix"), "-m", str(source), "-f", str(calib_path), "-c", str(CALIBRATION[1]),
            "--chunks", str(CALIBRATION[0]), "-t", "2", "-o", str(matrix))
        run(tool("llama-quantize"), *layout, "--imatrix", str(matrix), str(source), str(weighted), "Q4_0")
    files["llama.cpp Q4_0 + imatrix"] = weighted
    return files


def perplexity(path: Path, eval_path: Path) -> float:
    output = run(tool("llama-perplexity"), "-m", str(path), "-f", str(eval_path), "-c", str(defaults.WINDOW_LEN),
                 "-t", "2")
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
    if not found:
        sys.exit(f"no final perplexity in llama-perplexity's output for {path}")
    return float(found.group(1))


def speed(path: Path) -> dict[str, float]:
    output = run(tool("llama-bench"), "-m", str(path), "-p", "256", "-n", "64", "-t", "2", "-r", "3", "-o", "csv")
    lines = output.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("build_commit,")):]
    result = {}
    for record in csv.DictReader(line for line in table if line.startswith(("build_commit,", '"'))):
        key = "prefill_tokens_per_s" if int(record["n_prompt"]) > 0 else "decode_tokens_per_s"
        result[key] = float(record["avg_ts"])
    return result


def main() -> None:
    from mixbits.report import format_table

    WORK.mkdir(parents=True, exist_ok=True)
    eval_path, calib_path, windows = texts()
    files = build_files(calib_path)
    results = []
    for name, path in files.items():
        results.append({"file": name, "bytes": path.stat().st_size, "perplexity": perplexity(path, eval_path),
                        **speed(path)})
    base = results[0]["perplexity"]
    rows = [[r["file"], f"{r['bytes'] / 1e6:.1f}", f"{r['perplexity']:.3f}", f"{r['perplexity'] / base - 1:+.1%}",
             f"{r['prefill_tokens_per_s']:.0f}", f"{r['decode_tokens_per_s']:.1f}"] for r in results]
    table = format_table(["GGUF", "MB", "llama.cpp perplexity", "vs source", "prefill tok/s", "decode tok/s"], rows)
    version = run(tool("llama-bench"), "--version").strip().splitlines()[0]
    record = provenance("SmolLM2-135M-Instruct", "", None, None)
    record.update({"command": "LLAMA_CPP_BIN=... python bench/llama_cpp.py", "llama_cpp": version,
                   "windows": windows, "results": results})
    markdown = "\n".join([
        "# llama.cpp runs mixbits' GGUF: perplexity and speed against llama.cpp's own Q4_0",
        "",
        f"llama.cpp {version}, 2 threads. Decoder matrices Q4_0 in all three 4-bit files, output and embedding "
        "Q8_0; perplexity by llama-perplexity (-c 512, second half of each chunk scored) on the protocol's "
        "24 x 512 evaluation tokens; speed by llama-bench (-p 256, -n 64, 3 repetitions).",
        "",
        table,
    ])
    write_results("llama_cpp", record, markdown)
    print(markdown)


if __name__ == "__main__":
    main()

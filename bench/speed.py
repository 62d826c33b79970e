"""mixbits' packed runtime against llama.cpp, side by side in one run on this machine.

For each pair, mixbits' checkpoint and llama.cpp's GGUF at the same (or the
nearest) size, at 1 and 2 threads, in alternation, `ROUNDS` times, best
kept on each side:

- decode: tokens/s of 128 tokens generated one by one (mixbits: greedy with
  its decoder after an 8-token prompt, the time of 129 new tokens minus the
  time of 1; llama.cpp: `llama-bench -n 128`);
- prefill: tokens/s of one 512-token prompt (mixbits: its decoder's forward
  over the prompt and the first new token; llama.cpp: `llama-bench -p 512`);
- file size (mixbits: every file of the checkpoint directory, tokenizer
  included; llama.cpp: the GGUF, vocabulary included) and peak resident
  memory of the measuring process (mixbits: a fresh Python process with
  torch loaded; llama.cpp: llama-bench).

Pairs (the embedding Q8_0 everywhere, the output tied to it; mixbits
quantizes every layer's input to int8 in blocks of 32 with float32 scales,
`--act int8:g32`, as llama.cpp quantizes activations to Q8_0 blocks with
float16 scales, and multiplies integer codes):

- Q4_0: `mixbits quantize --format q4_0 --solver gptq --embedding-format
  q8_0 --act int8:g32`; llama.cpp's Q4_0 file from bench/llama_cpp.py.
- Q8_0: `mixbits quantize --format q8_0 --embedding-format q8_0 --act
  int8:g32`; `llama-quantize` of the source GGUF to Q8_0.
- 3.5 bpw: `mixbits plan --bpw 3.5` over the integer options of the default
  menu (those the integer kernels run; bench/results/mixed's measurements),
  then quantize with the plan, `--embedding-format q8_0 --act int8:g32`;
  against the llama.cpp file (Q2_K, Q3_K_S, Q3_K_M + imatrix) nearest in
  size. Its int2 and int3 layers run from 4-bit codes in memory.

    LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin python bench/speed.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, llama_bench_speeds, rewrite_report, write_results
from common import llama_cpp_tool as tool
from llama_cpp import LAYOUT
from llama_cpp import WORK as LLAMA_WORK

WORK = Path(__file__).parent / "work" / "speed"
PROMPT, NEW, SHORT = 512, 128, 8
ROUNDS, REPEATS = 2, 3  # alternations of the two sides; timings per mixbits process (best kept)
THREADS = (1, 2)
INT_OPTIONS = ("int2:g32:asym,int2:g64:asym,int2:g128:asym,int3:g64:asym,int3:g128:asym,int3:ch:asym,int4:g64:asym,"
               "int4:g128:asym,int4:ch:asym,int5:g64:asym,fp16")
QUANTIZE = ["--embedding-format", "q8_0", "--act", "int8:g32", "--no-eval"]
BUILDS = {
    "Q4_0": [["quantize", "--format", "q4_0", "--solver", "gptq", *QUANTIZE, "--out", "{out}"]],
    "Q8_0": [["quantize", "--format", "q8_0", *QUANTIZE, "--out", "{out}"]],
    "3.5 bpw plan": [["plan", "--bpw", "3.5", "--options", INT_OPTIONS, "--sensitivity",
                      str(RESULTS / "mixed" / "sensitivity.json"), "--out", str(WORK / "plan-3.5.json")],
                     ["quantize", "--plan", str(WORK / "plan-3.5.json"), *QUANTIZE, "--out", "{out}"]],
}
LLAMA = {"Q4_0": ["llama-q4_0.gguf"], "Q8_0": ["llama-q8_0.gguf"],
         "3.5 bpw plan": ["llama-q2_k.gguf", "llama-q3_k_s.gguf", "llama-q3_k_m-imatrix.gguf"]}


def run(command: list[str]) -> str:
    print(" ".join(Path(c).name if i == 0 else c for i, c in enumerate(command)), file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{command[0]} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def build(label: str) -> tuple[Path, Path]:
    """The mixbits checkpoint of `label` and the llama.cpp file nearest it in size (both built if missing)."""
    from mixbits.io.checkpoint import is_checkpoint
    from mixbits.models.loader import default_gguf_path

    WORK.mkdir(parents=True, exist_ok=True)
    ours = WORK / label.replace(" ", "-")
    if not is_checkpoint(ours):
        for command in BUILDS[label]:
            run([sys.executable, "-m", "mixbits", *[part.replace("{out}", str(ours)) for part in command]])
    candidates = []
    for name in LLAMA[label]:
        path = LLAMA_WORK / name
        if not path.exists():
            if "imatrix" in name:
                sys.exit(f"{path} is missing; run bench/llama_cpp.py first")
            kind = name.removeprefix("llama-").removesuffix(".gguf").upper()
            run([tool("llama-quantize"), *LAYOUT, str(default_gguf_path()), str(path), kind])
        candidates.append(path)
    size = directory_bytes(ours)
    return ours, min(candidates, key=lambda path: abs(path.stat().st_size - size))


def measure_mixbits(checkpoint: Path, threads: int) -> dict:
    """Time the checkpoint in a fresh process (this script with --measure)."""
    output = run([sys.executable, __file__, "--measure", str(checkpoint), "--threads", str(threads)])
    return json.loads(output.strip().splitlines()[-1])


def measure_here(checkpoint: Path, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from mixbits.io.checkpoint import load_quantized
    from mixbits.runtime.decode import Decoder

    model = load_quantized(checkpoint).model
    decoder = Decoder(model)
    ids = torch.randint(100, 40000, (PROMPT,), generator=torch.Generator().manual_seed(0))
    decoder.generate(ids[:16], 4)  # warm up

    def best(function) -> float:
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return min(times)

    prefill = best(lambda: decoder.generate(ids, 1))
    one = best(lambda: decoder.generate(ids[:SHORT], 1))
    many = best(lambda: decoder.generate(ids[:SHORT], NEW + 1))
    return {"prefill_tokens_per_s": PROMPT / prefill, "decode_tokens_per_s": NEW / (many - one),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "kernels": _kernels()}


def _kernels() -> str:
    from mixbits.runtime.kernels import native

    kernels = native()
    return "none" if kernels is None else kernels.qdot_isa()


def measure_llama(path: Path, threads: int) -> dict:
    """llama-bench's averages, and its peak resident memory (run under a child Python that reports it)."""
    command = [tool("llama-bench"), "-m", str(path), "-p", str(PROMPT), "-n", str(NEW), "-t", str(threads),
               "-r", str(REPEATS), "-o", "csv"]
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stdout.write(r.stdout); print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
               "sys.exit(r.returncode)")
    output = run([sys.executable, "-c", wrapper, *command])
    speeds, build = llama_bench_speeds(output)
    return {**speeds, "build": build, "peak_rss_bytes": int(output.splitlines()[-1].split()[-1]) * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--report", action="store_true", help="rewrite the table from bench/results/speed.json")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_here(Path(args.measure), args.threads)))
        return
    if args.report:
        rewrite_report("speed", _markdown)
        return

    from mixbits.models import load_model
    from mixbits.record import provenance

    loaded = load_model()
    record = provenance(loaded.name, loaded.sha256)
    del loaded
    record.update({"prompt_tokens": PROMPT, "new_tokens": NEW, "rounds": ROUNDS, "repeats": REPEATS, "results": []})
    pairs = {label: build(label) for label in BUILDS}
    for label, (ours, theirs) in pairs.items():
        for threads in THREADS:
            sides: dict[str, list[dict]] = {"mixbits": [], "llama.cpp": []}
            for _ in range(ROUNDS):
                sides["mixbits"].append(measure_mixbits(ours, threads))
                sides["llama.cpp"].append(measure_llama(theirs, threads))
            row = {"pair": label, "threads": threads, "mixbits_file": ours.name, "llama_file": theirs.name,
                   "mixbits_bytes": directory_bytes(ours), "llama_bytes": theirs.stat().st_size}
            for side, runs in sides.items():
                row[side] = {key: max(r[key] for r in runs) for key in ("prefill_tokens_per_s", "decode_tokens_per_s")}
                row[side]["peak_rss_bytes"] = min(r["peak_rss_bytes"] for r in runs)
                row[side]["all"] = runs
            record["results"].append(row)
            print(f"{label}, {threads} threads: decode {row['mixbits']['decode_tokens_per_s']:.1f} against "
                  f"{row['llama.cpp']['decode_tokens_per_s']:.1f}, prefill {row['mixbits']['prefill_tokens_per_s']:.0f} "
                  f"against {row['llama.cpp']['prefill_tokens_per_s']:.0f}", file=sys.stderr, flush=True)
            write_results("speed", record, _markdown(record))


def _markdown(record: dict) -> str:
    from mixbits.report import format_table

    rows = []
    for r in record["results"]:
        ours, theirs = r["mixbits"], r["llama.cpp"]
        rows.append([r["pair"], r["llama_file"], r["threads"],
                     f"{ours['decode_tokens_per_s']:.1f}", f"{theirs['decode_tokens_per_s']:.1f}",
                     f"{ours['decode_tokens_per_s'] / theirs['decode_tokens_per_s']:.2f}",
                     f"{ours['prefill_tokens_per_s']:.0f}", f"{theirs['prefill_tokens_per_s']:.0f}",
                     f"{ours['prefill_tokens_per_s'] / theirs['prefill_tokens_per_s']:.2f}",
                     f"{r['mixbits_bytes'] / 1e6:.1f}", f"{r['llama_bytes'] / 1e6:.1f}",
                     f"{r['mixbits_bytes'] / r['llama_bytes']:.3f}",
                     f"{ours['peak_rss_bytes'] / 2**20:.0f}", f"{theirs['peak_rss_bytes'] / 2**20:.0f}"])
    kernels = sorted({run["kernels"] for r in record["results"] for run in r["mixbits"]["all"]})
    builds = sorted({run.get("build", "?") for r in record["results"] for run in r["llama.cpp"]["all"]})
    table = format_table(["pair", "llama.cpp file", "threads", "decode tok/s: mixbits", "llama.cpp", "ratio",
                          "prefill tok/s: mixbits", "llama.cpp", "ratio", "file MB: mixbits", "llama.cpp", "ratio",
                          "peak RSS MiB: mixbits", "llama.cpp"], rows)
    return (f"# mixbits' runtime against llama.cpp, side by side\n\n"
            f"Batch 1 on this machine, in one run: decode {record['new_tokens']} tokens, prefill a "
            f"{record['prompt_tokens']}-token prompt; each side measured {record['rounds']} times in alternation "
            f"({record['repeats']} repeats each), best kept. mixbits' integer kernels: {', '.join(kernels)}; "
            f"llama.cpp build {', '.join(builds)} (llama-bench). Peak RSS: mixbits' includes the Python process "
            f"with torch; llama.cpp's is llama-bench's. Made by `python bench/speed.py` (see its docstring for "
            f"how each file is built).\n\n{table}\n")


if __name__ == "__main__":
    main()

"""Size, memory and speed of the default model as stored and run: fp32, bf16 and packed checkpoints.

For each configuration, in a fresh process: bytes on disk, resident memory
after loading, prefill tokens/s (one 256-token prompt) and decode tokens/s
(batch 1, greedy, KV cache: the time of 65 new tokens after a 32-token
prompt minus the time of 1, over 64), best of 5, each with two runtimes:
transformers (`model(ids)` and `model.generate`) and mixbits' decoder
(`mixbits.runtime.decode.Decoder`, what `mixbits generate` uses). Ratios are
to fp32 under transformers, measured in the same run. The memory-bandwidth
limit of decoding is the bytes of weights each token reads (every matrix the
forward multiplies by; embedding rows are negligible) over the read bandwidth
measured here (sum of a 1 GiB float32 tensor, all threads).

Checkpoints are built first (kept in bench/work/, not committed):

    mixbits quantize --format int8:ch:sym --head-format int8:ch:sym --no-eval --out bench/work/int8
    mixbits quantize --format int4:g128:asym --solver gptq --head-format int8:ch:sym --no-eval --out bench/work/int4-g128
    mixbits quantize --format q4_0 --solver gptq --head-format q8_0 --target gguf --no-eval --out bench/work/q4_0
    mixbits plan --bpw 3.0 --sensitivity bench/results/mixed/sensitivity.json --out bench/work/plan-3.0.json
    mixbits quantize --plan bench/work/plan-3.0.json --head-format int8:ch:sym --no-eval --out bench/work/mixed-3.0

    python bench/runtime.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, write_results

WORK = Path(__file__).parent / "work"
PROMPT_TOKENS, NEW_TOKENS, REPEATS = 256, 64, 5

BUILDS = {
    "int8": [["quantize", "--format", "int8:ch:sym", "--head-format", "int8:ch:sym", "--no-eval", "--out", "{out}"]],
    "int4-g128": [["quantize", "--format", "int4:g128:asym", "--solver", "gptq", "--head-format", "int8:ch:sym",
                   "--no-eval", "--out", "{out}"]],
    "q4_0": [["quantize", "--format", "q4_0", "--solver", "gptq", "--head-format", "q8_0", "--target", "gguf", "--no-eval",
              "--out", "{out}"]],
    "mixed-3.0": [["plan", "--bpw", "3.0", "--sensitivity", str(RESULTS / "mixed" / "sensitivity.json"),
                   "--out", str(WORK / "plan-3.0.json")],
                  ["quantize", "--plan", str(WORK / "plan-3.0.json"), "--head-format", "int8:ch:sym", "--no-eval",
                   "--out", "{out}"]],
}
CONFIGS = ["fp32", "bf16", *BUILDS]


def build(name: str) -> None:
    from mixbits.io.checkpoint import CheckpointError, checkpoint_info

    out = WORK / name
    try:
        checkpoint_info(out)
        return
    except CheckpointError:
        pass
    WORK.mkdir(exist_ok=True)
    for command in BUILDS[name]:
        command = [part.replace("{out}", str(out)) for part in command]
        print("mixbits " + " ".join(command), file=sys.stderr)
        subprocess.run([sys.executable, "-m", "mixbits", *command], check=True, stdout=subprocess.DEVNULL)


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def weight_bytes_per_token(model) -> int:
    """Bytes of every matrix a decode step multiplies by: Linear weights and the packed modules' buffers."""
    from torch import nn

    from mixbits.runtime import DequantLinear, IntLinear

    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, IntLinear, DequantLinear)):
            for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                if tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    total += tensor.numel() * tensor.element_size()
    return total


def measure_one(name: str) -> dict:
    """Load one configuration in this (fresh) process and time it."""
    import torch

    from mixbits.io.checkpoint import load_quantized
    from mixbits.models import load_model
    from mixbits.cache import cache_root
    from mixbits.runtime.decode import Decoder

    before = resident_bytes()
    if name in ("fp32", "bf16"):
        loaded = load_model()
        model = loaded.model if name == "fp32" else loaded.model.to(torch.bfloat16)
        cached = next((cache_root()).glob(f"gguf-{loaded.sha256}/model.safetensors"))
        size = cached.stat().st_size // (2 if name == "bf16" else 1)  # float32 safetensors; bf16 holds half the bytes
    else:
        loaded = load_quantized(WORK / name)
        model = loaded.model
        size = sum(p.stat().st_size for p in (WORK / name).iterdir())
    resident = resident_bytes()
    weights = weight_bytes_per_token(model)
    ids = torch.randint(100, 40000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    prompt, new = ids[:, :32], 1 + NEW_TOKENS
    kwargs = {"do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        model(ids[:, :16])  # warm up
        prefill = best(lambda: model(ids))
        one = best(lambda: model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kwargs))
        many = best(lambda: model.generate(prompt, max_new_tokens=new, min_new_tokens=new, **kwargs))
    decoder = Decoder(model)
    decoder.generate(ids[0, :16], 2)  # warm up
    ours_prefill = best(lambda: decoder.generate(ids[0], 1))
    ours_one = best(lambda: decoder.generate(prompt[0], 1))
    ours_many = best(lambda: decoder.generate(prompt[0], new))
    return {"config": name, "file_bytes": size, "resident_bytes": resident, "load_rise_bytes": resident - before,
            "prefill_tokens_per_s": PROMPT_TOKENS / prefill, "decode_tokens_per_s": NEW_TOKENS / (many - one),
            "decoder_prefill_tokens_per_s": PROMPT_TOKENS / ours_prefill,
            "decoder_decode_tokens_per_s": NEW_TOKENS / (ours_many - ours_one),
            "weight_bytes_per_token": weights, "threads": torch.get_num_threads()}


def best(function) -> float:
    return min(_timed(function) for _ in range(REPEATS))


def bandwidth() -> float:
    import torch

    data = torch.ones(2**28)  # 1 GiB of float32
    data.sum()
    seconds = min(_timed(data.sum) for _ in range(5))
    return data.numel() * 4 / seconds


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # internal: measure in this process
    parser.add_argument("--bandwidth", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one)))
        return
    if args.bandwidth:
        print(json.dumps({"bytes_per_s": bandwidth()}))
        return
    for name in BUILDS:
        build(name)
    read_bandwidth = in_fresh_process("--bandwidth")["bytes_per_s"]
    results = []
    for name in CONFIGS:
        print(f"measuring {name}", file=sys.stderr)
        results.append(in_fresh_process("--one", name))
    report(results, read_bandwidth)


def ratio(value: float, base: float, digits: int) -> str:
    return f"{value:.{digits}f} ({value / base:.2f}×)"


def in_fresh_process(*arguments: str) -> dict:
    """This script's JSON answer to `arguments`, run in a new Python process (so memory is its own)."""
    output = subprocess.run([sys.executable, __file__, *arguments], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def report(results: list[dict], read_bandwidth: float) -> None:
    from mixbits.record import provenance
    from mixbits.report import format_table

    base = results[0]
    rows = []
    for r in results:
        limit = read_bandwidth / r["weight_bytes_per_token"]
        rows.append([r["config"], f"{r['file_bytes'] / 1e6:.1f}", f"{r['file_bytes'] / base['file_bytes']:.2f}",
                     f"{r['resident_bytes'] / 2**20:.0f}", f"{r['resident_bytes'] / base['resident_bytes']:.2f}",
                     ratio(r["prefill_tokens_per_s"], base["prefill_tokens_per_s"], 0),
                     ratio(r["decoder_prefill_tokens_per_s"], base["prefill_tokens_per_s"], 0),
                     ratio(r["decode_tokens_per_s"], base["decode_tokens_per_s"], 1),
                     ratio(r["decoder_decode_tokens_per_s"], base["decode_tokens_per_s"], 1),
                     f"{r['weight_bytes_per_token'] / 1e6:.0f}", f"{limit:.0f}",
                     f"{r['decoder_decode_tokens_per_s'] / limit:.0%}"])
    table = format_table(["config", "file MB", "× fp32", "RSS MiB", "× fp32", "prefill tok/s: transformers",
                          "mixbits", "decode tok/s: transformers", "mixbits", "weights MB/token",
                          "bandwidth limit tok/s", "mixbits decode, of limit"], rows)
    record = provenance("SmolLM2-135M-Instruct", "", None, None)
    record.update({"command": "python bench/runtime.py", "read_bandwidth_bytes_per_s": read_bandwidth,
                   "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "results": results})
    markdown = "\n".join([
        "# The default model as stored and run: size, memory, prefill and decode speed",
        "",
        f"Batch 1 on this machine ({results[0]['threads']} threads). Prefill: one {PROMPT_TOKENS}-token prompt; "
        f"decode: greedy with the KV cache, {NEW_TOKENS} tokens after a 32-token prompt; best of {REPEATS}. "
        "Each speed is given for two runtimes: transformers (`model(ids)`, `model.generate`) and mixbits' decoder "
        "(`mixbits generate`: stacked q/k/v and gate/up products, a preallocated KV cache, native RMSNorm, "
        "attention and SiLU steps, the integer kernels called directly). In brackets: the ratio to fp32 under "
        f"transformers. RSS after loading, in a fresh process. Read bandwidth measured here: "
        f"{read_bandwidth / 1e9:.1f} GB/s; the decode limit is that over the weight bytes each token reads.",
        "",
        "Configurations: fp32 and bf16 are the transformers model; int8 is int8:ch:sym everywhere (RTN); int4-g128 is "
        "int4:g128:asym by GPTQ with the head in int8:ch:sym; q4_0 is llama.cpp's Q4_0 by GPTQ with the head in "
        "q8_0 (the file bench/llama_cpp.py exports); mixed-3.0 is the allocated 3.0 bpw plan "
        "(bench/results/mixed) with the head in int8:ch:sym.",
        "",
        table,
    ])
    write_results("runtime", record, markdown)
    print(markdown)


if __name__ == "__main__":
    main()

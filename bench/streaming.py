"""Peak memory of streamed quantization against the number of blocks, on synthetic shards of LLaMA-2-7B's shapes.

No package ships a 7B model, so the model is synthetic: LLaMA-2-7B's config (hidden 4096, MLP 11008, 32 heads,
vocabulary 32000, untied head) with BLOCKS blocks, random bf16 weights (norms at 1) in 2 GB safetensors shards, as
transformers would save them. Each point quantizes one such directory with `mixbits.streaming.quantize_streamed`
(GPTQ, int4:g128:asym, calibration on random token ids; no tokenizer ships with random weights) in a fresh
process, which reports its own peak resident memory (ru_maxrss) and time. The float32 model at 32 blocks would be
27 GB, more than this machine's 24 GB; the curve shows what one more block costs.

    python bench/streaming.py [--blocks 1,2,4] [--windows 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_results

NAME = "streaming"
CONFIG = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
              num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
SHARD_BYTES = 2 * 2**30
FORMAT = "int4:g128:asym"

RUN = """
import json, resource, sys, time, torch
from mixbits.streaming import quantize_streamed
source, out, windows, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tokens = torch.randint(0, 32000, (windows, length), generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
report, saved = quantize_streamed(source, out, sys.argv[5], calibration=tokens, progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "layers": len(report.layers), "weights": report.weights, "bits_per_weight": report.bits_per_weight,
                  "checkpoint_bytes": sum(saved.files.values())}))
"""


def synthetic_model(directory: Path, blocks: int) -> int:
    """Write a LLaMA-2-7B-shaped model of `blocks` blocks; returns its bytes on disk."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**CONFIG, num_hidden_layers=blocks)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(blocks)
    shard, size, index, total = {}, 0, 0, 0
    names = [name for name, _ in skeleton.named_parameters()]
    weight_map = {}
    for position, name in enumerate(names):
        shape = tuple(skeleton.get_parameter(name).shape)
        if len(shape) == 1:
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[name] = tensor
        size += tensor.numel() * 2
        if size >= SHARD_BYTES or position == len(names) - 1:
            index += 1
            file = f"model-{index:05d}.safetensors"
            save_file(shard, str(directory / file), metadata={"format": "pt"})
            weight_map.update({key: file for key in shard})
            total += size
            shard, size = {}, 0
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                        "weight_map": weight_map}))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="1,2,4", help="block counts to measure (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=8, help="calibration windows of 512 tokens (default: %(default)s)")
    args = parser.parse_args()
    counts = [int(n) for n in args.blocks.split(",")]
    points = []
    with tempfile.TemporaryDirectory(dir=Path.home()) as work:
        for blocks in counts:
            source = Path(work) / f"llama7b-{blocks}"
            started = time.perf_counter()
            disk = synthetic_model(source, blocks)
            written = time.perf_counter() - started
            result = subprocess.run([sys.executable, "-c", RUN, str(source), str(Path(work) / f"out-{blocks}"),
                                     str(args.windows), "512", FORMAT], capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f"{blocks} blocks failed: {result.stderr.strip().splitlines()[-1]}")
            point = {"blocks": blocks, "model_bytes_bf16": disk, "float32_bytes": disk * 2, "write_seconds": written,
                     **json.loads(result.stdout.strip().splitlines()[-1])}
            points.append(point)
            print(json.dumps(point), flush=True)
            for path in sorted(Path(work).iterdir()):
                subprocess.run(["rm", "-rf", str(path)], check=True)
    record = {"config": CONFIG, "format": FORMAT, "solver": "gptq", "calibration": f"{args.windows} x 512 random token ids",
              "points": points}
    rows = "\n".join(f"| {p['blocks']} | {p['model_bytes_bf16'] / 2**30:.2f} | {p['float32_bytes'] / 2**30:.2f} | "
                     f"{p['peak_rss_bytes'] / 2**30:.2f} | {p['checkpoint_bytes'] / 2**30:.2f} | {p['seconds']:.0f} |"
                     for p in points)
    markdown = (f"# Streamed quantization of a LLaMA-2-7B-shaped model\n\n`python bench/streaming.py --blocks "
                f"{args.blocks} --windows {args.windows}` — {time.strftime('%Y-%m-%d')}. Synthetic bf16 shards with "
                f"LLaMA-2-7B's shapes (random weights), {FORMAT} by GPTQ on {args.windows} x 512 random token ids, "
                "one fresh process per row, its peak resident memory (ru_maxrss). The full 32-block model would be "
                "12.6 GiB in bf16 and 25.1 GiB in float32.\n\n"
                "| blocks | model on disk, bf16 (GiB) | model in float32 (GiB) | peak resident (GiB) | checkpoint (GiB) | "
                "seconds |\n|---:|---:|---:|---:|---:|---:|\n" + rows)
    write_results(NAME, record, markdown)
    print(markdown)


if __name__ == "__main__":
    main()

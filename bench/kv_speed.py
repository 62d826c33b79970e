"""Decode speed and resident memory of mixbits' decoder at 4096 tokens of context, quantized KV caches against float32.

For each cache, a fresh process loads the default model (float32 weights, so
that only the cache differs), feeds a prompt of CONTEXT - NEW tokens from the
middle of austen (the prompt runs through the cache's prefill path), then
decodes NEW tokens one at a time, timed; the next token is always the text's
own, so every cache decodes the same sequence. Reported: decode tokens/s (the
mean over the steps), the bytes the cache holds for CONTEXT tokens (codes,
parameters, tokens waiting in float16), and the process's peak resident memory
over the decode steps (weights, cache and everything else), with the rise over
the resident size before the cache was made; freed heap memory is handed back
to the system before each (the prompt pass's scratch would otherwise stay
resident and hide the cache). Caches run one after another in
ROUNDS rounds (round-robin), each cache's best round kept; ratios are to the
float32 cache of the same run.

    python bench/kv_speed.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

from mixbits.record import command_line, versions
from mixbits.report import format_table

from common import write_results

NAME = "kv_speed"
CONTEXT, NEW = 4096, 32
CACHES = [  # (label, keys, values)
    ("float32", None, None),
    ("int8 per token", "int8:ch:sym", "int8:ch:sym"),
    ("int4 per token", "int4:g32:asym", "int4:g32:asym"),
    ("int4 per token, rotated", "int4:g32:asym/rotate", "int4:g32:asym/rotate"),
    ("int3 per token", "int3:g32:asym", "int3:g32:asym"),
    ("int2, KIVI (keys per channel, residual 128)", "int2:g32:asym/channel/residual128", "int2:g32:asym/residual128"),
]


def measure(index: int) -> dict:
    """One cache's run, in this process."""
    from mixbits.corpus import source
    from mixbits.data import tokenize
    from mixbits.kvcache import parse_kv
    from mixbits.memory import peak_bytes, release_free_memory, reset_peak, resident_bytes
    from mixbits.models import load_model
    from mixbits.runtime.decode import Decoder

    label, keys, values = CACHES[index]
    loaded = load_model()
    tokens = tokenize(source("austen").text(), loaded.tokenizer)
    middle = len(tokens) // 2
    ids = tokens[middle:middle + CONTEXT]
    decoder = Decoder(loaded.model)
    kv = [(parse_kv(keys), parse_kv(values))] * len(decoder.blocks)
    release_free_memory()
    before = resident_bytes()
    sequence = decoder.start(CONTEXT, kv)
    sequence.feed(ids[:CONTEXT - NEW])
    release_free_memory()  # the prompt pass's scratch: resident from here on is weights, cache and live state
    reset_peak()
    started = time.perf_counter()
    for position in range(CONTEXT - NEW, CONTEXT):
        sequence.feed(ids[position:position + 1])
    seconds = time.perf_counter() - started
    return {"label": label, "keys": keys, "values": values, "decode_tokens_per_s": NEW / seconds,
            "cache_bytes": sequence.cache_bytes, "peak_resident_bytes": peak_bytes(),
            "resident_before_cache_bytes": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every cache (default: %(default)s)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # run one cache here and print its JSON
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one)))
        return
    best: dict[int, dict] = {}
    for round_ in range(args.rounds):
        for index, (label, _, _) in enumerate(CACHES):
            done = subprocess.run([sys.executable, __file__, "--one", str(index)], check=True, capture_output=True,
                                  text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"round {round_ + 1}: {label:45} {row['decode_tokens_per_s']:.1f} tok/s, cache "
                  f"{row['cache_bytes'] / 1e6:.1f} MB, peak {row['peak_resident_bytes'] / 1e6:.0f} MB", flush=True)
            if index not in best or row["decode_tokens_per_s"] > best[index]["decode_tokens_per_s"]:
                best[index] = row
    record = {"command": command_line(), "versions": versions(), "machine": platform.processor() or platform.machine(),
              "context": CONTEXT, "new_tokens": NEW, "rounds": args.rounds,
              "results": [best[i] for i in range(len(CACHES))]}
    write_results(NAME, record, _markdown(record))


def _markdown(record: dict) -> str:
    base = record["results"][0]
    rows = [[r["label"], r["keys"] or "—", r["values"] or "—", f"{r['decode_tokens_per_s']:.1f}",
             f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x", f"{r['cache_bytes'] / 1e6:.1f}",
             f"{r['cache_bytes'] / base['cache_bytes']:.3f}", f"{r['peak_resident_bytes'] / 1e6:.0f}",
             f"+{(r['peak_resident_bytes'] - r['resident_before_cache_bytes']) / 1e6:.0f}"] for r in record["results"]]
    return "\n".join([
        f"# KV cache at {record['context']} tokens: decode speed and memory",
        "",
        f"`python bench/kv_speed.py` ({time.strftime('%Y-%m-%d')}; {record['rounds']} rounds, best kept). The default "
        f"model in float32, mixbits' decoder: a prompt of {record['context'] - record['new_tokens']} tokens of austen, "
        f"then {record['new_tokens']} decode steps timed. Cache MB: what the cache holds for {record['context']} "
        "tokens. Peak MB: the process's resident peak over the decode steps; '+': over the resident size before "
        "the cache was made (freed heap memory handed back to the system before each measure, so the prompt "
        "pass's scratch is not counted). Ratios to the float32 cache of this run.",
        "",
        format_table(["cache", "keys", "values", "decode tok/s", "vs float32", "cache MB", "cache ratio",
                      "peak MB", "rise MB"], rows),
    ])


if __name__ == "__main__":
    main()

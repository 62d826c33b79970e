"""KV-cache quantization on the default model: perplexity against the float cache at 2048 and 4096 tokens of context.

Each row reads the default model's keys and values through KV options
(`mixbits.kvcache`) in the fake-quantized forward, whose arithmetic the
packed cache of mixbits' decoder reproduces (tests/test_kvcache.py), and
scores it on windows of 2048 and of 4096 tokens from the middle of each
evaluation domain (pydoc; Jane Austen's novels and the King James Bible,
long texts of kinds no calibration here holds), against the same model with
its float32 cache. Every query reads keys and values as a decoder writing
the window token by token would: quantized once old enough, in float16
before (residual windows, partial channel groups).

Rows: keys alone quantized (values float), values alone, both; per-token
against per-channel keys (KVQuant, KIVI), post- against pre-RoPE keys,
Hadamard rotation of each head (RotateKV), a 16-bit residual window of the
newest tokens (KIVI). 'plan' rows allocate per-block key and value options
to the size of a uniform row at 4096 tokens from the damage `mixbits kv-plan`
measures (bench/results/kv_cache/damage.json: the menu KV_MENU on four windows
of 512 tokens of the calibration mix).
Bits per number count codes and parameters of the quantized tokens and the
16 bits of those waiting, at each context.

Resumable: finished rows in bench/results/kv_cache.json are kept.

    python bench/kv_cache.py [--only keys] [--context 2048]
"""

from __future__ import annotations

import argparse
import time

from mixbits.eval import evaluate_domains, load_domains
from mixbits.eval.domains import reference_scores
from mixbits.kvcache import parse_kv
from mixbits.kvcache.fake import fake_quantized_kv
from mixbits.kvcache.plan import KVBudget, KVPlan
from mixbits.kvcache.planning import cache_shape, kv_damage, plan_kv
from mixbits.models import load_model
from mixbits.record import provenance
from mixbits.report import format_table

from common import RESULTS, domain_cells, earlier_results, rewrite_report, write_results

NAME = "kv_cache"
CONTEXTS = {2048: 4, 4096: 2}  # window length -> windows per domain (8192 tokens per domain at either)
ROWS = [  # (label, keys, values)
    ("keys int8 per token", "int8:ch:sym", None),
    ("keys int4 per token", "int4:g32:asym", None),
    ("keys int4 per channel", "int4:g32:asym/channel", None),
    ("keys int4 per token, pre-rope", "int4:g32:asym/pre-rope", None),
    ("keys int3 per token", "int3:g32:asym", None),
    ("keys int3 per channel", "int3:g32:asym/channel", None),
    ("keys int2 per token", "int2:g32:asym", None),
    ("keys int2 per token, rotated", "int2:g32:asym/rotate", None),
    ("keys int2 per channel", "int2:g32:asym/channel", None),
    ("keys int2 per channel, pre-rope", "int2:g32:asym/channel/pre-rope", None),
    ("keys int2 per channel, rotated", "int2:g32:asym/channel/rotate", None),
    ("keys int2 per channel, residual 128", "int2:g32:asym/channel/residual128", None),
    ("values int4 per token", None, "int4:g32:asym"),
    ("values int3 per token", None, "int3:g32:asym"),
    ("values int2 per token", None, "int2:g32:asym"),
    ("values int2 per token, rotated", None, "int2:g32:asym/rotate"),
    ("values int2 per channel", None, "int2:g32:asym/channel"),
    ("values int2 per token, residual 128", None, "int2:g32:asym/residual128"),
    ("both int8 per token", "int8:ch:sym", "int8:ch:sym"),
    ("both int4 per token", "int4:g32:asym", "int4:g32:asym"),
    ("both int3 per token", "int3:g32:asym", "int3:g32:asym"),
    ("both int2, KIVI (keys per channel, residual 128)", "int2:g32:asym/channel/residual128",
     "int2:g32:asym/residual128"),
]
# Rows also scored at 4096 tokens (each row takes 2-3 minutes per context on this machine): each claim's pair
LONG_ROWS = {"keys int2 per token", "keys int2 per token, rotated", "keys int2 per channel", "values int2 per token",
             "both int8 per token", "both int4 per token", "both int3 per token",
             "both int2, KIVI (keys per channel, residual 128)"}
KV_MENU = ["int8:ch:sym", "int4:g32:asym", "int4:g32:asym/channel", "int3:g32:asym", "int3:g32:asym/channel",
           "int2:g32:asym", "int2:g32:asym/channel/residual128"]
PLAN_SIZES = ["both int4 per token", "both int3 per token"]  # plans allocated to these uniform rows' sizes
DAMAGE = RESULTS / "kv_cache" / "damage.json"
# Four windows of 512 calibration tokens (one per source of the mix): every (block, keys or values, option) reruns
# the blocks after it, about half an hour for the menu on this machine (kv-plan's default, 4 x 2048, has four times
# the tokens: at least four times as long)
DAMAGE_WINDOWS, DAMAGE_WINDOW_LEN = 4, 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="run only rows containing this text (repeatable)")
    parser.add_argument("--context", type=int, action="append", default=[], help="run only this context (repeatable)")
    parser.add_argument("--report", action="store_true", help="only rewrite the Markdown from the committed JSON")
    args = parser.parse_args()
    if args.report:
        rewrite_report(NAME, _markdown)
        return

    loaded = load_model()
    shape = cache_shape(loaded.model)
    record = provenance(loaded.name, loaded.sha256)
    record["contexts"] = {str(length): count for length, count in CONTEXTS.items()}
    record["float_bytes_per_token"] = 2 * shape.blocks * shape.numbers(1) * shape.model_bits // 8
    record["results"] = earlier_results(NAME, record, ("model", "contexts"))
    done = {(r["label"], r["context"]) for r in record["results"]}
    rows = [(label, [(parse_kv(k), parse_kv(v))] * shape.blocks) for label, k, v in ROWS]
    if any("plan" in text for text in args.only) or not args.only:
        DAMAGE.parent.mkdir(parents=True, exist_ok=True)
        menu = [parse_kv(text) for text in KV_MENU]
        damage = kv_damage(loaded, menu, DAMAGE_WINDOWS, DAMAGE_WINDOW_LEN, path=DAMAGE,
                           progress=lambda done, total: print(f"damage: block {done}/{total}", flush=True))
        record["damage_seconds"] = damage.seconds
        for uniform in PLAN_SIZES:
            layers = dict(rows)[uniform]
            size = KVPlan(layers, max(CONTEXTS)).cache_bits(shape)
            plan = plan_kv(loaded, KVBudget(max(CONTEXTS), bytes=size // 8), menu, damage)
            rows.append((f"plan, size of {uniform}", plan.layers))
    for context, count in CONTEXTS.items():
        if args.context and context not in args.context:
            continue
        chosen = [(label, layers) for label, layers in rows if (label, context) not in done
                  and (context == min(CONTEXTS) or label in LONG_ROWS or label.startswith("plan"))
                  and (not args.only or any(text in label for text in args.only))]
        if not chosen:
            continue
        domains = load_domains(loaded.tokenizer, None, count, context)
        record["domains"] = [d.describe() for d in domains]
        references = reference_scores(loaded.model, domains, progress=False)
        record.setdefault("fp32_perplexity", {})[str(context)] = {d.name: r.perplexity
                                                                 for d, r in zip(domains, references)}
        for label, layers in chosen:
            started = time.perf_counter()
            with fake_quantized_kv(loaded.model, layers):
                result = evaluate_domains(loaded, domains, references, progress=False)
            bits = KVPlan(layers, context).cache_bits(shape)
            row = {"label": label, "context": context, "seconds": time.perf_counter() - started,
                   "layers": [[str(k or "none"), str(v or "none")] for k, v in layers],
                   "bits_per_number": bits / (2 * shape.blocks * shape.numbers(context)),
                   "bytes_per_token": bits / 8 / context, **result.as_dict()}
            record["results"].append(row)
            write_results(NAME, record, _markdown(record))
            deltas = ", ".join(f"{d['name']} {d['delta_perplexity']:+.1%}" for d in row["domains"])
            print(f"{context} {label:50} {row['bits_per_number']:.2f} bits  {deltas} ({row['seconds']:.0f} s)",
                  flush=True)


def _markdown(record: dict) -> str:
    names = [d["name"] for d in record["domains"]]
    headers = ["context", "row", "bits / number", "bytes / token"] + [f"Δ ppl {n}" for n in names] + [
        "mean Δ, unseen kinds", "mean KL", "s"]
    order = [label for label, _, _ in ROWS]
    table = []
    for r in sorted(record["results"], key=lambda r: (r["context"], order.index(r["label"]) if r["label"] in order
                                                      else len(order), r["label"])):
        table.append([r["context"], r["label"], f"{r['bits_per_number']:.2f}", f"{r['bytes_per_token']:,.0f}",
                      *domain_cells(r, names), f"{sum(d['kl'] for d in r['domains']) / len(r['domains']):.4f}",
                      round(r["seconds"])])
    fp32 = "; ".join(f"{context} tokens: " + ", ".join(f"{n} {p:.3f}" for n, p in values.items())
                     for context, values in record.get("fp32_perplexity", {}).items())
    windows = ", ".join(f"{count} windows of {length} tokens" for length, count in record["contexts"].items())
    return "\n".join([
        "# KV-cache quantization: perplexity against the float32 cache",
        "",
        f"`python bench/kv_cache.py` (resumable; the last run was `{record['command']}`, {time.strftime('%Y-%m-%d')}). "
        f"{record['model']['name']}; each domain scored on {windows} from its middle (pydoc; austen and kjv, long "
        "texts of kinds no calibration here holds), the same model's float32 cache the reference; fp32 perplexity: "
        f"{fp32}. Options: `mixbits.kvcache` strings; per token: a scale and zero point per 32 numbers of each "
        "head's vector; per channel: per channel over 32 consecutive tokens; tokens not yet quantized wait in "
        "float16. Bits per number and bytes per token count the whole cache at that context (the float32 cache: "
        f"32 bits, {record['float_bytes_per_token']:,} bytes per token). 'plan, size of ROW': per-block options "
        "allocated by the knapsack to ROW's cache size at 4096 tokens, from the damage measured in "
        f"bench/results/kv_cache/damage.json (options {', '.join(KV_MENU)}, or the float cache; KL on "
        f"{DAMAGE_WINDOWS} windows of {DAMAGE_WINDOW_LEN} calibration tokens). At 4096 tokens only the rows each "
        "claim compares (LONG_ROWS) and the plans are scored.",
        "",
        format_table(headers, table),
    ])


if __name__ == "__main__":
    main()

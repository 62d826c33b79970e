"""Shared set-up of the benchmarks: the default model, text and windows of the protocol in DESIGN.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mixbits.models import load_model
from mixbits.record import provenance

RESULTS = Path(__file__).parent / "results"


def domain_protocol():
    """(loaded model, evaluation domains, provenance record) under the multi-domain protocol."""
    from mixbits.eval import load_domains

    loaded = load_model()
    domains = load_domains(loaded.tokenizer)
    record = provenance(loaded.name, loaded.sha256)
    record["domains"] = [d.describe() for d in domains]
    return loaded, domains, record


def fp32_references(loaded, domains, record: dict):
    """The fp32 model's scores on every domain (the reference of every row), their perplexities put in `record`."""
    from mixbits.eval import reference_scores

    references = reference_scores(loaded.model, domains)
    record["fp32_perplexity"] = {d.name: r.perplexity for d, r in zip(domains, references)}
    return references


def calibrated_protocol():
    """`domain_protocol` and the default calibration windows: (loaded, domains, record, windows), the windows'
    description in record["calibration"]."""
    from mixbits import defaults
    from mixbits.calibrate import calibration_data

    loaded, domains, record = domain_protocol()
    windows, record["calibration"] = calibration_data(loaded, None, defaults.CALIBRATION_WINDOWS, defaults.CALIBRATION_LEN)
    return loaded, domains, record, windows


def rewrite_report(name: str, markdown) -> None:
    """Rewrite bench/results/NAME.md from the committed NAME.json with `markdown(record)` (a --report run)."""
    record = json.loads((RESULTS / f"{name}.json").read_text())
    write_results(name, record, markdown(record))


def llama_cpp_tool(name: str) -> str:
    """The path of llama.cpp's program `name` in $LLAMA_CPP_BIN (exits with a one-line message if it is not there)."""
    import sys

    directory = os.environ.get("LLAMA_CPP_BIN")
    if not directory or not (Path(directory) / name).exists():
        sys.exit(f"set LLAMA_CPP_BIN to a llama.cpp build's bin directory holding {name}")
    return str(Path(directory) / name)


def llama_bench_speeds(output: str) -> tuple[dict[str, float], str]:
    """Prefill and decode tokens/s from `llama-bench -o csv` output, and the llama.cpp build it names."""
    import csv

    lines = output.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("build_commit,")):]
    speeds, build = {}, "?"
    for row in csv.DictReader(line for line in table if line.startswith(("build_commit,", '"'))):
        speeds["prefill_tokens_per_s" if int(row["n_prompt"]) > 0 else "decode_tokens_per_s"] = float(row["avg_ts"])
        build = row["build_commit"]
    return speeds, build


def earlier_results(name: str, record: dict, keys: tuple[str, ...]) -> list[dict]:
    """The rows of bench/results/NAME.json from an earlier run whose `keys` equal `record`'s, so a run can resume."""
    previous = RESULTS / f"{name}.json"
    if not previous.exists():
        return []
    old = json.loads(previous.read_text())
    return old["results"] if all(old.get(key) == record[key] for key in keys) else []


def domain_cells(row: dict, names: list[str]) -> list[str]:
    """Δ ppl on each domain, then the mean over unseen kinds, of a row holding `DomainsEvaluation.as_dict()`."""
    by_name = {d["name"]: d for d in row["domains"]}
    return [pct(by_name[n]["delta_perplexity"]) for n in names] + [pct(row["mean_unseen"]["delta_perplexity"])]


def pct(value: float) -> str:
    return f"{value:+.1%}" if abs(value) < 10 else f"{value:+.0%}"


def write_results(name: str, record: dict, markdown: str) -> None:
    """Write bench/results/NAME.json and NAME.md atomically."""
    RESULTS.mkdir(exist_ok=True)
    for suffix, content in ((".json", json.dumps(record, indent=1) + "\n"), (".md", markdown + "\n")):
        target = RESULTS / f"{name}{suffix}"
        tmp = target.with_suffix(suffix + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, target)


def llama_cpp_file(label: str, names: list[str]) -> dict | None:
    """A file of bench/results/llama_cpp.json by its label: its size in MB and Δ ppl cells on `names` and their
    unseen mean, under the protocol's evaluator (None if that benchmark has not run)."""
    path = RESULTS / "llama_cpp.json"
    if not path.exists():
        return None
    found = next((r for r in json.loads(path.read_text()).get("results", []) if r.get("file") == label), None)
    if found is None:
        return None
    by_name = {d["name"]: d for d in found["evaluation"]["domains"]}
    cells = [f"{by_name[n]['delta_perplexity']:+.1%}" for n in names]
    cells.append(f"{found['evaluation']['mean_unseen']['delta_perplexity']:+.1%}")
    return {"mb": found["bytes"] / 1e6, "bits_per_weight": found.get("decoder_bpw"), "cells": cells}

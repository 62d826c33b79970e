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

"""Sweep budgets and the sweep's written report."""

import json

import pytest

from mixbits.errors import MixbitsError
from mixbits.report.sweep import write
from mixbits.sweep import SweepPoint, finished_points, parse_budgets


def test_budget_ranges():
    assert parse_budgets("2.25:4.5:0.25") == [2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 3.75, 4.0, 4.25, 4.5]
    assert parse_budgets("2.5,3,3.5") == [2.5, 3.0, 3.5]
    for bad in ("4:2:0.5", "2:4:0", "two", "0,3"):
        with pytest.raises(MixbitsError):
            parse_budgets(bad)


def test_report_files(tmp_path):
    def domains(pydoc, book):
        return {"pydoc": {"perplexity": 15.0, "delta_perplexity": pydoc, "kl": 0.2, "agreement": 0.8},
                "book": {"perplexity": 25.0, "delta_perplexity": book, "kl": 0.2, "agreement": 0.8}}

    points = [
        SweepPoint("allocated", "3 bpw", 3.0, 2.9999, 300, 0.1, 0.145, 0.19, 0.2, 0.8, 100.0, {"int3:g64:asym@gptq": 5},
                   domains(0.10, 0.19)),
        SweepPoint("heuristic", "3 bpw", 3.0, 2.98, 298, 0.2, 0.22, 0.3, 0.3, 0.7, 100.0, {}, domains(0.14, 0.3)),
        SweepPoint("uniform", "int3:g64:asym@gptq", None, 3.30, 330, None, 0.283, 0.4, 0.35, 0.7, 90.0, {},
                   domains(0.166, 0.4)),
    ]
    record = {"model": {"name": "m"}, "points": [p.as_dict() for p in points]}
    written = write(record, tmp_path / "out", "m: perplexity against bits per weight")
    assert sorted(p.name for p in written) == ["sweep.html", "sweep.json", "sweep.md", "sweep.png"]
    assert (tmp_path / "out" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "sweep.json").read_text()) == record
    markdown = (tmp_path / "out" / "sweep.md").read_text()
    assert "| allocated | 3 bpw" in markdown and "+14.5%" in markdown and "+28.3%" in markdown
    assert "Δ ppl book" in markdown and "+19.0%" in markdown and "+16.6%" in markdown
    page = (tmp_path / "out" / "sweep.html").read_text()
    assert page.count("<tr>") == 4 and "data:image/png;base64," in page
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_an_interrupted_sweep_resumes_only_with_the_same_settings(tmp_path):
    settings = {"model": {"sha256": "ab"}, "domains": [{"name": "pydoc"}], "calibration": {"count": 4}, "damage": "kl",
                "options": ["int2:g64:asym@gptq"], "pins": []}
    points = [{"series": "allocated", "label": "3 bpw", "budget": 3.0}, {"series": "allocated", "label": "4 bpw", "budget": 4.0},
              {"series": "uniform", "label": "int2:g64:asym@gptq", "budget": None}]
    (tmp_path / "sweep.json").write_text(json.dumps({**settings, "budgets": [3.0, 4.0], "points": points}))
    kept = finished_points(tmp_path / "sweep.json", {**settings, "budgets": [3.0, 3.5]})
    assert [p["label"] for p in kept] == ["3 bpw", "int2:g64:asym@gptq"]
    assert finished_points(tmp_path / "sweep.json", {**settings, "damage": "proxy", "budgets": [3.0]}) == []
    assert finished_points(tmp_path / "none.json", {**settings, "budgets": [3.0]}) == []

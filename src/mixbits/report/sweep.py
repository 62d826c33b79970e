"""A sweep's results as a Markdown table, a PNG plot and a self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from ..files import write_atomic
from .table import format_table

SERIES_STYLE = {  # series -> (colour, marker, line)
    "allocated": ("#1f77b4", "o", "-"),
    "heuristic": ("#ff7f0e", "s", "--"),
    "uniform": ("#7f7f7f", "^", ":"),
}
def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1%}" if abs(value) < 10 else f"{value:+.0%}"


def headers(points: list[dict]) -> list[str]:
    names = list(points[0]["domains"]) if points else []
    return (["series", "config", "bpw"] + [f"Δ ppl {n}" for n in names]
            + ["mean Δ ppl", "mean Δ, unseen kinds", "mean KL", "top-1 agree", "predicted", "quantize s"])


def rows(points: list[dict]) -> list[list]:
    return [[p["series"], p["label"], round(p["bits_per_weight"], 4)]
            + [_pct(d["delta_perplexity"]) for d in p["domains"].values()]
            + [_pct(p["delta_perplexity"]), _pct(p["delta_unseen"]), p["kl"], p["agreement"], p["predicted_damage"],
               round(p["quantize_seconds"], 1)]
            for p in sorted(points, key=lambda p: (p["series"], p["bits_per_weight"]))]


def table(points: list[dict]) -> str:
    return format_table(headers(points), rows(points))


def _plotted(point: dict) -> float:
    """What the plot shows: the mean over unseen kinds of text where there are any, else over every domain."""
    return point["delta_unseen"] if point["delta_unseen"] is not None else point["delta_perplexity"]


def plot_png(points: list[dict], title: str) -> bytes:
    """Mean perplexity change on unseen kinds of text (log scale) against bits per weight, one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7.5, 4.8), dpi=120)
    for series, (colour, marker, line) in SERIES_STYLE.items():
        chosen = sorted((p for p in points if p["series"] == series), key=lambda p: p["bits_per_weight"])
        if not chosen:
            continue
        x = [p["bits_per_weight"] for p in chosen]
        y = [100 * _plotted(p) for p in chosen]
        axes.plot(x, y, line, color=colour, marker=marker, label=series)
        if series == "uniform":
            for p, xi, yi in zip(chosen, x, y):
                axes.annotate(p["label"].split("@")[0], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_yscale("log")
    axes.set_xlabel("bits per weight (quantized layers, scales counted)")
    axes.set_ylabel("perplexity increase over fp32, % (log)\nmean over domains the calibration never saw")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    return buffer.getvalue()


def page(record: dict, png: bytes, title: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers(record["points"]))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_text(v))}</td>" for v in row) + "</tr>" for row in rows(record["points"])
    )
    details = html.escape(json.dumps({k: v for k, v in record.items() if k != "points"}, indent=1))
    image = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}td:nth-child(-n+2){{text-align:left}}</style></head>
<body><h1>{html.escape(title)}</h1>
<img alt="perplexity against bits per weight" src="data:image/png;base64,{image}">
<table><tr>{head}</tr>{body}</table>
<h2>Run</h2><pre>{details}</pre></body></html>
"""


def _text(value) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write(record: dict, folder: str | Path, title: str) -> list[Path]:
    """sweep.json, sweep.md, sweep.png and sweep.html in `folder`, each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png = plot_png(record["points"], title)
    files = {
        "sweep.json": (json.dumps(record, indent=1) + "\n").encode(),
        "sweep.md": f"# {title}\n\n{table(record['points'])}\n".encode(),
        "sweep.png": png,
        "sweep.html": page(record, png, title).encode(),
    }
    return [write_atomic(folder / name, data) for name, data in files.items()]

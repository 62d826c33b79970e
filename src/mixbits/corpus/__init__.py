"""The default calibration mix and evaluation domains, built from named text sources (`sources.py`).

Recipe of the calibration mix: the sources in `CALIBRATION_MIX` (technical
documentation, source code, quotations and dialogue, expository prose) share
the windows equally (the first sources take one more when the count does not
divide). Each source is tokenized whole, without special tokens, and its
windows (after a BOS for models that take one, `data.with_bos`) are spread evenly, without overlap, over the *first half* of its
tokens; the mix interleaves the sources window by window, so any prefix of it
(the Fisher and KL passes of `mixbits plan` use the first windows) covers
every kind. Evaluation windows of any source start at its middle token
(`data.eval_windows`), so no calibration window can overlap an evaluation
window of the same source, by construction.

Evaluation domains (`EVALUATION_DOMAINS`): pydoc, the continuity column
(its first half is in the mix), and two kinds of text the mix does not
contain at all: narrative fiction (austen) and scripture (kjv).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..data import Text, bos_token_id, check_window_counts, load_text, text_length, tokenize, with_bos
from ..defaults import CALIBRATION_MIX, EVALUATION_DOMAINS
from ..errors import TextError
from .sources import SOURCES, Source, fetch_all, source

MIX_NAME = "calibration mix (" + ", ".join(CALIBRATION_MIX) + ")"

__all__ = ["CALIBRATION_MIX", "EVALUATION_DOMAINS", "SOURCES", "Source", "calibration_mix", "fetch_all",
           "resolve_text", "source", "spread_windows"]


def resolve_text(spec: str | Path | Text | None) -> Text:
    """A text by source name (`austen`), path (file or folder) or as given; None is pydoc."""
    if isinstance(spec, Text):
        return spec
    if spec is None:
        return SOURCES["pydoc"].text()
    if isinstance(spec, str) and spec in SOURCES and not Path(spec).exists():
        return SOURCES[spec].text()
    return load_text(spec)


def spread_windows(tokens: torch.Tensor, count: int, length: int, name: str) -> tuple[torch.Tensor, list[int]]:
    """`count` non-overlapping windows of `length` tokens spread evenly over the first half of `tokens`."""
    half = len(tokens) // 2
    if count * length > half:
        raise TextError(f"text source {name} has {len(tokens)} tokens; {count} calibration windows of {length} "
                        f"from its first half need {2 * count * length}; ask for fewer or shorter windows")
    span = half - length
    starts = [0] if count == 1 else [i * span // (count - 1) for i in range(count)]
    return torch.stack([tokens[s:s + length] for s in starts]), starts


def calibration_mix(tokenizer, count: int, length: int, names: tuple[str, ...] = CALIBRATION_MIX) -> tuple[torch.Tensor, dict]:
    """The mix's [count, length] token windows and a record of what they are (sources, hashes, starts)."""
    check_window_counts(count, length)
    if count < len(names):
        raise TextError(f"the calibration mix has {len(names)} sources; ask for at least {len(names)} windows")
    bos = bos_token_id(tokenizer)
    shares = [count // len(names) + (i < count % len(names)) for i in range(len(names))]
    per_source, described = [], []
    for name, share in zip(names, shares):
        text = source(name).text()
        windows, starts = spread_windows(tokenize(text, tokenizer), share, text_length(length, bos), name)
        per_source.append(with_bos(windows, bos))
        described.append({**source(name).describe(), "sha256": text.sha256, "windows": share, "starts": starts})
    order = [(i, k) for k in range(max(shares)) for i in range(len(names)) if k < shares[i]]
    windows = torch.stack([per_source[i][k] for i, k in order])
    record = {"text": MIX_NAME, "count": count, "length": length, "sources": described,
              "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()}
    if bos is not None:
        record["bos_token_id"] = bos
    return windows, record

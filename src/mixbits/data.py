"""Texts and deterministic token windows.

The default text is CPython's `pydoc_data.topics`, joined in sorted key order
(named text sources and the default calibration mix live in `corpus`).
Evaluation windows start halfway through the token stream; calibration
windows of a single text come from its first half, so the two never overlap.

A model whose tokenizer adds a BOS to what it encodes sees every input start
with it in use, so its windows do too: BOS + length-1 text tokens. The BOS
is never a target (each window's first token is not predicted), so every
window scores length-1 text tokens either way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import TextError

DEFAULT_TEXT_NAME = "pydoc_data.topics"


@dataclass(frozen=True)
class Text:
    text: str
    name: str
    sha256: str


@dataclass(frozen=True)
class WindowSpec:
    """`count` windows of `length` tokens from token `start`; with `bos`, each is BOS + length-1 text tokens."""

    count: int
    length: int
    start: int
    bos: int | None = None

    def as_dict(self) -> dict:
        found = {"count": self.count, "length": self.length, "start": self.start}
        if self.bos is not None:  # absent: windows are text tokens only (records from before BOS support match)
            found["bos_token_id"] = self.bos
        return found


def load_text(source: str | Path | None = None) -> Text:
    """The default text, a UTF-8 text file, or every file of a folder (sorted, joined by blank lines)."""
    if source is None:
        from pydoc_data.topics import topics

        return _text("\n\n".join(topics[key] for key in sorted(topics)), DEFAULT_TEXT_NAME)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
        if not files:
            raise TextError(f"text folder {path} holds no files; give a folder of UTF-8 text files")
        return _text("\n\n".join(_read(p) for p in files), str(path))
    if not path.exists():
        raise TextError(f"text path {str(path)!r} does not exist; give a UTF-8 text file or a folder of them")
    return _text(_read(path), str(path))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TextError(f"{path} is not UTF-8 text; give text files only") from None
    except OSError as error:
        raise TextError(f"cannot read {path}: {error.strerror}") from None


def _text(text: str, name: str) -> Text:
    if not text.strip():
        raise TextError(f"the text from {name} is empty; give a file with text in it")
    return Text(text, name, hashlib.sha256(text.encode("utf-8")).hexdigest())


def tokenize(text: Text, tokenizer) -> torch.Tensor:
    """The whole text as one int64 token stream, without special tokens."""
    if tokenizer is None:
        raise TextError("this model has no tokenizer; pass tokenizer= to load_model")
    ids = tokenizer(text.text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_token_id(tokenizer) -> int | None:
    """The BOS token id if `tokenizer` adds one to the text it encodes, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """[count, text tokens] windows with the BOS column in front (unchanged without a BOS)."""
    if bos is None:
        return windows
    return torch.cat([torch.full((len(windows), 1), bos, dtype=windows.dtype), windows], dim=1)


def text_length(length: int, bos: int | None) -> int:
    """Text tokens in a window of `length` tokens."""
    return length - (bos is not None)


def eval_windows(tokens: torch.Tensor, count: int, length: int, bos: int | None = None) -> tuple[torch.Tensor, WindowSpec]:
    """`count` non-overlapping windows of `length` tokens whose text starts at `len(tokens) // 2`."""
    check_window_counts(count, length)
    start, step = len(tokens) // 2, text_length(length, bos)
    needed = start + count * step
    if needed > len(tokens):
        raise TextError(
            f"the text has {len(tokens)} tokens but {count} evaluation windows of {length} from its middle need "
            f"{2 * count * step}; give more text or fewer/shorter windows"
        )
    return with_bos(tokens[start:needed].reshape(count, step), bos), WindowSpec(count, length, start, bos)


def calibration_windows(tokens: torch.Tensor, count: int, length: int,
                        bos: int | None = None) -> tuple[torch.Tensor, WindowSpec]:
    """`count` windows of `length` tokens from the start, before the evaluation half."""
    check_window_counts(count, length)
    needed = count * text_length(length, bos)
    if needed > len(tokens) // 2:
        raise TextError(
            f"the text has {len(tokens)} tokens but {count} calibration windows of {length} need at least "
            f"{2 * needed} (calibration uses only the first half); give more text or fewer/shorter windows"
        )
    return with_bos(tokens[:needed].reshape(count, -1), bos), WindowSpec(count, length, 0, bos)


def check_window_counts(count: int, length: int) -> None:
    """Reject window counts that can never work, before any slow work starts."""
    if count < 1 or length < 2:
        raise TextError(f"need at least 1 window of at least 2 tokens, got {count} x {length}")

"""A loaded model with its tokenizer and identity: what every stage passes along (a leaf, so loaders and writers share it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from.

    `sha256` identifies the source weights (the GGUF file, the directory's
    weight files, or an in-memory module's state dict).
    """

    model: nn.Module
    tokenizer: Any | None
    name: str
    sha256: str

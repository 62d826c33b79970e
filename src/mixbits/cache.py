"""Where mixbits keeps what it builds once: converted models, native kernels, text sources."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if "MIXBITS_CACHE" in os.environ:
        return Path(os.environ["MIXBITS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mixbits"

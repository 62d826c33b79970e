"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to a temporary name next to `path`, then rename it into place."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        temporary.write_text(data)
    else:
        temporary.write_bytes(data)
    os.replace(temporary, path)
    return path


def write_json(path: str | Path, record: dict) -> Path:
    return write_atomic(path, json.dumps(record, indent=1) + "\n")

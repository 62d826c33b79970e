"""The provenance attached to every result: what ran, on what, with which versions."""

from __future__ import annotations

import platform
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("mixbits", "torch", "transformers", "numpy", "gguf"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def command_line() -> str:
    """The command as a user would retype it: `mixbits ...` or `python script.py ...`."""
    program = sys.argv[0]
    head = ["python", program] if program.endswith(".py") else [program.rsplit("/", 1)[-1]]
    return shlex.join([*head, *sys.argv[1:]])


def provenance(model_name: str, model_sha256: str, text_name: str | None = None, text_sha256: str | None = None) -> dict:
    record = {
        "command": command_line(),
        "versions": versions(),
        "model": {"name": model_name, "sha256": model_sha256},
    }
    if text_name is not None:
        record["text"] = {"name": text_name, "sha256": text_sha256}
    return record

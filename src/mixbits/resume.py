"""Finished work kept on disk, so that an interrupted `quantize` or `plan` resumes where it stopped.

A `RunState` keeps the finished steps (a quantized block, a measured group)
of one run in a subfolder named by the digest of the run's settings (the
model, options, calibration windows, solver settings, mixbits' version), so
kept work is only ever reused by a run that would have computed the same;
runs with other settings keep theirs beside it until the command finishes
and removes the whole folder. Each step is one safetensors file written
atomically (a temporary file, then a rename), its record in the file's
metadata. A step file that cannot be read (a damaged disk, an edit) is
computed again, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .io.safetensors_writer import DTYPES_BY_NAME

SETTINGS = "settings.json"


class RunState:
    def __init__(self, folder: str | Path, settings: dict):
        from . import __version__

        self.root = Path(folder)
        text = json.dumps({"mixbits": __version__, **settings}, indent=1, sort_keys=True, default=str)
        self.folder = self.root / hashlib.sha256(text.encode()).hexdigest()[:16]
        self.kept: list[str] = []  # steps found finished
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / SETTINGS).exists():  # for a reader wondering what a subfolder is
            _write_atomic(self.folder / SETTINGS, lambda tmp: tmp.write_text(text + "\n"))

    def load(self, name: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """The record and tensors of finished step `name`, or None if it is not finished (or not readable)."""
        from safetensors import safe_open

        path = self.folder / f"{name}.safetensors"
        if not path.exists():
            return None
        try:
            with safe_open(str(path), "pt") as handle:
                record = json.loads((handle.metadata() or {})["record"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception:  # noqa: BLE001 - a step we cannot read is computed again
            return None
        self.kept.append(name)
        return record, tensors

    def tensors(self, name: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The dtype and shape of every tensor of finished step `name`, read from its header alone."""
        from safetensors import safe_open

        with safe_open(str(self.folder / f"{name}.safetensors"), "pt") as handle:
            return {key: (DTYPES_BY_NAME[handle.get_slice(key).get_dtype()], tuple(handle.get_slice(key).get_shape()))
                    for key in handle.keys()}

    def tensor(self, name: str, key: str) -> torch.Tensor:
        """One tensor of finished step `name` (the others stay on disk)."""
        from safetensors import safe_open

        with safe_open(str(self.folder / f"{name}.safetensors"), "pt") as handle:
            return handle.get_tensor(key)

    def save(self, name: str, record: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save_file

        tensors = {key: value.detach().contiguous() for key, value in (tensors or {}).items()}
        metadata = {"record": json.dumps(record)}
        _write_atomic(self.folder / f"{name}.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata))



def discard(folder: str | Path) -> None:
    """Remove a resume folder: the command finished and wrote its result."""
    shutil.rmtree(folder, ignore_errors=True)


def _write_atomic(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)

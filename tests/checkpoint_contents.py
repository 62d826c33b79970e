"""A checkpoint's contents as two runs that should agree are compared: every file's bytes, mixbits.json parsed
without the timing of the run that wrote it (seconds, peak memory), and no manifest (it holds mixbits.json's hash,
which that timing changes)."""

import json

from mixbits.io.checkpoint import INFO, MANIFEST

TIMING = ("seconds", "peak_memory_bytes")


def checkpoint_contents(path):
    files = {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    info = json.loads(files.pop(INFO))
    for key in TIMING:
        info["quantization"].pop(key)
    files.pop(MANIFEST)
    return files, info

"""mixbits' native extension (csrc/), built on first use and cached.

It holds the integer-weight matrix kernels for float inputs (intgemm.cpp) and
for int8-quantized inputs (qdot.cpp, with AVX2, AVX-VNNI and AVX-512 VNNI
copies picked at run time), and the small steps of a decoder block
(decode_ops.cpp), the vector-codebook and trellis kernels (vector.cpp, trellis.cpp; the
latter also holds the Viterbi search that encodes trellis codes), and attention over a packed KV
cache (kv_cache.cpp). PyTorch's own CPU int4/int8 weight
kernels are vectorised for AVX-512 only; on an AVX2 machine such as this
project's they ran 30-40x slower than a float32 matrix product (1536x576,
one input row: 4.1 ms against 0.11 ms), so mixbits brings its own.

The sources are compiled with the system C++ compiler through
torch.utils.cpp_extension into the mixbits cache (about a minute, once per
source and torch version). They are built with OpenMP, as PyTorch is, so that
`at::parallel_for` runs on PyTorch's threads (the library's soname matches the
libgomp torch has loaded); without it the loops would run on one thread.
Without a compiler, or on a CPU without AVX2, `native()` returns None: integer
layers fall back to dequantize-and-multiply and the decoder to PyTorch
operators.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path

import torch

FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]  # F16C (16-bit scales) comes with every AVX2 CPU
SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))


@functools.cache
def native():
    """The extension module, or None (with one warning saying why) if it cannot be used here."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        warnings.warn("this CPU lacks AVX2: integer layers run by dequantize-and-multiply, more slowly", stacklevel=2)
        return None
    from torch.utils import cpp_extension

    from ..cache import cache_root

    text = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    digest = hashlib.sha256(text + torch.__version__.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    build = cache_root() / "kernels" / digest
    build.mkdir(parents=True, exist_ok=True)
    try:
        module = cpp_extension.load(name=f"mixbits_native_{digest}", sources=[str(path) for path in SOURCES],
                                    build_directory=str(build), extra_cflags=FLAGS,
                                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # compiler missing or failing: run, more slowly, without it
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"could not build mixbits' native kernels ({first}); integer layers run by "
                      "dequantize-and-multiply, more slowly. Install g++ to build them.", stacklevel=2)
        return None
    return module

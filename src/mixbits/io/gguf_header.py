"""A GGUF file's header read with every length, count and offset bounded by the file itself.

transformers (through gguf-py) trusts a GGUF's words: an array count or a
string length edited to 2^62 makes it loop or allocate until memory runs
out, a dimension edited to 2^40 makes it map bytes the file does not hold.
`read_gguf_header` walks the header first, with nothing allocated in
proportion to a number read from the file, and refuses in one line any
count that the bytes left could not hold, any tensor that does not lie
inside the data section, and anything llama.cpp would refuse as well
(nested arrays, more than 4 dimensions, an alignment that is not a power
of two, duplicate keys or tensor names).

Layout (GGUF versions 2 and 3, little-endian): "GGUF", u32 version, u64
tensor count, u64 metadata count; each metadata entry a string key, a u32
value type and the value (an array is a u32 item type, a u64 count and the
items; a string a u64 length and UTF-8 bytes); each tensor a string name,
u32 n_dims, n_dims u64 dimensions (innermost first), u32 GGML type and a
u64 offset into the data section, which starts at the next multiple of
`general.alignment` (32 if absent).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

# GGUF value types: fixed sizes and struct codes; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 1024  # bytes of a key or a tensor name
MAX_ELEMENTS = 2**40  # of one tensor


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: innermost dimension first
    ggml_type: int
    offset: int  # into the data section
    nbytes: int

    @property
    def elements(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict  # key -> a scalar or string value; arrays as ("array", item type, count)
    tensors: list[TensorInfo]
    data_offset: int


class _Reader:
    def __init__(self, buffer, path: Path):
        self.buffer, self.path, self.at = buffer, path, 0

    def fail(self, what: str):
        raise ModelLoadError(f"{self.path} is not a valid GGUF: {what} (at byte {self.at}); check that the file is "
                             "complete and unedited")

    @property
    def left(self) -> int:
        return len(self.buffer) - self.at

    def unpack(self, code: str, what: str):
        size = struct.calcsize("<" + code)
        if size > self.left:
            self.fail(f"the file ends inside {what}")
        value = struct.unpack_from("<" + code, self.buffer, self.at)[0]
        self.at += size
        return value

    def count(self, item_bytes: int, what: str, limit: int | None = None) -> int:
        """A u64 count of items of at least `item_bytes` each, which the bytes left must be able to hold."""
        start = self.at
        count = self.unpack("Q", what)
        if count * item_bytes > self.left:
            self.at = start
            self.fail(f"{what} is {count}, more than the {self.left} bytes left can hold")
        if limit is not None and count > limit:
            self.at = start
            self.fail(f"{what} is {count}, above the limit of {limit}")
        return count

    def string(self, what: str, limit: int | None = None) -> str:
        length = self.count(1, f"the length of {what}", limit)
        raw = bytes(self.buffer[self.at:self.at + length])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")
        self.at += length
        return text

    def value(self, kind: int, what: str, nested: bool = False):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY and not nested:
            start = self.at
            item = self.unpack("I", f"the item type of {what}")
            if item == _ARRAY:
                self.at = start
                self.fail(f"{what} is an array of arrays, which GGUF readers do not support")
            if item not in _SCALARS and item != _STRING:
                self.at = start
                self.fail(f"{what} has unknown item type {item}")
            size = struct.calcsize("<" + _SCALARS[item]) if item in _SCALARS else 8
            count = self.count(size, f"the item count of {what}")
            if item in _SCALARS:
                self.at += count * size
            else:
                for index in range(count):
                    self.string(f"{what}[{index}]")
            return ("array", item, count)
        self.at -= 4
        self.fail(f"{what} has unknown value type {kind}")


def read_gguf_header(path: Path) -> GGUFHeader:
    """The header of the GGUF at `path`, checked (see the module's doc); ModelLoadError in one line if it is not a
    GGUF that a reader could load without trusting its numbers."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            if size == 0:
                raise ModelLoadError(f"{path} is empty; give a complete .gguf file")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                return _parse(memoryview(buffer), path)
    except OSError as error:
        raise ModelLoadError(f"cannot read {path}: {error.strerror or error}; check the file") from None


def _parse(buffer: memoryview, path: Path) -> GGUFHeader:
    reader = _Reader(buffer, path)
    try:
        if bytes(buffer[:4]) != b"GGUF":
            reader.fail("no GGUF magic")
        reader.at = 4
        version = reader.unpack("I", "the version")
        if version not in (2, 3):
            reader.at -= 4
            reader.fail(f"version {version} (only GGUF versions 2 and 3 are read)")
        # a tensor description is at least 24 bytes (empty name, no dimensions), a metadata entry 13
        n_tensors = reader.count(24, "the tensor count")
        n_metadata = reader.count(13, "the metadata count")
        metadata: dict = {}
        for index in range(n_metadata):
            key = reader.string(f"metadata key {index}", MAX_NAME)
            if key in metadata:
                reader.fail(f"metadata key {key!r} appears twice")
            kind = reader.unpack("I", f"the value type of {key!r}")
            metadata[key] = reader.value(kind, repr(key))
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
                or alignment & (alignment - 1):
            reader.fail(f"general.alignment is {alignment!r}, not a power of two")
        tensors = [_tensor(reader, index) for index in range(n_tensors)]
        names = set()
        for tensor in tensors:
            if tensor.name in names:
                reader.fail(f"tensor {tensor.name!r} appears twice")
            names.add(tensor.name)
        data_offset = -(-reader.at // alignment) * alignment
        data_bytes = len(buffer) - data_offset
        end = 0
        for tensor in sorted(tensors, key=lambda t: t.offset):
            if tensor.offset % alignment:
                reader.fail(f"tensor {tensor.name!r} starts at {tensor.offset}, not a multiple of the alignment "
                            f"{alignment}")
            if tensor.offset < end:
                reader.fail(f"tensor {tensor.name!r} overlaps the tensor before it")
            end = tensor.offset + tensor.nbytes
            if end > data_bytes:
                reader.fail(f"tensor {tensor.name!r} ends at byte {end} of a data section of {max(data_bytes, 0)}")
        return GGUFHeader(version, metadata, tensors, data_offset)
    finally:
        reader.buffer = None
        buffer.release()


def _tensor(reader: _Reader, index: int) -> TensorInfo:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name = reader.string(f"the name of tensor {index}", MAX_NAME)
    n_dims = reader.unpack("I", f"the dimension count of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        reader.at -= 4
        reader.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} are allowed)")
    shape = tuple(reader.unpack("Q", f"the dimensions of {name!r}") for _ in range(n_dims))
    elements = 1
    for size in shape:
        elements *= size
    if min(shape) < 1 or elements > MAX_ELEMENTS:
        reader.fail(f"tensor {name!r} has shape {list(shape)}")
    ggml_type = reader.unpack("I", f"the type of {name!r}")
    try:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        reader.fail(f"tensor {name!r} has unknown GGML type {ggml_type}")
    if shape[0] % block:
        reader.fail(f"tensor {name!r}'s rows of {shape[0]} are not whole blocks of {block} for its type")
    offset = reader.unpack("Q", f"the offset of {name!r}")
    return TensorInfo(name, shape, ggml_type, offset, elements // block * block_bytes)

"""Read character vectors out of an installed R package's lazy-load data base (data/Rdata.rdx + .rdb).

Only what text data needs is understood: R's XDR serialization (format 2 or
3) of character, integer, logical, double and generic vectors, pairlists
(attributes) and symbols. Anything else, or bytes that do not parse, is a
`TextError`; nothing is evaluated.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

from ..errors import TextError

NIL, SYMBOL, PAIRLIST, CHARS, LOGICAL, INTEGER, DOUBLE, STRINGS, LIST = 254, 1, 2, 9, 10, 13, 14, 16, 19
REFERENCE = 255
HAS_ATTRIBUTES, HAS_TAG = 1 << 9, 1 << 10


class _Reader:
    def __init__(self, data: bytes, where: str):
        self.data, self.at, self.where, self.symbols = data, 0, where, []

    def take(self, size: int) -> bytes:
        if size < 0 or self.at + size > len(self.data):
            raise TextError(f"{self.where} is truncated or not R data; reinstall the package")
        chunk = self.data[self.at:self.at + size]
        self.at += size
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def document(self):
        if self.take(2) != b"X\n":
            raise TextError(f"{self.where} is not R's XDR serialization; reinstall the package")
        version = self.int()
        self.take(8)  # the writer's and the minimal reader's R versions
        if version == 3:
            self.take(self.int())  # native encoding name
        elif version != 2:
            raise TextError(f"{self.where} uses R serialization version {version}; only 2 and 3 are read")
        return self.item()

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        if kind == NIL:
            return None
        if kind == REFERENCE:
            index = (flags >> 8) - 1
            if not 0 <= index < len(self.symbols):
                raise TextError(f"{self.where} refers to an unknown symbol; reinstall the package")
            return self.symbols[index]
        if kind == SYMBOL:
            name = self.item()
            self.symbols.append(name)
            return name
        if kind == CHARS:
            size = self.int()
            return None if size == -1 else self.take(size).decode("utf-8", errors="strict")
        if kind == PAIRLIST:
            attributes = self.item() if flags & HAS_ATTRIBUTES else None
            tag = self.item() if flags & HAS_TAG else None
            del attributes
            head, rest = self.item(), self.item()
            return {tag: head, **(rest or {})}
        if kind in (STRINGS, LIST):
            value = [self.item() for _ in range(self.int())]
        elif kind in (INTEGER, LOGICAL):
            size = self.int()
            value = list(struct.unpack(f">{size}i", self.take(4 * size)))
        elif kind == DOUBLE:
            size = self.int()
            value = list(struct.unpack(f">{size}d", self.take(8 * size)))
        else:
            raise TextError(f"{self.where} holds an R object of type {kind}, which is not text data")
        if flags & HAS_ATTRIBUTES:
            attributes = self.item()
            names = attributes.get("names") if isinstance(attributes, dict) else None
            if names is not None and len(names) == len(value):
                return dict(zip(names, value))
        return value


def read_lazyload(folder: Path) -> dict[str, list[str]]:
    """Every character vector in `folder`/Rdata.rdx + Rdata.rdb, by name, in the index's order."""
    index_path, base_path = folder / "Rdata.rdx", folder / "Rdata.rdb"
    try:
        index = _Reader(gzip.decompress(index_path.read_bytes()), str(index_path)).document()
        base = base_path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise TextError(f"cannot read R data in {folder} ({error}); reinstall the package") from None
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise TextError(f"{index_path} is not an R lazy-load index; reinstall the package")
    if index.get("compressed") not in ([1], [True]):
        raise TextError(f"{index_path}: only zlib-compressed R data is read; reinstall the package")
    found = {}
    for name, place in index["variables"].items():
        if not (isinstance(place, list) and len(place) == 2) or place[0] < 0 or place[0] + place[1] > len(base):
            raise TextError(f"{index_path} points outside {base_path}; reinstall the package")
        chunk = base[place[0]:place[0] + place[1]]
        try:
            value = _Reader(zlib.decompress(chunk[4:]), f"{base_path}:{name}").document()
        except zlib.error:
            raise TextError(f"{base_path} entry {name} is not zlib data; reinstall the package") from None
        if isinstance(value, list) and all(isinstance(line, str) or line is None for line in value):
            found[name] = ["" if line is None else line for line in value]
    return found

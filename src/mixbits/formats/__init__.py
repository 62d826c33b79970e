"""The format registry: a format string parses to one format object.

`parse_format("int4:g128:asym")` returns the format; `str()` of it gives the
same canonical string back.
"""

from __future__ import annotations

import difflib

from ..errors import FormatError
from .base import Format, QuantizedTensor
from .granularity import Granularity
from .integer import IntFormat

# Family prefix -> parser. Each family parses its own options.
FAMILIES = {"int": IntFormat.parse}
EXAMPLES = ["int8:ch:sym", "int4:g128:asym", "int4:g64:sym", "int3:g64:asym", "int2:g64:asym"]


def parse_format(text: str | Format) -> Format:
    """Parse a format string such as `int4:g128:asym`; formats pass through."""
    if isinstance(text, Format):
        return text
    text = text.strip()
    for prefix, parse in FAMILIES.items():
        if text.startswith(prefix):
            return parse(text)
    close = difflib.get_close_matches(text, EXAMPLES, n=3, cutoff=0.3) or EXAMPLES[:3]
    raise FormatError(f"unknown format {text!r}; did you mean {', '.join(close)}?")


__all__ = ["Format", "FormatError", "Granularity", "IntFormat", "QuantizedTensor", "parse_format"]

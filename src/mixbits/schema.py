"""The expected shape of JSON that mixbits reads from files, checked before anything uses it.

A spec is a Python type (`str`, `int`, `float`, `bool`, `dict`, `list`: the
value must be one; an int is no bool, a float may be an int), a dict of
`Field`s (an object with those keys, more allowed), `ListOf`, `MapOf`,
`Nullable`, or `Check` (a spec and a test). `check` raises SchemaError, a
one-line MixbitsError naming where in the file the value is wrong.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

from .errors import MixbitsError, first_line


class SchemaError(MixbitsError):
    """A file's JSON does not have the shape mixbits expects."""


@dataclass(frozen=True)
class Field:
    spec: Any
    required: bool = True


def optional(spec) -> Field:
    return Field(spec, required=False)


@dataclass(frozen=True)
class ListOf:
    spec: Any
    length: int | None = None  # exactly this many items, if given


@dataclass(frozen=True)
class MapOf:
    key: Any  # a spec for the (string) keys
    value: Any


@dataclass(frozen=True)
class Nullable:
    spec: Any


@dataclass(frozen=True)
class Check:
    spec: Any
    test: Callable[[Any], bool]
    what: str  # what the value must be, for the message


def read_json(path: Path, error: type[MixbitsError], missing: str, damaged: str):
    """The JSON value in `path`; `error(missing)` if there is no such file, `error(damaged)` if it is not UTF-8 JSON,
    with "{error}" in `damaged` replaced by what is wrong."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(missing) from None
    except (OSError, ValueError) as problem:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise error(damaged.replace("{error}", f"{type(problem).__name__}: {first_line(problem)}")) from None


def check(value, spec, where: str) -> None:
    """Raise SchemaError unless `value` matches `spec`; `where` names the value (e.g. "mixbits.json: layers[3].shape")."""
    if isinstance(spec, Nullable):
        if value is not None:
            check(value, spec.spec, where)
    elif isinstance(spec, Check):
        check(value, spec.spec, where)
        if not spec.test(value):
            raise SchemaError(f"{where} must be {spec.what}, got {_short(value)}")
    elif isinstance(spec, ListOf):
        if not isinstance(value, list):
            raise SchemaError(f"{where} must be a list, got {_short(value)}")
        if spec.length is not None and len(value) != spec.length:
            raise SchemaError(f"{where} must have {spec.length} items, got {len(value)}")
        for index, item in enumerate(value):
            check(item, spec.spec, f"{where}[{index}]")
    elif isinstance(spec, MapOf):
        if not isinstance(value, dict):
            raise SchemaError(f"{where} must be an object, got {_short(value)}")
        for key, item in value.items():
            check(key, spec.key, f"{where} key")
            check(item, spec.value, f"{where}[{key!r}]")
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            raise SchemaError(f"{where} must be an object, got {_short(value)}")
        for key, field in spec.items():
            if key in value:
                check(value[key], field.spec, f"{where}.{key}")
            elif field.required:
                raise SchemaError(f"{where} lacks {key!r}")
    elif spec is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(f"{where} must be an integer, got {_short(value)}")
    elif spec is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SchemaError(f"{where} must be a number, got {_short(value)}")
    elif isinstance(spec, type):
        if not isinstance(value, spec):
            raise SchemaError(f"{where} must be {_KINDS.get(spec, spec.__name__)}, got {_short(value)}")
    else:
        raise TypeError(f"not a schema spec: {spec!r}")


_KINDS = {str: "a string", bool: "true or false", dict: "an object", list: "a list"}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


MODULE_NAME = Check(str, lambda s: re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", s) is not None,
                    "a module path such as model.layers.0.mlp.down_proj")
FILE_NAME = Check(str, lambda s: re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", s) is not None and ".." not in s,
                  "a plain file name inside the directory")
COUNT = Check(int, lambda n: n >= 0, "a non-negative integer")
SIZE = Check(int, lambda n: 1 <= n <= 2**31, "a positive integer below 2^31")
SHAPE = ListOf(SIZE, length=2)
SHA256 = Check(str, lambda s: re.fullmatch(r"[0-9a-f]{64}", s) is not None, "a sha256 hex digest")
DAMAGE = Check(float, lambda x: math.isfinite(x) and x >= 0, "a finite non-negative number")

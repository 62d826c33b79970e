"""Parsing of format strings: `head[:granularity][:flag...][:key=value...]`."""

from __future__ import annotations

from ..errors import FormatError
from .granularity import Granularity
from .scales import DEFAULT_SCALE, ScaleCodec, scale_codec


def split(text: str, allowed_options: tuple[str, ...]) -> tuple[str, list[str], dict[str, str]]:
    """(head, positional fields, options) of a format string; unknown options are errors."""
    head, *fields = text.split(":")
    positional = [f for f in fields if "=" not in f]
    options: dict[str, str] = {}
    for field in fields:
        if "=" in field:
            key, _, value = field.partition("=")
            if key not in allowed_options or not value:
                allowed = ", ".join(f"{k}=..." for k in allowed_options) or "none"
                raise FormatError(f"{text!r}: unknown option {field!r}; options here: {allowed}")
            options[key] = value
    return head, positional, options


def granularity_field(text: str, positional: list[str], example: str) -> Granularity:
    if not positional:
        raise FormatError(f"{text!r} needs a granularity (tensor, ch or gN); write e.g. {example}")
    return Granularity.parse(positional[0])


def scale_option(options: dict[str, str]) -> tuple[ScaleCodec, bool]:
    """The scale codec and whether the string named it (so it prints back the same)."""
    if "scale" in options:
        return scale_codec(options["scale"]), True
    return DEFAULT_SCALE, False


def scale_suffix(scale: ScaleCodec, explicit: bool) -> str:
    return f":scale={scale.name}" if explicit or scale != DEFAULT_SCALE else ""


def int_option(text: str, options: dict[str, str], key: str) -> int | None:
    if key not in options:
        return None
    try:
        return int(options[key])
    except ValueError:
        raise FormatError(f"{text!r}: {key} must be an integer, got {options[key]!r}") from None

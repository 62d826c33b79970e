"""Errors a user can cause and fix.

Every such error is a `MixbitsError` whose message is one line that says what
to do. The CLI prints it without a traceback and exits with status 2.
"""


class MixbitsError(Exception):
    """Base class of all user-facing errors."""


class FormatError(MixbitsError):
    """A format string or format parameter is invalid."""


class ModelLoadError(MixbitsError):
    """A model source cannot be found, read or understood."""


class TextError(MixbitsError):
    """Text is missing, unreadable, or too short for the requested windows."""


class TransformError(MixbitsError):
    """A rotation or other transform was asked for with an invalid size or input."""


class ExportError(MixbitsError):
    """A checkpoint cannot be written in the asked format, or for the asked runtime."""


def first_line(error: BaseException) -> str:
    """The first line of a third-party error's message (many span several), for a one-line MixbitsError."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

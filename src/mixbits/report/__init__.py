"""Human-readable output: tables now, plots and HTML later."""

from .table import format_table

__all__ = ["format_table"]

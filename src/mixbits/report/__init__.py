"""Human-readable output: tables, and a sweep's plot and HTML page (`report.sweep`)."""

from .table import format_table

__all__ = ["format_table"]

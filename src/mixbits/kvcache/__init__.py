"""KV-cache quantization: options for keys and values (`options`), the model's forward reading its cache as they
would store it (`fake`), each option's measured damage per block (`damage`), and per-block plans to a budget
(`plan`)."""

from .options import KVQuant, parse_kv

__all__ = ["KVQuant", "parse_kv"]

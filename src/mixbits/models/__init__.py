"""Model sources and model structure."""

from .loaded import LoadedModel
from .loader import DEFAULT_MODEL_NAME, load_model
from .structure import quantizable_linears

__all__ = ["DEFAULT_MODEL_NAME", "LoadedModel", "load_model", "quantizable_linears"]

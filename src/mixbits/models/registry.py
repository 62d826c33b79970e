"""Which adapter serves a model: the family adapters by the Hugging Face `model_type`s they declare, else the
generic one. Adding a family is a module under models/ and one entry in FAMILIES."""

from __future__ import annotations

from torch import nn

from ..errors import TransformError
from .adapter import Adapter, Layout
from .gemma import GEMMA
from .llama import LLAMA
from .moe import MOE
from .phi3 import PHI3

FAMILIES = (LLAMA, PHI3, GEMMA, MOE)
ADAPTERS: dict[str, Adapter] = {name: adapter for adapter in FAMILIES for name in adapter.model_types}


class GenericAdapter(Adapter):
    """The fallback for a model no family serves: nothing beyond the structure every model has."""

    def prepare(self, model: nn.Module) -> None:
        """transformers' Conv1D layers (GPT-2's: y = x W + b, W [in, out]) become nn.Linears of W^T, the same
        function, so they quantize, save and load like any Linear."""
        from transformers.pytorch_utils import Conv1D

        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Conv1D):
                    rows, cols = child.weight.shape[1], child.weight.shape[0]
                    linear = nn.Linear(cols, rows, bias=child.bias is not None, dtype=child.weight.dtype)
                    linear.weight = nn.Parameter(child.weight.detach().T.contiguous(), child.weight.requires_grad)
                    if child.bias is not None:
                        linear.bias = child.bias
                    setattr(parent, name, linear)

    def layout(self, model: nn.Module, purpose: str) -> Layout:
        raise TransformError(f"{purpose} needs an architecture adapter; {model_type(model) or type(model).__name__} "
                             f"has none (supported: {', '.join(supported_types())}); run without it")


GENERIC = GenericAdapter()


def model_type(model) -> str | None:
    """`config.model_type` of a model, or `model_type` of a config."""
    return getattr(getattr(model, "config", model), "model_type", None)


def adapter_for(model) -> Adapter:
    """The adapter for the model's (or config's) `model_type`, else the generic one."""
    return ADAPTERS.get(model_type(model), GENERIC)


def supported_types() -> list[str]:
    return sorted(ADAPTERS)


def exportable_types() -> list[str]:
    """Model types GGUF export writes."""
    return sorted({t for adapter in ADAPTERS.values() for t in adapter.gguf_architectures})

"""Which modules of a model get quantized.

The transformer blocks are the largest `nn.ModuleList` of non-Linear modules
holding Linears; every `nn.Linear` inside them is quantizable. Embeddings and the output head stay
outside unless asked for.
"""

from __future__ import annotations

from torch import nn

from ..errors import MixbitsError


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and module of the model's repeated blocks.

    The largest list of modules that are not themselves Linears but hold some: a list of bare Linears (one per
    expert of a mixture-of-experts block) can be longer than the list of blocks, and is not it.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(isinstance(block, nn.Linear) for block in module) and any(
            isinstance(m, nn.Linear) for block in module for m in block.modules()
        ):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise MixbitsError("found no list of blocks containing nn.Linear layers in this model; nothing to quantize")
    return best


def quantizable_linears(model: nn.Module, include_head: bool = False) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every Linear to quantize, in forward order of blocks."""
    prefix, blocks = transformer_blocks(model)
    found = [
        (f"{prefix}.{name}", module)
        for name, module in blocks.named_modules()
        if isinstance(module, nn.Linear)
    ]
    if include_head:
        head = output_head(model)
        if head is None:
            raise MixbitsError("this model has no Linear output head to quantize; drop the head option")
        found.append(head)
    return found


def output_head(model: nn.Module) -> tuple[str, nn.Linear] | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    if not isinstance(head, nn.Linear):
        return None
    name = next(n for n, m in model.named_modules() if m is head)
    return name, head


def outer_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers outside the blocks a whole-model budget can quantize: the input embedding (an nn.Embedding),
    and an output head that has its own weight (a head tied to the embedding computes with the embedding's)."""
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embed, nn.Embedding):
        found.append((names[id(embed)], embed))
    head = output_head(model)
    if head is not None and (embed is None or head[1].weight is not embed.weight):
        found.append(head)
    return found


def untie_head(model: nn.Module) -> None:
    """Give the output head its own weight if it shares it with the input embedding."""
    found = output_head(model)
    if found is None:
        return
    _, head = found
    embed = model.get_input_embeddings()
    if embed is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        if hasattr(model, "config"):
            model.config.tie_word_embeddings = False

"""Calibration statistics for measuring damage: each Linear's input Hessian and the Fisher diagonal of its output.

One pass over the calibration windows records, for every Linear in the
blocks, its input Hessian H = X^T X / tokens and, from a backward pass on
the first `fisher_windows` windows, the diagonal Fisher of its output: F_r, the
mean squared gradient of the next-token loss with respect to output channel r.
Linears that read the same input tensor (q/k/v, gate/up) form a tie group:
they will be fused, so they share one option. For the input embedding, each
row's output Fisher per channel and how often the calibration looks it up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from .calibrate import _Accumulator
from .models.structure import output_head, quantizable_linears


@dataclass
class LayerStats:
    hessian: torch.Tensor  # [C, C] input X^T X / tokens
    fisher: torch.Tensor  # [R] mean squared loss gradient per output channel
    tokens: int


@dataclass
class EmbeddingStats:
    fisher: torch.Tensor  # [V, D] mean squared loss gradient of each row's output, per token
    frequency: torch.Tensor  # [V] share of the calibration tokens that look the row up
    scale: float  # the factor the model's embedding applies to the rows (Gemma: sqrt(hidden))


def layer_statistics(
    model: nn.Module, windows: torch.Tensor, fisher_windows: int, progress: bool = True, outer: bool = False
) -> tuple[dict[str, LayerStats | EmbeddingStats], list[list[str]]]:
    """H and the output Fisher diagonal of every Linear in the blocks, and the tie groups (shared inputs).

    With `outer`, also those of the output head (tied to the embedding or not) and, for an nn.Embedding input,
    each row's output Fisher and how often the calibration looks it up (`EmbeddingStats`)."""
    linears = quantizable_linears(model)
    head = output_head(model) if outer else None
    if head is not None:
        linears = linears + [head]
    names = {linear: name for name, linear in linears}
    accumulators: dict[str, _Accumulator] = {}
    fisher: dict[str, torch.Tensor] = {}
    seen: list[tuple[torch.Tensor, _Accumulator, list[str]]] = []  # inputs of the current window
    groups: list[list[str]] = []

    def record(module, args, output):
        name, x = names[module], args[0]
        shared = next((entry for entry in seen if entry[0] is x), None)
        if shared is None:
            shared = (x, accumulators.setdefault(name, _Accumulator()), [])
            shared[1].add(x)
            seen.append(shared)
        accumulators[name] = shared[1]
        shared[2].append(name)
        if output.requires_grad:
            def gradient(grad):
                squared = grad.detach().float().square().reshape(-1, grad.shape[-1]).sum(0)
                fisher[name] = fisher[name] + squared if name in fisher else squared
            output.register_hook(gradient)

    embed = model.get_input_embeddings()
    rows = embed.weight.shape if outer and isinstance(embed, nn.Embedding) else None
    row_fisher = torch.zeros(rows) if rows is not None else None

    def embedding_output(module, args, output):
        output.requires_grad_(torch.is_grad_enabled())
        if row_fisher is not None and output.requires_grad:
            ids = args[0].reshape(-1)

            def gradient(grad):
                row_fisher.index_add_(0, ids, grad.detach().float().square().reshape(-1, grad.shape[-1]))
            output.register_hook(gradient)

    handles = [linear.register_forward_hook(record) for linear in names]
    handles.append(embed.register_forward_hook(embedding_output))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    fisher_tokens = 0
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)  # gradients of activations only
        for index, window in enumerate(tqdm(windows, desc="statistics", disable=not progress, leave=False)):
            seen.clear()
            backward = index < fisher_windows
            with torch.set_grad_enabled(backward):
                logits = model(window[None], use_cache=False).logits[0, :-1].float()
                if backward:
                    nn.functional.cross_entropy(logits, window[1:], reduction="sum").backward()
                    fisher_tokens += window.numel()
            if index == 0:
                groups = [entry[2] for entry in seen if head is None or entry[2] != [head[0]]]
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
    shared_stats = {id(acc): acc.stats() for acc in accumulators.values()}  # once per input, not per reader
    stats = {}
    for name, _ in linears:
        input_stats = shared_stats[id(accumulators[name])]
        stats[name] = LayerStats(input_stats.hessian, fisher[name] / fisher_tokens, input_stats.tokens)
    if row_fisher is not None:
        embed_name = next(n for n, m in model.named_modules() if m is embed)
        frequency = torch.bincount(windows.reshape(-1), minlength=rows[0]).float() / windows.numel()
        stats[embed_name] = EmbeddingStats(row_fisher / fisher_tokens, frequency,
                                                 float(getattr(embed, "embed_scale", 1.0)))
    return stats, groups

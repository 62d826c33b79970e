"""Solvers choose the codes of a weight matrix under a format."""

import torch

from ..formats import Format, QuantizedTensor
from ..formats.granularity import to_groups
from .gptq import GptqSettings, asymmetric_target, gptq, gptq_options
from .rtn import round_to_nearest


def solve(matrix: torch.Tensor, fmt: Format | None, solver: str, hessian: torch.Tensor | None = None,
          clip_search: bool = True, settings: GptqSettings = GptqSettings(),
          cross: torch.Tensor | None = None, keep_source: bool = False) -> QuantizedTensor | None:
    """`matrix` quantized to `fmt` by `solver` ("rtn", "gptq" or "gptaq"); None when `fmt` is None (kept in 16 bits).

    With a `hessian`, RTN's clip search minimises the output error; GPTQ needs one. GPTAQ is GPTQ from
    `asymmetric_target` given the input's `cross` term (`calibrate.InputStats.cross`); without one (inputs as the
    float model's, or an expert's routed tokens, which do not pair up with the float model's) it is GPTQ.
    With `keep_source`, the result holds the values its codes were rounded from (`QuantizedTensor.source`).
    """
    if fmt is None:
        return None
    if solver in ("gptq", "gptaq"):
        if hessian is None:
            raise ValueError(f"{solver} needs the input Hessian of the layer")
        if solver == "gptaq" and cross is not None:
            matrix = asymmetric_target(matrix, hessian, cross, settings)
        return gptq(matrix, hessian, fmt, clip_search=clip_search, settings=settings, keep_source=keep_source)
    rounded = round_to_nearest(matrix, fmt, clip_search, hessian=hessian)
    if keep_source:
        rounded.source = to_groups(matrix.detach().float(), fmt.granularity).values
    return rounded


def approximation(matrix: torch.Tensor, quantized: QuantizedTensor | None) -> torch.Tensor:
    """The weights the model computes with: dequantized, or for a layer kept in 16 bits, rounded to float16."""
    return matrix.detach().half().float() if quantized is None else quantized.dequantize()


def stackable(fmt: Format | None) -> bool:
    """Whether rows of several matrices can be solved as one: nothing is shared across rows.

    GPTQ and RTN treat each row on its own given the input Hessian, so layers
    reading the same input (q/k/v, gate/up) can be solved in one call, which
    pays the per-column overhead once. Formats with a per-tensor scale, a
    second-level scale or a codebook shared across rows cannot.
    """
    return fmt is None or (fmt.granularity.kind != "tensor" and not fmt.has_second_level
                           and not fmt.shared_across_rows)


def solve_many(matrices: list[torch.Tensor], fmt: Format | None, solver: str, hessian: torch.Tensor | None = None,
               clip_search: bool = True, settings: GptqSettings = GptqSettings(),
               cross: torch.Tensor | None = None, keep_source: bool = False) -> list[QuantizedTensor | None]:
    """`solve` for matrices that share one input (and so one Hessian): stacked into one call where possible."""
    if len(matrices) == 1 or not stackable(fmt):
        return [solve(m, fmt, solver, hessian, clip_search, settings, cross, keep_source) for m in matrices]
    stacked = solve(torch.cat([m.detach() for m in matrices]), fmt, solver, hessian, clip_search, settings, cross,
                    keep_source)
    if stacked is None:
        return [None] * len(matrices)
    return stacked.split_rows([m.shape[0] for m in matrices])


# Weights GPTQ stacks in one pass of `solve_options` (float32; the pass holds them twice: 2 GB).
BATCH_ELEMENTS = 2**28


def solve_options(matrices: list[torch.Tensor], formats: list[Format | None], solver: str,
                  hessian: torch.Tensor | None = None, clip_search: bool = True,
                  settings: GptqSettings = GptqSettings()) -> list[list[QuantizedTensor | None]]:
    """`solve_many` under each of `formats`: with GPTQ, the formats whose rows stack are solved in one pass
    (`gptq_options`), which shares the Hessian's factorisation and each column's error feedback among them. Without
    a cross term (the measurement's inputs are the float model's), GPTAQ is GPTQ."""
    batched = [k for k, fmt in enumerate(formats) if solver in ("gptq", "gptaq") and fmt is not None and stackable(fmt)]
    results: list[list[QuantizedTensor | None] | None] = [None] * len(formats)
    if len(batched) > 1:
        if hessian is None:
            raise ValueError("gptq needs the input Hessian of the layer")
        stacked = torch.cat([m.detach() for m in matrices])
        per_pass = max(1, BATCH_ELEMENTS // stacked.numel())  # a 7B MLP's 11 copies would take 8 GB
        solved = [quantized for i in range(0, len(batched), per_pass)
                  for quantized in gptq_options(stacked, hessian, [formats[k] for k in batched[i:i + per_pass]],
                                                clip_search=clip_search, settings=settings)]
        for k, quantized in zip(batched, solved):
            results[k] = quantized.split_rows([m.shape[0] for m in matrices]) if len(matrices) > 1 else [quantized]
    return [found if found is not None else solve_many(matrices, fmt, solver, hessian, clip_search, settings)
            for found, fmt in zip(results, formats)]


__all__ = ["GptqSettings", "approximation", "asymmetric_target", "gptq", "gptq_options", "round_to_nearest", "solve", "solve_many", "solve_options", "stackable"]

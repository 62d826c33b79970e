"""How much an option hurts a group of tied layers: a Fisher-weighted proxy and a measured KL.

Proxy. Replacing W by Q changes a layer's output by dy = (W - Q) x; to second
order the loss grows by 1/2 dy^T F dy per token. Keeping F's diagonal,
    proxy = 1/2 * sum_r F_r * [(W - Q) H (W - Q)^T]_rr     (nats per token),
which, unlike the plain output error tr((W-Q) H (W-Q)^T) (also recorded),
weighs each layer by how much the rest of the network amplifies its error.
The input embedding's proxy is 1/2 sum over rows of F_row * dE^2 (the Fisher
of its output per row and channel) plus, when the output head computes with
the same rows, the head's proxy.

Measured. The group alone is quantized with the option in the float model and
KL(float || changed) of the next-token distribution is measured on a few
calibration windows. Float inputs of every block are cached, so a group in
block i reruns only blocks i..end and the head (the embedding's KL reruns
every block, an untied head's only the head), and each layer is quantized
once per option for both damages (`GroupMeter`). Keeping a group in 16 bits
is not measured: its KL is below what the windows resolve, and its proxy is
recorded as its KL.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .calibrate import block_inputs, run_block
from .layer_stats import EmbeddingStats, LayerStats
from .menu import Choice
from .models.registry import adapter_for
from .models.structure import outer_layers, output_head, quantizable_linears, transformer_blocks
from .plan import KEEP
from .sensitivity import GroupSensitivity, OptionDamage, group_name
from .solvers import GptqSettings, approximation, solve_options


def embedding_damage(weight: torch.Tensor, approx: torch.Tensor, stats: EmbeddingStats) -> tuple[float, float]:
    """(proxy, output error) of rows `weight` -> `approx` on the embedding's output: 1/2 sum F dE^2, and the mean
    squared change of the looked-up row per token. A head computing with the same rows adds its own terms."""
    delta = (weight.detach().float() - approx.float()).square() * stats.scale ** 2
    return 0.5 * float((stats.fisher * delta).sum()), float((stats.frequency * delta.sum(1)).sum())


def proxy_damage(weight: torch.Tensor, approx: torch.Tensor, stats: LayerStats) -> tuple[float, float]:
    """(Fisher-weighted proxy in nats per token, plain output error tr(dW H dW^T)) of `weight` -> `approx`."""
    delta = weight.detach().float() - approx.float()
    per_row = ((delta @ stats.hessian) * delta).sum(1)
    return 0.5 * float((stats.fisher * per_row).sum()), float(per_row.sum())


class KLMeter:
    """KL(float || model) per token on a few windows when only the layers of one block changed.

    The float model's block inputs, logits and next-token probabilities are
    computed once; `measure(i)` reruns blocks i..end and the head with the
    current weights.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor):
        _, self.blocks = transformer_blocks(model)
        self.model, self.adapter, self.windows = model, adapter_for(model), windows
        with torch.no_grad():
            first, self.calls = block_inputs(model, windows)
            self.inputs = [first]
            for block, call in zip(self.blocks, self.calls):
                self.inputs.append(run_block(block, self.inputs[-1], call))
            self.final = self.inputs.pop()
            self.reference = self._logits(self.final)
            self.probs = torch.softmax(self.reference.double(), dim=-1)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter.logits(self.model, hidden).float()

    @torch.no_grad()
    def measure(self, block_index: int) -> float:
        """When only layers of block `block_index` changed; -1: the input embedding (and a head tied to it);
        the number of blocks: only the output head."""
        if block_index < 0:
            hidden, block_index = block_inputs(self.model, self.windows)[0], 0
        elif block_index == len(self.blocks):
            return self._kl(self.final)
        else:
            hidden = self.inputs[block_index]
        for block, call in zip(self.blocks[block_index:], self.calls[block_index:]):
            hidden = run_block(block, hidden, call)
        return self._kl(hidden)

    def _kl(self, hidden: torch.Tensor) -> float:
        # With d = logits - reference logits, KL(p || q) = log sum_v p_v e^(d_v) - sum_v p_v d_v. The logits
        # are ~30 and a group's KL can be 1e-5 nats: a float32 log-softmax is off by ~1e-3 here, so the sums
        # over the vocabulary run in float64.
        d = (self._logits(hidden) - self.reference).double()
        shift = d.amax(dim=-1, keepdim=True)
        kl = ((self.probs * (d - shift).exp()).sum(-1).log() + shift.squeeze(-1)) - (self.probs * d).sum(-1)
        return max(float(kl.mean()), 0.0)  # a KL is never negative; rounding can make it -1e-12


def group_stats(stats: dict, layers: list[str], head) -> dict:
    """The statistics measuring a group takes: its layers', and the head's for an embedding the head is tied to."""
    found = {name: stats[name] for name in layers}
    if head is not None and head[0] in stats and any(isinstance(found[name], EmbeddingStats) for name in layers):
        found[head[0]] = stats[head[0]]
    return found


# Codes of solutions a GroupMeter keeps for a later round of KL measurements (about 1 GB, one byte each).
KEPT_CODES = 2**30


class GroupMeter:
    """The options of one group at a time measured on the float model: its layers quantized under each option (from
    the statistics), their proxy, and the KL with only them changed (then put back). `seconds` sums the time spent
    quantizing and measuring the KL.

    The solutions of options whose KL was not measured are kept (up to KEPT_CODES codes), so a later round that
    measures it (`selective`) does not solve them again."""

    def __init__(self, model: nn.Module, kl_windows: torch.Tensor | None, clip_search: bool, gptq: GptqSettings,
                 outer: bool):
        self.modules = dict(quantizable_linears(model) + (outer_layers(model) if outer else []))
        self.head = output_head(model)
        self.clip_search, self.gptq = clip_search, gptq
        self.seconds = {"quantize": 0.0, "kl": 0.0}
        self.kept: dict[tuple[str, Choice], list] = {}  # (group, choice) -> its layers' QuantizedTensors
        self.kept_codes = 0
        timer = time.perf_counter()
        self.meter = KLMeter(model, kl_windows) if kl_windows is not None else None
        self.seconds["kl"] += time.perf_counter() - timer

    def _damages(self, name: str, weight: torch.Tensor, approx: torch.Tensor, stats: dict) -> tuple[float, float]:
        found = stats[name]
        if not isinstance(found, EmbeddingStats):
            return proxy_damage(weight, approx, found)
        proxy, error = embedding_damage(weight, approx, found)
        if self.head is not None and self.head[1].weight is self.modules[name].weight:  # the tied head computes with these rows
            head_proxy, head_error = proxy_damage(weight, approx, stats[self.head[0]])
            proxy, error = proxy + head_proxy, error + head_error
        return proxy, error

    @torch.no_grad()
    def measure(self, layers: list[str], block: int, choices: list[Choice], stats: dict,
                kl_for: "set[Choice] | None" = None) -> GroupSensitivity:
        """The group's damage under each of `choices`; the KL only of those in `kl_for` (None: all), None for the
        others."""
        shapes = [tuple(self.modules[name].weight.shape) for name in layers]
        group = GroupSensitivity(group_name(layers), layers, shapes, block, [])
        originals = [self.modules[name].weight.detach().clone() for name in layers]
        hessian = stats[layers[0]].hessian if isinstance(stats[layers[0]], LayerStats) else None
        solutions, solve_seconds, by_solver = {}, {}, {}
        for k, choice in enumerate(choices):
            if (group.name, choice) in self.kept:
                solutions[k], solve_seconds[k] = self._take(group.name, choice), 0.0
            else:
                by_solver.setdefault(choice.solver, []).append(k)
        for solver, indices in by_solver.items():
            # The layers of a group read one input, so they share one Hessian and are solved together, and with
            # GPTQ all the options at once; each option is charged its share of the time.
            start = time.perf_counter()
            found = solve_options(originals, [choices[k].format for k in indices], solver, hessian, self.clip_search,
                                  self.gptq)
            for k, solved in zip(indices, found):
                solutions[k], solve_seconds[k] = solved, (time.perf_counter() - start) / len(indices)
        for k, choice in enumerate(choices):
            start = time.perf_counter() - solve_seconds[k]
            proxy = output_error = 0.0
            solved = solutions.pop(k)
            approximations = [approximation(w, q) for w, q in zip(originals, solved)]
            for name, weight, approx in zip(layers, originals, approximations):
                layer_proxy, layer_error = self._damages(name, weight, approx, stats)
                proxy, output_error = proxy + layer_proxy, output_error + layer_error
            self.seconds["quantize"] += time.perf_counter() - start
            measured = None
            if self.meter is not None and choice.option == KEEP:
                # float32 weights rounded to float16 moved the KL by 6e-9 nats in the median group of the default
                # model (7e-8 at most): the second-order estimate stands in, and the blocks after are not rerun
                measured = proxy
            elif self.meter is not None and kl_for is not None and choice not in kl_for:
                self._keep(group.name, choice, solved)
            elif self.meter is not None:
                timer = time.perf_counter()
                for name, approx in zip(layers, approximations):
                    self.modules[name].weight.copy_(approx)
                measured = self.meter.measure(block)
                for name, weight in zip(layers, originals):
                    self.modules[name].weight.copy_(weight)
                self.seconds["kl"] += time.perf_counter() - timer
            group.options.append(OptionDamage(choice.option, choice.solver, group.bits(choice), proxy, output_error,
                                              measured, time.perf_counter() - start))
        return group

    def _keep(self, group: str, choice: Choice, solved: list) -> None:
        codes = _codes(solved)
        if self.kept_codes + codes <= KEPT_CODES:
            self.kept[group, choice] = solved
            self.kept_codes += codes

    def _take(self, group: str, choice: Choice) -> list:
        solved = self.kept.pop((group, choice))
        self.kept_codes -= _codes(solved)
        return solved


def _codes(solved: list) -> int:
    return sum(q.codes.numel() for q in solved if q is not None)

"""How much each option hurts each group of tied layers: a Fisher-weighted proxy and a measured KL.

Statistics. One pass over the calibration windows records, for every Linear in
the blocks, its input Hessian H = X^T X / tokens and, from a backward pass on
the first `fisher_windows` windows, the diagonal Fisher of its output: F_r, the
mean squared gradient of the next-token loss with respect to output channel r.
Linears that read the same input tensor (q/k/v, gate/up) form a tie group:
they will be fused, so they share one option.

Proxy. Replacing W by Q changes a layer's output by dy = (W - Q) x; to second
order the loss grows by 1/2 dy^T F dy per token. Keeping F's diagonal,
    proxy = 1/2 * sum_r F_r * [(W - Q) H (W - Q)^T]_rr     (nats per token),
which, unlike the plain output error tr((W-Q) H (W-Q)^T) (also recorded),
weighs each layer by how much the rest of the network amplifies its error.

Measured. The group alone is quantized with the option in the float model and
KL(float || changed) of the next-token distribution is measured on a few
calibration windows. Float inputs of every block are cached, so a group in
block i reruns only blocks i..end and the head, and each layer is quantized
once per option for both damages.

Embedding and head. For budgets over the whole model, the input embedding is
a group too (block -1), under the options it can look up row by row, rounded
to nearest: its proxy is 1/2 sum over rows of F_row * dE^2 (the Fisher of its
output per row and channel) plus, when the output head computes with the same
rows, the head's proxy; its KL reruns every block. An untied head is a group
after the last block (its KL reruns only the head).

The options are quantized from the float model's statistics, each group on its
own; `quantize` later solves them block-sequentially, so a plan's realised
damage differs somewhat from the sum of the measured ones.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from . import defaults
from .calibrate import _Accumulator, block_inputs, calibration_data, run_block
from .defaults import SOLVERS
from .errors import MixbitsError
from .files import write_json
from .hashing import sha256_state_dict, sha256_tensor
from .menu import Choice, Pin, allowed, check_pins_match, embedding_choices, group_choices, parse_menu
from .models.loaded import LoadedModel
from .models.registry import adapter_for
from .models.structure import outer_layers, output_head, quantizable_linears, transformer_blocks
from .plan import option_bits
from .resume import RunState
from .schema import (COUNT, DAMAGE, MODULE_NAME, SHAPE, SIZE, Check, Field, ListOf, MapOf, Nullable, SchemaError,
                     check, optional, read_json)
from .solvers import GptqSettings, approximation, solve_many

if TYPE_CHECKING:
    from .distributed import Cluster

SENSITIVITY_VERSION = 1
DAMAGES = ("kl", "proxy")


class SensitivityError(MixbitsError):
    """A sensitivity file is missing, malformed, or made for another model or menu."""


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


@dataclass
class OptionDamage:
    option: str
    solver: str
    bits: int
    proxy: float
    output_error: float
    kl: float | None
    seconds: float

    @property
    def choice(self) -> Choice:
        return Choice(self.option, self.solver)


@dataclass
class GroupSensitivity:
    name: str
    layers: list[str]
    shapes: list[tuple[int, int]]
    block: int
    options: list[OptionDamage]

    @property
    def weights(self) -> int:
        return sum(rows * cols for rows, cols in self.shapes)

    def bits(self, choice: Choice) -> int:
        return sum(option_bits(choice.option, rows, cols) for rows, cols in self.shapes)

    @property
    def embedding(self) -> bool:
        """The input embedding's group (measured at block -1; the output head's is at the block count)."""
        return self.block < 0

    def applicable(self, choice: Choice) -> Choice | None:
        """The choice as this group takes it (an embedding rounds to nearest), None if it cannot take it."""
        if not self.embedding:
            return choice
        mapped = embedding_choices([choice])
        return mapped[0] if mapped else None

    def find(self, choice: Choice) -> OptionDamage | None:
        choice = self.applicable(choice)
        return next((o for o in self.options if o.choice == choice), None)


@dataclass
class Sensitivity:
    """Damage of every (group, option), with what it was measured on."""

    groups: list[GroupSensitivity]
    model: dict = field(default_factory=dict)  # name, sha256
    calibration: dict = field(default_factory=dict)  # text, windows, length, fisher_windows
    kl_windows: dict | None = None  # count and length of the KL windows; None if only the proxy was measured
    other_parameters: int = 0  # parameters outside the block layers (embedding, head, norms, biases)
    seconds: dict = field(default_factory=dict)
    outer: list[GroupSensitivity] = field(default_factory=list)  # the embedding and an untied head, if measured

    @property
    def weights(self) -> int:
        return sum(group.weights for group in self.groups)

    @property
    def damages(self) -> tuple[str, ...]:
        return DAMAGES if self.kl_windows else ("proxy",)

    def check(self, model: LoadedModel | None, menu: list[Choice], target: str | None = None,
              calibration: tuple[str, int, int] | None = None, gptq: GptqSettings | None = None,
              clip_search: bool | None = None) -> None:
        """Refuse a sensitivity measured on another model, without every option of `menu` (that `target` allows),
        or, where given, on other calibration windows ((text name, count, length)), with other GPTQ settings or
        another clip search setting."""
        if model is not None and self.model.get("sha256") not in (None, model.sha256):
            raise SensitivityError(f"the sensitivity file was measured on another model ({self.model.get('name')}, "
                                   f"sha256 {self.model['sha256'][:12]}); measure this one")
        if model is not None:
            self.check_model(model)
        c = self.calibration
        if calibration is not None and (c.get("text"), c.get("count"), c.get("length")) != tuple(calibration):
            raise SensitivityError(f"the sensitivity file was measured on {c.get('count')} x {c.get('length')} tokens "
                                   f"of {c.get('text')}, not {calibration[1]} x {calibration[2]} of {calibration[0]}; "
                                   "measure again")
        if gptq is not None and c.get("gptq") != gptq.as_dict():
            raise SensitivityError(f"the sensitivity file was measured with GPTQ settings {c.get('gptq')}; pass the "
                                   "same --damp/--shrink or measure again")
        if clip_search is not None and c.get("clip_search") != clip_search:
            raise SensitivityError("the sensitivity file was measured " + ("with" if c.get("clip_search") else "without")
                                   + " the clip search; pass the same --no-clip-search or measure again")
        missing = self.missing(menu, target)
        if missing:
            raise SensitivityError(f"the sensitivity file has no measurement of {missing[0]}; "
                                   "measure again with this option list")

    def missing(self, menu: list[Choice], target: str | None = None) -> list[Choice]:
        """The options of `menu` (that `target` allows) some group was not measured under."""
        return [choice for choice in menu
                if any(group.applicable(choice) is not None and group.find(choice) is None
                       and all(allowed(choice, tuple(s), target) for s in group.shapes)
                       for group in self.groups + self.outer)]

    def extended(self, other: "Sensitivity") -> "Sensitivity":
        """These measurements plus `other`'s options (measured alike on the same groups) that these lack."""
        if other.groups and [g.name for g in other.groups] != [g.name for g in self.groups]:
            raise SensitivityError("the new measurements group the layers differently (--no-ties?); measure again")
        if (other.model, other.calibration, other.kl_windows) != (self.model, self.calibration, self.kl_windows):
            raise SensitivityError("the new measurements were taken on another model, calibration or KL windows; "
                                   "measure again")
        def merged(mine: GroupSensitivity, new: GroupSensitivity) -> GroupSensitivity:
            return GroupSensitivity(mine.name, mine.layers, mine.shapes, mine.block,
                                    mine.options + [o for o in new.options if mine.find(o.choice) is None])

        groups = [merged(g, new) for g, new in zip(self.groups, other.groups)] if other.groups else self.groups
        theirs = {g.name: g for g in other.outer}
        outer = [merged(g, theirs.pop(g.name)) if g.name in theirs else g for g in self.outer] + list(theirs.values())
        seconds = {key: self.seconds.get(key, 0.0) + other.seconds.get(key, 0.0)
                   for key in {*self.seconds, *other.seconds}}
        return Sensitivity(groups, self.model, self.calibration, self.kl_windows, self.other_parameters, seconds, outer)

    def rank_correlation(self) -> dict[str, float | None]:
        """Spearman correlation of each proxy with the measured KL: over all (group, option) pairs,
        and the mean over groups of the correlation across their options (how well a proxy orders choices)."""
        if not self.kl_windows:
            return {}
        from scipy.stats import spearmanr

        result: dict[str, float | None] = {}
        for proxy in ("proxy", "output_error"):
            pairs = [(getattr(o, proxy), o.kl) for g in self.groups for o in g.options]
            result[f"{proxy}_all"] = float(spearmanr(*zip(*pairs)).statistic) if len(pairs) > 2 else None
            within = [spearmanr([getattr(o, proxy) for o in g.options], [o.kl for o in g.options]).statistic
                      for g in self.groups if len(g.options) > 2]
            within = [r for r in within if not math.isnan(r)]
            result[f"{proxy}_within_groups"] = float(sum(within) / len(within)) if within else None
        return result

    def as_dict(self) -> dict:
        return {
            "mixbits_sensitivity": SENSITIVITY_VERSION,
            "model": self.model,
            "calibration": self.calibration,
            "kl_windows": self.kl_windows,
            "other_parameters": self.other_parameters,
            "seconds": self.seconds,
            "rank_correlation": self.rank_correlation(),
            "groups": [_group_dict(g) for g in self.groups],
            "outer": [_group_dict(g) for g in self.outer],
        }

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically (temporary file, then rename)."""
        write_json(path, self.as_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Sensitivity":
        """The sensitivity in `path`, checked against SENSITIVITY_SCHEMA and for consistency (`validate`)."""
        path = Path(path)
        data = read_json(path, SensitivityError,
                         f"sensitivity file {path} does not exist; measure with `mixbits plan --sensitivity FILE`",
                         f"cannot read sensitivity file {path}: {{error}}")
        if not isinstance(data, dict) or data.get("mixbits_sensitivity") != SENSITIVITY_VERSION:
            raise SensitivityError(f"{path} is not a version-{SENSITIVITY_VERSION} mixbits sensitivity file; measure again")
        try:
            check(data, SENSITIVITY_SCHEMA, path.name)
        except SchemaError as error:
            raise SensitivityError(f"{error}; measure again") from None
        calibration = {"clip_search": True, **(data.get("calibration") or {})}  # files before it was recorded used it
        found = cls([_group_from_dict(g) for g in data["groups"]], data.get("model") or {}, calibration,
                    data.get("kl_windows"), data.get("other_parameters", 0), data.get("seconds") or {},
                    [_group_from_dict(g) for g in data.get("outer") or []])
        found.validate(path)
        return found

    def validate(self, path: Path | str) -> None:
        """Refuse measurements that contradict themselves: a group's layers and shapes of different lengths, a
        layer in two groups, options unknown, measured twice or with bits that are not the option's, or a KL
        missing where KL windows are recorded."""
        seen: set[str] = set()
        for group in self.groups + self.outer:
            where = f"{path}: group {group.name}"
            if not group.layers or len(group.layers) != len(group.shapes):
                raise SensitivityError(f"{where} lists {len(group.layers)} layers and {len(group.shapes)} shapes; "
                                       "measure again")
            if seen & set(group.layers) or len(set(group.layers)) != len(group.layers):
                raise SensitivityError(f"{where} holds a layer another group (or it) already holds; measure again")
            seen |= set(group.layers)
            if not group.options:
                raise SensitivityError(f"{where} has no measured options; measure again")
            choices = set()
            for option in group.options:
                if option.solver not in SOLVERS:
                    raise SensitivityError(f"{where}: unknown solver {option.solver!r}; measure again")
                try:
                    bits = group.bits(option.choice)
                except MixbitsError as error:
                    raise SensitivityError(f"{where}: {error}; measure again") from None
                if bits != option.bits:
                    raise SensitivityError(f"{where}: {option.option} is {bits} bits, the file says {option.bits}; "
                                           "measure again")
                if option.choice in choices:
                    raise SensitivityError(f"{where} measures {option.choice} twice; measure again")
                choices.add(option.choice)
                if self.kl_windows and option.kl is None:
                    raise SensitivityError(f"{where}: {option.choice} has no KL, though KL windows are recorded; "
                                           "measure again")

    def check_model(self, model: LoadedModel) -> None:
        """Refuse measurements of layers `model` does not have, or has in other shapes."""
        modules = dict(model.model.named_modules())
        for group in self.groups + self.outer:
            for name, shape in zip(group.layers, group.shapes):
                weight = getattr(modules.get(name), "weight", None)
                if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(shape):
                    raise SensitivityError(f"the sensitivity file measures {name} as {shape[0]}x{shape[1]}, which "
                                           "this model does not have; measure this model")


_OPTION_SCHEMA = {"option": Field(str), "solver": Field(str), "bits": Field(COUNT), "proxy": Field(DAMAGE),
                  "output_error": Field(DAMAGE), "kl": Field(Nullable(DAMAGE)), "seconds": Field(DAMAGE)}
_GROUP_SCHEMA = {"name": Field(str), "layers": Field(ListOf(MODULE_NAME)), "shapes": Field(ListOf(SHAPE)),
                 "block": Field(Check(int, lambda n: n >= -1, "-1 (the embedding) or a block index")),
                 "options": Field(ListOf(_OPTION_SCHEMA))}
SENSITIVITY_SCHEMA = {
    "mixbits_sensitivity": Field(int),
    "model": optional(Nullable({"name": optional(Nullable(str)), "sha256": optional(Nullable(str))})),
    "calibration": optional(Nullable(dict)),
    "kl_windows": optional(Nullable({"count": Field(SIZE), "length": Field(SIZE)})),
    "other_parameters": optional(COUNT),
    "seconds": optional(Nullable(MapOf(str, DAMAGE))),
    "groups": Field(ListOf(_GROUP_SCHEMA)),
    "outer": optional(Nullable(ListOf(_GROUP_SCHEMA))),
}


def _group_dict(group: GroupSensitivity) -> dict:
    return {"name": group.name, "layers": group.layers, "shapes": [list(s) for s in group.shapes], "block": group.block,
            "options": [asdict(o) for o in group.options]}


def _group_from_dict(data: dict) -> GroupSensitivity:
    options = [OptionDamage(**{key: o[key] for key in _OPTION_SCHEMA}) for o in data["options"]]
    return GroupSensitivity(data["name"], list(data["layers"]), [tuple(s) for s in data["shapes"]], data["block"],
                            options)


def _kept_group(state: RunState, index: int, layers: list[str], choices: list[Choice]) -> GroupSensitivity | None:
    """Group `index`'s kept measurements, if they are of these layers under these choices."""
    found = state.load(f"group-{index:04d}")
    try:
        group = _group_from_dict(found[0]) if found is not None else None
    except (KeyError, TypeError, ValueError):
        return None
    if group is None or group.layers != layers or [o.choice for o in group.options] != list(choices):
        return None
    return group


def group_name(layers: list[str]) -> str:
    """`model.layers.0.self_attn.q_proj+k_proj+v_proj` for tied layers; the layer's name for one."""
    if len(layers) == 1:
        return layers[0]
    parts = [name.split(".") for name in layers]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return ".".join(parts[0][:common]) + "." + "+".join(".".join(p[common:]) for p in parts)


def other_parameters(model: nn.Module, quantized: list[tuple[str, nn.Linear]]) -> int:
    """Parameters outside the quantized weights (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters()) - sum(linear.weight.numel() for _, linear in quantized)


def group_stats(stats: dict, layers: list[str], head) -> dict:
    """The statistics measuring a group takes: its layers', and the head's for an embedding the head is tied to."""
    found = {name: stats[name] for name in layers}
    if head is not None and head[0] in stats and any(isinstance(found[name], EmbeddingStats) for name in layers):
        found[head[0]] = stats[head[0]]
    return found


class GroupMeter:
    """The options of one group at a time measured on the float model: its layers quantized under each option (from
    the statistics), their proxy, and the KL with only them changed (then put back). `seconds` sums the time spent
    quantizing and measuring the KL."""

    def __init__(self, model: nn.Module, kl_windows: torch.Tensor | None, clip_search: bool, gptq: GptqSettings,
                 outer: bool):
        self.modules = dict(quantizable_linears(model) + (outer_layers(model) if outer else []))
        self.head = output_head(model)
        self.clip_search, self.gptq = clip_search, gptq
        self.seconds = {"quantize": 0.0, "kl": 0.0}
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
    def measure(self, layers: list[str], block: int, choices: list[Choice], stats: dict) -> GroupSensitivity:
        shapes = [tuple(self.modules[name].weight.shape) for name in layers]
        group = GroupSensitivity(group_name(layers), layers, shapes, block, [])
        originals = [self.modules[name].weight.detach().clone() for name in layers]
        hessian = stats[layers[0]].hessian if isinstance(stats[layers[0]], LayerStats) else None
        for choice in choices:
            start = time.perf_counter()
            proxy = output_error = 0.0
            # The layers of a group read one input, so they share one Hessian and are solved together.
            solved = solve_many(originals, choice.format, choice.solver, hessian, self.clip_search, self.gptq)
            approximations = [approximation(w, q) for w, q in zip(originals, solved)]
            for name, weight, approx in zip(layers, originals, approximations):
                layer_proxy, layer_error = self._damages(name, weight, approx, stats)
                proxy, output_error = proxy + layer_proxy, output_error + layer_error
            self.seconds["quantize"] += time.perf_counter() - start
            measured = None
            if self.meter is not None:
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


@torch.no_grad()
def measure(
    model: nn.Module | LoadedModel,
    menu: list[Choice] | None = None,
    *,
    calibration: str | Path | torch.Tensor | None = None,
    calibration_windows: int = defaults.CALIBRATION_WINDOWS,
    calibration_len: int = defaults.CALIBRATION_LEN,
    pins: list[Pin] = (),
    ties: bool = True,
    kl: bool = True,
    kl_windows: int = defaults.KL_WINDOWS,
    kl_len: int = defaults.KL_LEN,
    fisher_windows: int = defaults.FISHER_WINDOWS,
    clip_search: bool = True,
    target: str | None = None,
    gptq: GptqSettings = GptqSettings(),
    outer: bool = False,
    blocks: bool = True,
    resume: str | Path | None = None,
    cluster: "Cluster | None" = None,
    progress: bool = True,
) -> Sensitivity:
    """Damage of each option of `menu` (default: `menu.DEFAULT_OPTIONS`) and of any pinned option,
    on every group of the float `model`.

    Calibration windows come from `calibration` (None: the default calibration
    mix; a source name, text file or folder; or a [windows, tokens] tensor of
    token ids): all give H, the first `fisher_windows` the Fisher, the first
    `kl_windows` cut to `kl_len` tokens the measured KL (skipped without
    `kl`). `ties` groups Linears that read the same input; otherwise every
    Linear is its own group. A pinned group is measured under its pin too;
    with a `target` ("gguf"), a group only under options that target can hold.
    `gptq` is how GPTQ options are solved (as `quantize` will solve them).
    `outer` also measures the input embedding (under the options it can look
    up, rounded to nearest; a head tied to it changes with it) and an output
    head with its own weight (`models.structure.outer_layers`), for budgets
    over the whole model; `blocks=False` measures only those. With `resume` (a folder), each group's
    measurements are kept there as they finish, and a run with the same settings takes them instead of measuring
    again (`resume.RunState`). With a `cluster` (`distributed.Cluster`), the groups are measured by Ray workers,
    with the same results.
    """
    menu = parse_menu(None) if menu is None else menu
    windows, spec = calibration_data(model, calibration, calibration_windows, calibration_len)
    identity = {"name": model.name, "sha256": model.sha256} if isinstance(model, LoadedModel) else {}
    model = model.model if isinstance(model, LoadedModel) else model
    adapter_for(model).prepare(model)
    linears = quantizable_linears(model)
    outside = outer_layers(model) if outer else []
    modules = dict(linears + outside)
    check_pins_match(list(pins), [name for name, _ in linears + outer_layers(model)])
    prefix, block_list = transformer_blocks(model)
    timer = time.perf_counter()
    stats, shared = layer_statistics(model, windows, min(fisher_windows, len(windows)), progress, outer=bool(outside))
    seconds = {"statistics": time.perf_counter() - timer, "quantize": 0.0, "kl": 0.0}
    grouping = (shared if ties else [[name] for name, _ in linears]) if blocks else []
    head = output_head(model)

    plans = []  # (layers, block, choices)
    for layers in grouping:
        shapes = [tuple(modules[name].weight.shape) for name in layers]
        block = int(layers[0][len(prefix) + 1:].split(".")[0])
        plans.append((layers, block, group_choices(layers, shapes, list(menu), list(pins), target)))
    for name, module in outside:
        embedding = isinstance(module, nn.Embedding)
        choices = group_choices([name], [tuple(module.weight.shape)], list(menu), list(pins), target, embedding)
        plans.append(([name], -1 if embedding else len(block_list), choices))
    state = None if resume is None else RunState(resume, {
        "run": "measure", "model": identity or sha256_state_dict(model), "windows": sha256_tensor(windows),
        "groups": [[layers, [str(c) for c in choices]] for layers, _, choices in plans], "kl": kl,
        "kl_windows": kl_windows, "kl_len": kl_len, "fisher_windows": fisher_windows, "clip_search": clip_search,
        "gptq": gptq.as_dict()})
    kept = [_kept_group(state, index, layers, choices) if state else None
            for index, (layers, _, choices) in enumerate(plans)]
    todo = [index for index, group in enumerate(kept) if group is None]
    results = dict(enumerate(kept))
    kl_windows_used = windows[:kl_windows, :kl_len] if kl else None

    def finished(index: int, group: GroupSensitivity) -> None:
        results[index] = group
        if state is not None:
            state.save(f"group-{index:04d}", _group_dict(group))

    total = sum(len(plans[index][2]) for index in todo)
    with tqdm(total=total, desc="measure", disable=not progress, leave=False) as bar:
        if todo and cluster is not None:
            from .distributed import measure_groups

            jobs = [(index, *plans[index], group_stats(stats, plans[index][0], head)) for index in todo]
            spent = measure_groups(model, jobs, kl_windows_used, clip_search, gptq, bool(outside), cluster,
                                   lambda index, group: (finished(index, group), bar.update(len(group.options))))
        elif todo:
            meter = GroupMeter(model, kl_windows_used, clip_search, gptq, bool(outside))
            for index in todo:
                finished(index, meter.measure(*plans[index], stats))
                bar.update(len(plans[index][2]))
            spent = meter.seconds
        for key, value in (spent if todo else {}).items():
            seconds[key] += value
    groups = [results[index] for index in range(len(plans))]
    if state is not None and state.kept and progress:
        print(f"measure: {len(state.kept)} measured groups taken from {state.root}", file=sys.stderr)
    spec["fisher_windows"] = min(fisher_windows, len(windows))
    spec["gptq"] = gptq.as_dict()
    spec["clip_search"] = clip_search
    kl_spec = {"count": min(kl_windows, len(windows)), "length": min(kl_len, windows.shape[1])} if kl else None
    return Sensitivity(groups[:len(grouping)], identity, spec, kl_spec, other_parameters(model, linears), seconds,
                       groups[len(grouping):])

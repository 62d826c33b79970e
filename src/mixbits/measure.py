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

The options are quantized from the float model's statistics, each group on its
own; `quantize` later solves them block-sequentially, so a plan's realised
damage differs somewhat from the sum of the measured ones.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import defaults
from .calibrate import _Accumulator, block_inputs, calibration_data, run_block
from .errors import MixbitsError
from .files import write_json
from .menu import Choice, Pin, allowed, check_pins_match, group_choices, parse_menu
from .models.loaded import LoadedModel
from .models.registry import adapter_for
from .models.structure import quantizable_linears, transformer_blocks
from .plan import option_bits
from .solvers import GptqSettings, approximation, solve_many

SENSITIVITY_VERSION = 1
DAMAGES = ("kl", "proxy")


class SensitivityError(MixbitsError):
    """A sensitivity file is missing, malformed, or made for another model or menu."""


@dataclass
class LayerStats:
    hessian: torch.Tensor  # [C, C] input X^T X / tokens
    fisher: torch.Tensor  # [R] mean squared loss gradient per output channel
    tokens: int


def layer_statistics(
    model: nn.Module, windows: torch.Tensor, fisher_windows: int, progress: bool = True
) -> tuple[dict[str, LayerStats], list[list[str]]]:
    """H and the output Fisher diagonal of every Linear in the blocks, and the tie groups (shared inputs)."""
    linears = quantizable_linears(model)
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

    handles = [linear.register_forward_hook(record) for linear in names]
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(torch.is_grad_enabled())))
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
                groups = [entry[2] for entry in seen]
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
    return stats, groups


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
        self.model, self.adapter = model, adapter_for(model)
        with torch.no_grad():
            first, self.calls = block_inputs(model, windows)
            self.inputs = [first]
            for block, call in zip(self.blocks, self.calls):
                self.inputs.append(run_block(block, self.inputs[-1], call))
            self.reference = self._logits(self.inputs.pop())
            self.probs = torch.softmax(self.reference.double(), dim=-1)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter.logits(self.model, hidden).float()

    @torch.no_grad()
    def measure(self, block_index: int) -> float:
        hidden = self.inputs[block_index]
        for block, call in zip(self.blocks[block_index:], self.calls[block_index:]):
            hidden = run_block(block, hidden, call)
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

    def find(self, choice: Choice) -> OptionDamage | None:
        return next((o for o in self.options if o.choice == choice), None)


@dataclass
class Sensitivity:
    """Damage of every (group, option), with what it was measured on."""

    groups: list[GroupSensitivity]
    model: dict = field(default_factory=dict)  # name, sha256
    calibration: dict = field(default_factory=dict)  # text, windows, length, fisher_windows
    kl_windows: dict | None = None  # count and length of the KL windows; None if only the proxy was measured
    other_parameters: int = 0  # parameters outside the quantized layers (embedding, norms, biases)
    seconds: dict = field(default_factory=dict)

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
                if any(group.find(choice) is None and all(allowed(choice, tuple(s), target) for s in group.shapes)
                       for group in self.groups)]

    def extended(self, other: "Sensitivity") -> "Sensitivity":
        """These measurements plus `other`'s options (measured alike on the same groups) that these lack."""
        if [g.name for g in other.groups] != [g.name for g in self.groups]:
            raise SensitivityError("the new measurements group the layers differently (--no-ties?); measure again")
        if (other.model, other.calibration, other.kl_windows) != (self.model, self.calibration, self.kl_windows):
            raise SensitivityError("the new measurements were taken on another model, calibration or KL windows; "
                                   "measure again")
        groups = [GroupSensitivity(g.name, g.layers, g.shapes, g.block,
                                   g.options + [o for o in new.options if g.find(o.choice) is None])
                  for g, new in zip(self.groups, other.groups)]
        seconds = {key: self.seconds.get(key, 0.0) + other.seconds.get(key, 0.0)
                   for key in {*self.seconds, *other.seconds}}
        return Sensitivity(groups, self.model, self.calibration, self.kl_windows, self.other_parameters, seconds)

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
            "groups": [
                {"name": g.name, "layers": g.layers, "shapes": [list(s) for s in g.shapes], "block": g.block,
                 "options": [asdict(o) for o in g.options]}
                for g in self.groups
            ],
        }

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically (temporary file, then rename)."""
        write_json(path, self.as_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Sensitivity":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("mixbits_sensitivity") != SENSITIVITY_VERSION:
                raise SensitivityError(f"{path} is not a version-{SENSITIVITY_VERSION} mixbits sensitivity file; measure again")
            groups = [
                GroupSensitivity(g["name"], list(g["layers"]), [tuple(s) for s in g["shapes"]], int(g["block"]),
                                 [OptionDamage(**o) for o in g["options"]])
                for g in data["groups"]
            ]
        except FileNotFoundError:
            raise SensitivityError(f"sensitivity file {path} does not exist; measure with `mixbits plan --sensitivity FILE`") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise SensitivityError(f"cannot read sensitivity file {path}: {error}") from None
        calibration = {"clip_search": True, **(data.get("calibration") or {})}  # files before it was recorded used it
        return cls(groups, data.get("model") or {}, calibration, data.get("kl_windows"),
                   int(data.get("other_parameters", 0)), data.get("seconds") or {})


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
    """
    menu = parse_menu(None) if menu is None else menu
    windows, spec = calibration_data(model, calibration, calibration_windows, calibration_len)
    identity = {"name": model.name, "sha256": model.sha256} if isinstance(model, LoadedModel) else {}
    model = model.model if isinstance(model, LoadedModel) else model
    adapter_for(model).prepare(model)
    linears = quantizable_linears(model)
    modules = dict(linears)
    check_pins_match(list(pins), [name for name, _ in linears])
    prefix, _ = transformer_blocks(model)
    timer = time.perf_counter()
    stats, shared = layer_statistics(model, windows, min(fisher_windows, len(windows)), progress)
    seconds = {"statistics": time.perf_counter() - timer, "quantize": 0.0, "kl": 0.0}
    meter = None
    if kl:
        timer = time.perf_counter()
        meter = KLMeter(model, windows[:kl_windows, :kl_len])
        seconds["kl"] += time.perf_counter() - timer
    grouping = shared if ties else [[name] for name, _ in linears]

    plans = []
    for layers in grouping:
        shapes = [tuple(modules[name].weight.shape) for name in layers]
        plans.append((layers, group_choices(layers, shapes, list(menu), list(pins), target)))
    total = sum(len(choices) for _, choices in plans)
    groups: list[GroupSensitivity] = []
    with tqdm(total=total, desc="measure", disable=not progress, leave=False) as bar:
        for layers, choices in plans:
            shapes = [tuple(modules[name].weight.shape) for name in layers]
            block = int(layers[0][len(prefix) + 1:].split(".")[0])
            group = GroupSensitivity(group_name(layers), layers, shapes, block, [])
            originals = [modules[name].weight.detach().clone() for name in layers]
            for choice in choices:
                start = time.perf_counter()
                proxy = output_error = 0.0
                # The layers of a group read one input, so they share one Hessian and are solved together.
                solved = solve_many(originals, choice.format, choice.solver, stats[layers[0]].hessian, clip_search, gptq)
                approximations = [approximation(w, q) for w, q in zip(originals, solved)]
                for name, weight, approx in zip(layers, originals, approximations):
                    layer_proxy, layer_error = proxy_damage(weight, approx, stats[name])
                    proxy, output_error = proxy + layer_proxy, output_error + layer_error
                seconds["quantize"] += time.perf_counter() - start
                measured = None
                if meter is not None:
                    timer = time.perf_counter()
                    for name, approx in zip(layers, approximations):
                        modules[name].weight.copy_(approx)
                    measured = meter.measure(block)
                    for name, weight in zip(layers, originals):
                        modules[name].weight.copy_(weight)
                    seconds["kl"] += time.perf_counter() - timer
                group.options.append(OptionDamage(choice.option, choice.solver, group.bits(choice), proxy,
                                                  output_error, measured, time.perf_counter() - start))
                bar.update()
            groups.append(group)
    spec["fisher_windows"] = min(fisher_windows, len(windows))
    spec["gptq"] = gptq.as_dict()
    spec["clip_search"] = clip_search
    kl_spec = {"count": min(kl_windows, len(windows)), "length": min(kl_len, windows.shape[1])} if kl else None
    return Sensitivity(groups, identity, spec, kl_spec, other_parameters(model, linears), seconds)

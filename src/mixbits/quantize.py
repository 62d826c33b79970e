"""Quantize a model's linear layers in place and account for their exact bits.

Two paths:
- data-free: round-to-nearest of every Linear (`solver="rtn"` without AWQ);
- calibrated (`solver="gptq"` or `"gptaq"`, `awq=True` and/or `smooth=True`): calibration
  windows run through the model block by block (`calibrate.SequentialCalibration`).
  In each block, AWQ or SmoothQuant scales are searched and folded on the float block first;
  then the Linears are quantized stage by stage (those reading the same
  input together), each stage's input statistics taken with the earlier
  stages already quantized; the quantized block's outputs feed the next.
  GPTAQ also runs a float copy of each block on the float model's
  activations, for each layer's cross term (`solvers.gptq.asymmetric_target`).

A rotation (`rotate=True`) is applied to the float model before either path.
With a `plan`, each layer gets its own option and solver (`plan.Plan`).

The input embedding, and an output head that is neither tied to it nor
quantized as a layer, are the report's `outer` layers: rounded to 16 bits
by default, or the embedding quantized by round to nearest to
`embedding_format` or to the option a plan for a whole-model budget gives
it (each row on its own, so the runtime looks rows up from their codes); such
a plan may also set an untied head, then quantized as a layer. A head tied to the embedding computes with the same values.
They are counted in `model_bits`, never in `bits_per_weight`, which stays
the quantized blocks' (and a quantized head's) measure.
"""

from __future__ import annotations

import copy
import sys
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import defaults
from .activations import StaticIntFormat, activation_name, parse_activation
from .calibrate import InputStats, SequentialCalibration, calibration_data, input_stats
from .errors import MixbitsError
from .formats import Format, QuantizedTensor, parse_format
from .formats.storage import restore
from .hashing import sha256_state_dict, sha256_tensor
from .io.checkpoint import stored_layer
from .memory import peak_bytes, reset_peak
from .models.registry import adapter_for
from .models.loaded import LoadedModel
from .models.structure import outer_layers, output_head, quantizable_linears, untie_head
from .plan import KEEP, LayerTotals, Plan, PlanError, option_bits
from .resume import RunState
from .runtime.linear import with_activation
from .solvers import GptqSettings, approximation, round_to_nearest, solve_many
from .solvers.distill import DistillRecord, DistillSettings, distill_scales
from .solvers.tuning import TuneRecord, TuneSettings, tune_block
from .transforms.rotation import rotate as rotate_model
from .transforms.scaling import ScaledGroup, scale_block

# A layer whose calibration input is fewer tokens than this (an expert the router hardly chose) is rounded to nearest:
# a Hessian of rank < 32 describes its inputs too poorly for GPTQ to trust. A choice, not a measured optimum.
MIN_ROUTED_TOKENS = 32


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    bits: int
    option: str
    solver: str
    activation: str | None = None  # the format its inputs are rounded to (activations.parse_activation)

    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class QuantizationReport(LayerTotals):
    format: str
    clip_search: bool
    solver: str = "rtn"
    awq: bool = False
    smooth: bool = False  # SmoothQuant's scales folded before quantizing (with quantized inputs)
    rotation: dict | None = None
    calibration: dict | None = None  # text, windows, length
    gptq: GptqSettings = field(default_factory=GptqSettings)
    layers: list[LayerReport] = field(default_factory=list)
    scaled: list[ScaledGroup] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    # Codes and parameters of every quantized layer by name (None: kept in 16 bits), for saving.
    tensors: dict[str, QuantizedTensor | None] = field(default_factory=dict, repr=False)
    outer: list[LayerReport] = field(default_factory=list)  # embedding and a float head, stored apart from `layers`
    rounded_for_lack_of_tokens: list[str] = field(default_factory=list)  # calibrated layers rounded to nearest instead
    tune: TuneSettings | None = None  # block-wise tuning after the solver (`solvers.tuning`)
    tuning: list[TuneRecord] = field(default_factory=list)  # one per tuned block
    distill: DistillSettings | None = None  # scales tuned to the float model's logits after (`solvers.distill`)
    distillation: DistillRecord | None = None
    other_parameters: int = 0  # parameters in neither (norms, biases), stored in float32

    @property
    def model_bits(self) -> int:
        """Bits of every stored parameter: layers and outer layers as stored, the rest in float32."""
        return self.bits + sum(layer.bits for layer in self.outer) + 32 * self.other_parameters

    @property
    def method(self) -> str:
        """Short name of what was done, e.g. "gptq+awq" or "rtn+rotate"."""
        parts = ([self.solver] + (["awq"] if self.awq else []) + (["smoothquant"] if self.smooth else [])
                 + (["rotate"] if self.rotation else []) + (["tune"] if self.tune else [])
                 + (["distill"] if self.distill else []))
        return "+".join(parts)

    def as_dict(self) -> dict:
        return {
            "format": self.format,
            "method": self.method,
            "solver": self.solver,
            "awq": self.awq,
            "smooth": self.smooth,
            "rotation": self.rotation,
            "clip_search": self.clip_search,
            "calibration": self.calibration,
            "gptq": self.gptq.as_dict(),
            "layers": len(self.layers),
            "options": dict(Counter(layer.option if layer.option == KEEP else f"{layer.option}@{layer.solver}"
                                    for layer in self.layers)),
            "activations": dict(Counter(layer.activation for layer in self.layers if layer.activation)),
            "weights": self.weights,
            "bits": self.bits,
            "bits_per_weight": self.bits_per_weight,
            "outer": [{"name": layer.name, "option": layer.option, "shape": list(layer.shape), "bits": layer.bits}
                      for layer in self.outer],
            "model_bits": self.model_bits,
            "seconds": self.seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
            "awq_scales": [asdict(group) for group in self.scaled],  # AWQ's or SmoothQuant's groups
            "rounded_for_lack_of_tokens": self.rounded_for_lack_of_tokens,
            "tuning": None if self.tune is None else {**self.tune.as_dict(),
                                                      "blocks": [record.as_dict() for record in self.tuning]},
            "distillation": None if self.distill is None else {
                **self.distill.as_dict(), **(self.distillation.as_dict() if self.distillation else {})},
        }


@torch.no_grad()
def quantize(
    model: nn.Module | LoadedModel,
    format: str | Format = "int4:g64:asym",
    *,
    solver: str = "rtn",
    awq: bool = False,
    smooth: bool = False,
    rotate: bool = False,
    online_hadamard: bool = False,
    calibration: str | Path | torch.Tensor | None = None,
    calibration_windows: int = defaults.CALIBRATION_WINDOWS,
    calibration_len: int = defaults.CALIBRATION_LEN,
    clip_search: bool = True,
    include_head: bool = False,
    head_format: str | Format | None = None,
    embedding_format: str | Format | None = None,
    plan: Plan | None = None,
    gptq: GptqSettings = GptqSettings(),
    activation: str | Format | None = None,
    resume: str | Path | None = None,
    tune: TuneSettings | None = None,
    distill: DistillSettings | None = None,
    progress: bool = True,
) -> QuantizationReport:
    """Quantize every Linear inside the transformer blocks to `format`, in place.

    Weights are replaced by their dequantized values (simulated quantization),
    so the model runs as before. `solver` is "rtn", "gptq" or "gptaq"
    (GPTQ fitted to the float model's outputs, `solvers.gptq`); `awq` adds
    activation-aware scaling; `rotate` a Hadamard rotation of the residual
    stream (`online_hadamard` also of every down_proj input). GPTQ and AWQ
    take calibration windows from `calibration`: None for the default
    calibration mix (`mixbits.corpus`), a text source name, a text file or
    folder (windows from its start), or a [windows, tokens] tensor of token
    ids; `gptq` sets GPTQ's damping, Hessian shrinkage and column order.
    `clip_search` searches a clip ratio per group. With `include_head` the
    output head is quantized too (untied from the input embedding first,
    which stays float), in `head_format` if given (which implies it).
    `embedding_format` quantizes the input embedding (None: 16 bits). A
    `plan` gives every layer its own option and solver instead of `format`
    and `solver`. `activation` rounds the inputs of every quantized layer to
    that activation format as the model runs (W4A8 with `int8:g32`; see
    `activations`), after the weights are solved with float inputs (a plan's
    layers may name their own, which win); `smooth`
    first folds SmoothQuant's scales, searched for that format. With
    `resume` (a folder), each calibrated block is kept there as it
    finishes, and a run with the same settings takes the kept blocks instead
    of solving them again, with the same result (`resume.RunState`). With
    `tune`, each block's quantized Linears are then tuned to the float
    block's output (`solvers.tuning`). With `distill`, the scales of every
    quantized layer are then tuned to the float model's next-token
    distributions on the calibration windows (`solvers.distill`; a float copy
    of the model is kept meanwhile). Returns the exact bit count of
    everything quantized.
    """
    if solver not in defaults.SOLVERS:
        raise MixbitsError(f"unknown solver {solver!r}; use one of {', '.join(defaults.SOLVERS)}")
    if online_hadamard and not rotate:
        raise MixbitsError("the online Hadamard before down_proj is part of the rotation; add rotate=True (--rotate)")
    if plan is not None and not plan.layers:
        raise PlanError("this plan holds only a KV cache (kv_cache), no weight layers; use it with `mixbits eval "
                        "--kv-plan` or `mixbits generate --kv-plan`, or add it to a weights plan with `kv-plan --into`")
    if plan is not None and (awq or rotate or smooth):
        raise MixbitsError("plans are measured on the model as it is: --awq, --smoothquant and --rotate do not combine "
                           "with a plan yet")
    if smooth and activation is None:
        raise MixbitsError("SmoothQuant moves outliers out of the inputs for their quantization; give --act too")
    if smooth and awq:
        raise MixbitsError("give either --awq or --smoothquant: both fold per-channel scales into the same layers")
    if (solver == "gptaq" or tune is not None) and (awq or smooth):
        raise MixbitsError("gptaq and tuning compare each layer's inputs with the float model's, which --awq and "
                           "--smoothquant rescale; use --solver gptq without --tune with them")
    module = model.model if isinstance(model, LoadedModel) else model
    adapter_for(module).prepare(module)  # stacked experts become Linears (same function)
    head = None
    if head_format is not None:
        head = output_head(module)
        if head is None:
            raise MixbitsError("this model has no Linear output head to quantize; drop the head format")
        if plan is not None and any(layer.name == head[0] for layer in plan.layers):
            raise MixbitsError(f"the plan already sets the option of {head[0]}; drop the head format")
    embedding_option = KEEP if embedding_format in (None, KEEP) else str(parse_format(embedding_format))
    if plan is not None:  # a plan for a whole-model budget also sets the embedding, and an untied head
        embed = next(((name, layer) for name, layer in outer_layers(module) if isinstance(layer, nn.Embedding)),
                     (None, None))
        planned = next((layer for layer in plan.layers if layer.name == embed[0]), None)
        if planned is not None:
            if embedding_format is not None:
                raise MixbitsError(f"the plan already sets the option of {embed[0]}; drop the embedding format")
            if tuple(planned.shape) != tuple(embed[1].weight.shape):
                raise PlanError(f"the plan's {embed[0]} is {planned.shape[0]}x{planned.shape[1]} but this model's is "
                                f"{embed[1].weight.shape[0]}x{embed[1].weight.shape[1]}; make the plan for this model")
            embedding_option = planned.option
            plan = Plan([layer for layer in plan.layers if layer is not planned], plan.model, plan.budget, plan.damage,
                        plan.kv_cache)
        untied = output_head(module)
        include_head = include_head or (untied is not None and any(layer.name == untied[0] for layer in plan.layers))
    _check_embedding(module, embedding_option)
    act = None if activation is None else parse_activation(activation)
    planned_inputs = {} if plan is None else {layer.name: parse_activation(layer.activation) for layer in plan.layers
                                              if layer.activation is not None}
    static = any(isinstance(f, StaticIntFormat) and f.value is None for f in (act, *planned_inputs.values()))
    if plan is not None:
        choices = _plan_choices(plan, module, [name for name, _ in quantizable_linears(module, include_head and head is None)])
    else:  # every layer alike, whatever its name becomes after a rotation
        uniform = (str(parse_format(format)), solver)
        choices = defaultdict(lambda: uniform, {})
    if head is not None:  # plans run calibrated, so their head gets GPTQ
        choices[head[0]] = (str(parse_format(head_format)), "gptq" if plan is not None else solver)
        include_head = True
    # Refuse unsupported architectures and short texts before changing anything.
    if rotate:
        adapter_for(module).layout(module, "rotation")
    if awq or smooth:
        adapter_for(module).layout(module, "SmoothQuant" if smooth else "activation-aware scaling")
    solvers = {s for o, s in choices.values() if o != KEEP} or {"rtn"} if plan is not None else {solver}
    # A plan's damage was measured with calibration statistics (RTN's clip search on the output error too),
    # so plans always run calibrated.
    calibrated = (bool(solvers & {"gptq", "gptaq"}) or awq or smooth or plan is not None or tune is not None
                  or distill is not None)
    asymmetric = "gptaq" in solvers or tune is not None  # a float copy of the model's activations runs alongside
    windows = spec = None
    if calibrated or static:  # static input scales are measured on the calibration text too
        windows, spec = calibration_data(model, calibration, calibration_windows, calibration_len)

    label = "plan" if plan is not None else uniform[0]
    report = QuantizationReport(label, clip_search, solvers.pop() if len(solvers) == 1 else "mixed", awq, smooth,
                                calibration=spec, gptq=gptq, tune=tune, distill=distill)
    teacher = copy.deepcopy(module) if distill is not None else None  # before any change, rotation included
    reset_peak()
    start = time.perf_counter()
    if rotate:
        report.rotation = rotate_model(module, online_down=online_hadamard).as_dict()
    if include_head:
        untie_head(module)
    if calibrated:
        state = None
        if resume is not None:
            identity = model.sha256 if isinstance(model, LoadedModel) and model.sha256 else sha256_state_dict(module)
            names = [name for name, _ in quantizable_linears(module, include_head)]
            state = RunState(resume, {
                "run": "quantize", "model": identity, "choices": {name: choices[name] for name in names},
                "windows": sha256_tensor(windows), "clip_search": clip_search, "gptq": gptq.as_dict(), "awq": awq,
                "smooth": smooth, "activation": str(act), "rotate": rotate, "online_hadamard": online_hadamard,
                "head": include_head, "tune": None if tune is None else tune.as_dict()})
        _quantize_calibrated(module, choices, windows, report, include_head, progress, act, state, asymmetric)
    else:
        for name, linear in tqdm(quantizable_linears(module, include_head), desc="quantize", disable=not progress, leave=False):
            _solve([name], [linear], None, choices, report)
    _quantize_outer(module, embedding_option, report)
    if teacher is not None:
        report.tensors, report.distillation = distill_scales(module, teacher, report.tensors, windows, distill)
        del teacher
    if act is not None or planned_inputs:
        _quantize_inputs(module, act, report, planned_inputs, windows)
    report.seconds = time.perf_counter() - start
    report.peak_memory_bytes = peak_bytes()
    return report


def _plan_choices(plan: Plan, module: nn.Module, names: list[str]) -> dict[str, tuple[str, str]]:
    """(option, solver) per layer from `plan`, which must cover exactly the model's quantizable layers."""
    planned = {layer.name: layer for layer in plan.layers}
    missing = [name for name in names if name not in planned]
    extra = [name for name in planned if name not in set(names)]
    if missing or extra:
        which = f"has no entry for {missing[0]}" if missing else f"names {extra[0]}, which this model does not quantize"
        raise PlanError(f"the plan {which} ({len(missing)} missing, {len(extra)} unknown); make the plan for this model")
    modules = dict(module.named_modules())
    for name in names:
        shape = tuple(modules[name].weight.shape)
        if shape != tuple(planned[name].shape):
            raise PlanError(f"layer {name} is {shape[0]}x{shape[1]} but the plan says "
                            f"{planned[name].shape[0]}x{planned[name].shape[1]}; make the plan for this model")
    return {name: (planned[name].option, planned[name].solver) for name in names}


def _quantize_calibrated(module: nn.Module, choices: dict[str, tuple[str, str]], windows, report: QuantizationReport,
                         include_head: bool, progress: bool, activation: Format | None = None,
                         state: RunState | None = None, asymmetric: bool = False) -> None:
    scaled = report.awq or report.smooth
    fmt = parse_format(report.format) if scaled else None  # AWQ and SmoothQuant run without a plan: one format
    decoder = adapter_for(module).layout(module, "per-channel scaling") if scaled else None
    smoothing = activation if report.smooth else None
    sequence = SequentialCalibration(module, windows, reference=asymmetric)
    for index, block in enumerate(tqdm(sequence, desc=f"{report.method} blocks", disable=not progress, leave=False)):
        step = f"block-{index:04d}"
        kept = state.load(step) if state is not None else None
        if kept is not None and restore_block(block.prefix, block.block, *kept, report):
            continue  # its weights are as solved before, so its outputs, the next block's inputs, are too
        before = (len(report.layers), len(report.scaled), len(report.rounded_for_lack_of_tokens), len(report.tuning))
        _quantize_block(index, block, choices, report, decoder, fmt, smoothing)
        if state is not None:
            state.save(step, *block_record(block.prefix, block.block, report, before))
    if state is not None and state.kept and progress:
        print(f"quantize: {len(state.kept)} finished blocks taken from {state.root}", file=sys.stderr)
    if report.rounded_for_lack_of_tokens:
        warnings.warn(f"{len(report.rounded_for_lack_of_tokens)} layers saw fewer than {MIN_ROUTED_TOKENS} calibration "
                      f"tokens (experts the router hardly chose) and were rounded to nearest instead: "
                      f"{', '.join(report.rounded_for_lack_of_tokens[:8])}"
                      + (", ..." if len(report.rounded_for_lack_of_tokens) > 8 else ""), stacklevel=3)
    if include_head:
        name, head = output_head(module)
        norm = adapter_for(module).final_norm(module)
        reference = None if sequence.reference_outputs is None else norm(sequence.reference_outputs)
        _solve([name], [head], input_stats(norm(sequence.outputs), reference), choices, report)


def _quantize_block(index: int, block, choices, report: QuantizationReport, decoder, fmt, smoothing) -> None:
    stages = block.stages()
    if decoder is not None:
        report.scaled += scale_block(decoder.blocks[index], block, fmt, stages, smoothing)
    for stage in stages:
        stats = block.stats(stage.linears)[stage.linears[0]]
        routed = stats.tokens < block.inputs.shape[0] * block.inputs.shape[1]  # not every token: an expert
        if routed and stats.tokens < MIN_ROUTED_TOKENS:  # one the router hardly chose: no Hessian worth trusting
            rounded = {name: (choices[name][0], "rtn") for name in stage.names}
            _solve(stage.names, stage.linears, None, rounded, report)
            report.rounded_for_lack_of_tokens += stage.names
            continue
        _solve(stage.names, stage.linears, stats, choices, report, keep_source=report.tune is not None)
    if report.tune is not None:
        _tune(block, [name for stage in stages for name in stage.names], report)


def _tune(block, names: list[str], report: QuantizationReport) -> None:
    """Block-wise tuning of the block's quantized Linears to the float block's output on the float inputs."""
    targets = block.reference_outputs()
    relative = {name: name[len(block.prefix) + 1:] for name in names}
    tuned, record = tune_block(block.block, block.kwargs, block.inputs, targets,
                               {relative[name]: report.tensors[name] for name in names if report.tensors[name] is not None},
                               report.tune)
    for name in names:
        if relative[name] in tuned:
            tensor = tuned[relative[name]]
            report.tensors[name] = QuantizedTensor(tensor.format, tensor.shape, tensor.codes, tensor.params)  # no source
    report.tuning.append(record)


def block_record(prefix: str, block: nn.Module, report: QuantizationReport, before: tuple[int, int, int, int]):
    """What a finished block (qualified name `prefix`) added to the report since `before` (lengths of its layers,
    scaled groups, rounded layers and tuning records), and its tensors: each layer as stored (codes and parameters,
    or the 16-bit weight) under "codes/NAME/", the rest of the block (norms, biases; scaling changes the norms) under
    "float/"."""
    layers = report.layers[before[0]:]
    record = {"layers": [asdict(layer) for layer in layers], "scaled": [asdict(g) for g in report.scaled[before[1]:]],
              "rounded": report.rounded_for_lack_of_tokens[before[2]:],
              "tuning": [t.as_dict() for t in report.tuning[before[3]:]]}
    replaced = {layer.name[len(prefix) + 1:] + ".weight" for layer in layers}
    modules = dict(block.named_modules())
    tensors = {f"float/{key}": value for key, value in block.state_dict().items() if key not in replaced}
    for layer in layers:
        stored = stored_layer(report.tensors[layer.name], modules[layer.name[len(prefix) + 1:]])
        tensors.update({f"codes/{layer.name}/{key}": value for key, value in stored.items()})
    return record, tensors


def restore_block(prefix: str, block: nn.Module, record: dict, tensors: dict[str, torch.Tensor],
                  report: QuantizationReport) -> bool:
    """Put back a block `block_record` kept: its weights as the solver left them (dequantized from the codes, exactly),
    the rest of its tensors, its report entries. False, with nothing changed, if the kept tensors do not fit it."""
    current = block.state_dict()
    modules = dict(block.named_modules())
    floats = {key[len("float/"):]: value for key, value in tensors.items() if key.startswith("float/")}
    try:
        layers = [LayerReport(**{**entry, "shape": tuple(entry["shape"])}) for entry in record["layers"]]
        replaced = {layer.name[len(prefix) + 1:] + ".weight": layer for layer in layers}
        if set(floats) | set(replaced) != set(current) or set(floats) & set(replaced) or any(
                floats[k].shape != current[k].shape or floats[k].dtype != current[k].dtype for k in floats):
            return False
        codes, weights = {}, {}
        for key, layer in replaced.items():
            parts = {name.split("/", 2)[2]: value for name, value in tensors.items()
                     if name.startswith(f"codes/{layer.name}/")}
            if layer.option == KEEP:
                codes[layer.name], weights[key] = None, parts["weight"].float()
            else:
                codes[layer.name] = restore(parse_format(layer.option), layer.shape, parts)
                weights[key] = codes[layer.name].dequantize()
            if weights[key].shape != current[key].shape:
                return False
        scaled = [ScaledGroup(**group) for group in record["scaled"]]
        rounded = list(record["rounded"])
        tuning = [TuneRecord(**entry) for entry in record.get("tuning", [])]
    except (KeyError, TypeError, ValueError, MixbitsError):
        return False
    with torch.no_grad():
        for key, value in floats.items():
            current[key].copy_(value)
        for key, value in weights.items():
            modules[key.removesuffix(".weight")].weight.copy_(value.to(current[key].dtype))
    report.layers += layers
    report.tensors.update(codes)
    report.scaled += scaled
    report.rounded_for_lack_of_tokens += rounded
    report.tuning += tuning
    return True


def _solve(names: list[str], linears: list[nn.Linear], stats: InputStats | None, choices, report: QuantizationReport,
           keep_source: bool = False) -> None:
    """Quantize Linears that read one input (so share its `stats`; None: data-free), those with the same option in one
    call (with `keep_source`, each result keeps the values it was rounded from, for tuning)."""
    alike: dict[tuple[str, str], list[int]] = {}
    for index, name in enumerate(names):
        alike.setdefault(choices[name], []).append(index)
    for (option, solver), indices in alike.items():
        fmt = None if option == KEEP else parse_format(option)
        quantized = solve_many([linears[i].weight for i in indices], fmt, solver, None if stats is None else stats.hessian,
                               report.clip_search, report.gptq, None if stats is None else stats.cross, keep_source)
        for i, tensor in zip(indices, quantized):
            weight = linears[i].weight
            weight.copy_(approximation(weight, tensor).to(weight.dtype))
            report.tensors[names[i]] = tensor
            rows, cols = weight.shape
            report.layers.append(LayerReport(names[i], (rows, cols), option_bits(option, rows, cols), option, solver))


def _quantize_inputs(module: nn.Module, activation: Format | None, report: QuantizationReport,
                     planned: dict[str, Format], windows: torch.Tensor | None) -> None:
    """Every quantized layer's inputs rounded to its plan's activation format or else `activation` from now on
    (16-bit layers keep float inputs unless their plan says otherwise), and those of a head tied to a quantized
    embedding (recorded on the embedding's report: `activation` there is its tied head's). Static formats get
    their scales from the largest input each layer sees on the calibration `windows`."""
    modules = dict(module.named_modules())
    chosen = []  # (module name, its report entry, format)
    for layer in report.layers:
        fmt = planned.get(layer.name, activation if layer.option != KEEP else None)
        if fmt is not None:
            chosen.append((layer.name, layer, fmt))
    head, embed = output_head(module), module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    if activation is not None and head is not None and isinstance(embed, nn.Embedding) and head[1].weight is embed.weight:
        embed_name = next(n for n, m in modules.items() if m is embed)
        for layer in report.outer:
            if layer.name == embed_name and layer.option != KEEP:
                chosen.append((head[0], layer, activation))
    uncalibrated = [name for name, _, fmt in chosen if isinstance(fmt, StaticIntFormat) and fmt.value is None]
    largest = _largest_inputs(module, uncalibrated, windows) if uncalibrated else {}
    for name, layer, fmt in chosen:
        if name in largest:
            fmt = fmt.calibrated(largest[name])
        with_activation(modules[name], fmt)
        layer.activation = activation_name(fmt)


def _largest_inputs(module: nn.Module, names: list[str], windows: torch.Tensor) -> dict[str, float]:
    """The largest input magnitude each named layer sees over the calibration windows, the model as it now is."""
    modules = dict(module.named_modules())
    largest = dict.fromkeys(names, 0.0)

    def record(name, _, args):
        largest[name] = max(largest[name], float(args[0].detach().abs().max()))

    hooks = [modules[name].register_forward_pre_hook(lambda m, args, name=name: record(name, m, args)) for name in names]
    try:
        with torch.no_grad():
            for window in windows:  # one at a time: the logits of a window are the largest tensor
                module(window[None])
    finally:
        for hook in hooks:
            hook.remove()
    return largest


def _check_embedding(module: nn.Module, option: str) -> None:
    from .runtime.embedding import check_lookup_format

    if option == KEEP:
        return
    if not isinstance(module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None, nn.Embedding):
        raise MixbitsError("this model has no nn.Embedding input embedding to quantize; drop the embedding format")
    check_lookup_format(parse_format(option))


def _quantize_outer(module: nn.Module, embedding_option: str, report: QuantizationReport) -> None:
    """The embedding (and a head that is neither tied to it nor a layer) in 16 bits or `embedding_option`."""
    names = {id(m): n for n, m in module.named_modules()}
    found = []
    embed = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    if isinstance(embed, nn.Embedding):
        found.append((names[id(embed)], embed, embedding_option))
    head = output_head(module)
    if head is not None and head[0] not in report.tensors and (embed is None or head[1].weight is not embed.weight):
        found.append((head[0], head[1], KEEP))
    quantized_names = {layer.name for layer in report.layers}
    for name, layer, option in found:
        weight = layer.weight
        tensor = None if option == KEEP else round_to_nearest(weight, parse_format(option), report.clip_search)
        weight.copy_(approximation(weight, tensor).to(weight.dtype))
        report.tensors[name] = tensor
        rows, cols = weight.shape
        report.outer.append(LayerReport(name, (rows, cols), option_bits(option, rows, cols), option, "rtn"))
    counted = quantized_names | {layer.name for layer in report.outer}
    report.other_parameters = sum(p.numel() for n, p in module.named_parameters()
                                  if not (n.rpartition(".")[0] in counted and n.endswith(".weight")))

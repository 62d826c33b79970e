"""Quantize a model larger than memory: its blocks read, solved and written one at a time.

The model is built with its parameters on the meta device (no memory; the
buffers a model computes, such as rotary frequencies, are built for real).
The embedding, final norm and head are read from the directory's safetensors
files (memory-mapped, one tensor at a time); the calibration windows run
through the embedding, with every block standing aside, to give the first
block's inputs and each block's call. Then, block by block: its weights are
read in float32, it is solved as `quantize` solves it (stage by stage, GPTQ
on the inputs that reach it through the blocks already quantized), its codes
and other tensors are written to `OUT.partial/` (the resume folder: a
stopped run takes finished blocks from there), its outputs become the next
block's inputs, and its weights go back to the meta device. The checkpoint
is assembled from those files one tensor at a time (`io.safetensors_writer`).
Peak memory is one block in float32, its largest Hessian in float64, the
calibration activations and the embedding and head: not the model.

Architectures whose files name their tensors as the model does (every
LLaMA-like family saved by transformers) stream; stacked-expert MoE files,
which the adapters reshape after loading, do not yet.
"""

from __future__ import annotations

import copy
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import defaults
from .calibrate import BlockCalibration, _StopBlock, calibration_data, forward_windows
from .errors import MixbitsError, ModelLoadError, first_line
from .formats import parse_format
from .hashing import sha256_files, sha256_tensor
from .io.checkpoint import check_output_directory, float_tensors, stored_layer, write_checkpoint
from .io.safetensors_writer import Lazy
from .memory import peak_bytes, reset_peak
from .models.loaded import LoadedModel
from .models.structure import transformer_blocks
from .plan import KEEP
from .quantize import (QuantizationReport, _check_embedding, _quantize_block, _quantize_outer, block_record,
                       restore_block)
from .resume import RunState, discard
from .solvers import GptqSettings


class WeightFiles:
    """Every tensor of a directory's safetensors files by name, read one at a time.

    Each read opens its shard and closes it again: a shard kept open stays mapped, and the pages of every block
    read through the mapping would count as resident until the end."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{directory} holds no .safetensors files; streaming reads safetensors shards")
        self.where: dict[str, Path] = {}
        for file in files:
            try:
                with safe_open(str(file), "pt") as handle:
                    keys = list(handle.keys())
            except Exception as error:  # safetensors raises its own types on damaged headers
                raise ModelLoadError(f"cannot read {file}: {first_line(error)}; check that the file is complete") from error
            for key in keys:
                if key in self.where:
                    raise ModelLoadError(f"{directory} holds {key} twice ({file.name} and {self.where[key].name})")
                self.where[key] = file

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        from safetensors import safe_open

        file = self.where.get(name)
        if file is None:
            raise ModelLoadError(f"the model's {name} is in none of its safetensors files; check that the directory "
                                 "is complete")
        with safe_open(str(file), "pt") as handle:
            stored = tuple(handle.get_slice(name).get_shape())
            if stored != tuple(shape):
                raise ModelLoadError(f"{name} is {list(stored)} in {file.name} but {list(shape)} in config.json")
            return handle.get_tensor(name).float()


def _materialize(model: nn.Module, names: list[str], files: WeightFiles, shapes: dict[str, tuple]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        set_module_tensor_to_device(model, name, "cpu", value=files.get(name, shapes[name]))


def _release(model: nn.Module, names: list[str]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        set_module_tensor_to_device(model, name, "meta")


def _empty_skeleton(directory: Path):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models.loader import quiet_transformers
    from .models.registry import adapter_for

    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(directory, local_files_only=True)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as error:
        raise ModelLoadError(f"could not build the model of {directory / 'config.json'}: {first_line(error)}") from error
    model.tie_weights()  # a tied head shares the embedding's (meta) weight, so it is read once
    adapter_for(model).prepare(model)
    return model.eval()


def _block_calls(model: nn.Module, windows: torch.Tensor):
    """The first block's inputs for every window and each block's keyword arguments, with every block standing aside
    (returning its input): blocks on the meta device cannot run, and their calls do not depend on their weights."""
    _, blocks = transformer_blocks(model)
    captured: list[torch.Tensor] = []
    calls: list[dict | None] = [None] * len(blocks)

    def stand_aside(index):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                captured.append(hidden.detach())
            if calls[index] is None:
                calls[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            elif index == 0:
                raise _StopBlock
            if index == len(blocks) - 1:
                raise _StopBlock  # the head is not needed
            return hidden
        return forward

    for index, block in enumerate(blocks):
        block.forward = stand_aside(index)
    try:
        forward_windows(model, windows)
    finally:
        for block in blocks:
            del block.forward
    return torch.cat(captured), calls


@torch.no_grad()
def quantize_streamed(
    source: str | Path,
    out: str | Path,
    format: str = "int4:g64:asym",
    *,
    solver: str = "gptq",
    calibration: str | Path | torch.Tensor | None = None,
    calibration_windows: int = defaults.CALIBRATION_WINDOWS,
    calibration_len: int = defaults.CALIBRATION_LEN,
    clip_search: bool = True,
    gptq: GptqSettings = GptqSettings(),
    embedding_format: str | None = None,
    progress: bool = True,
):
    """Quantize the Hugging Face model directory `source` (safetensors shards) to `format` by `solver`, block by
    block, into a packed checkpoint at `out`, never holding more than one block's weights. Returns the
    QuantizationReport and the SavedCheckpoint."""
    from transformers import AutoTokenizer

    from .models.loader import _weight_files, quiet_transformers

    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise ModelLoadError(f"{source} is not a model directory; streaming reads a Hugging Face directory of "
                             "safetensors shards")
    if solver not in defaults.SOLVERS:
        raise MixbitsError(f"unknown solver {solver!r}; use one of {', '.join(defaults.SOLVERS)}")
    check_output_directory(out)
    option = str(parse_format(format))
    embedding_option = KEEP if embedding_format in (None, KEEP) else str(parse_format(embedding_format))
    model = _empty_skeleton(source)
    _check_embedding(model, embedding_option)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception:  # a directory without a tokenizer is still a model (calibrate on token ids)
        tokenizer = None
    digest = sha256_files(_weight_files(source))  # as `load_model` names the directory
    loaded = LoadedModel(model, tokenizer, str(source), digest)
    prefix, blocks = transformer_blocks(model)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    outside = [name for name in shapes if not name.startswith(prefix + ".")]
    partial = out.with_name(out.name + ".partial")
    report = QuantizationReport(option, clip_search, solver, calibration=None, gptq=gptq)
    reset_peak()
    start = time.perf_counter()
    files = WeightFiles(source)
    _materialize(model, outside, files, shapes)
    model.tie_weights()  # a head tied to the embedding shares its weight again
    windows, report.calibration = calibration_data(loaded, calibration, calibration_windows, calibration_len)
    state = RunState(partial, {"run": "quantize", "stream": True, "model": digest, "option": option,
                               "solver": solver, "windows": sha256_tensor(windows), "clip_search": clip_search,
                               "gptq": gptq.as_dict()})
    inputs, calls = _block_calls(model, windows)
    floats = inputs  # the float model's block inputs (GPTAQ)
    choices = defaultdict(lambda: (option, solver))  # every layer alike
    for index, block in enumerate(tqdm(blocks, desc="stream blocks", disable=not progress, leave=False)):
        name, step = f"{prefix}.{index}", f"block-{index:04d}"
        names = [n for n in shapes if n.startswith(name + ".")]
        _materialize(model, names, files, shapes)
        original = copy.deepcopy(block) if solver == "gptaq" else None  # the float block, for GPTAQ's cross terms
        calibration_block = BlockCalibration(block, name, inputs, calls[index],
                                             None if original is None else (original, floats))
        kept = state.load(step)
        if kept is None or not restore_block(name, block, *kept, report):
            before = (len(report.layers), len(report.scaled), len(report.rounded_for_lack_of_tokens), len(report.tuning))
            _quantize_block(index, calibration_block, choices, report, None, None, None)
            state.save(step, *block_record(name, block, report, before))
        inputs = calibration_block.outputs()
        if original is not None:
            floats = calibration_block.reference_outputs()
            del original
        for layer in report.layers:  # the codes wait on disk; the next block needs only its inputs
            report.tensors.pop(layer.name, None)
        _release(model, names)
    if state.kept and progress:
        print(f"quantize: {len(state.kept)} finished blocks taken from {partial}", file=sys.stderr)
    _quantize_outer(model, embedding_option, report)
    report.seconds = time.perf_counter() - start
    report.peak_memory_bytes = peak_bytes()
    saved = _write(model, report, out, state, prefix, len(blocks), loaded)
    discard(partial)
    return report, saved


def _write(model, report, out: Path, state: RunState, prefix: str, blocks: int, loaded: LoadedModel):
    """The checkpoint from the kept blocks (read one tensor at a time) and the outer layers in memory."""
    stored: dict[str, dict] = {}
    floats: dict = {}
    for index in range(blocks):
        step = f"block-{index:04d}"
        for key, (dtype, shape) in state.tensors(step).items():
            lazy = Lazy(dtype, shape, lambda step=step, key=key: state.tensor(step, key))
            kind, _, rest = key.partition("/")
            if kind == "codes":
                layer, _, part = rest.rpartition("/")
                stored.setdefault(layer, {})[part] = lazy
            else:
                floats[f"{prefix}.{index}.{rest}"] = lazy
    modules = dict(model.named_modules())
    for layer in report.outer:
        stored[layer.name] = stored_layer(report.tensors[layer.name], modules[layer.name])
    outer_floats, tied = float_tensors(model, {f"{layer.name}.weight" for layer in report.outer}, skip=prefix)
    return write_checkpoint(out, model.config, loaded.tokenizer, report, stored, {**floats, **outer_floats}, tied,
                            source={"name": loaded.name, "sha256": loaded.sha256})

"""Packed checkpoints: a quantized model stored at its true size, and loaded back runnable.

A checkpoint is a directory:

    mixbits.json          format version, every quantized layer (format, shape, solver, bits), the
                          outer layers (embedding, a float head), the plan
    quantized.safetensors codes packed at their width and parameters in their stored dtypes
                          (`formats.storage`), and 16-bit layers and outer layers as float16
    float.safetensors     every other tensor of the model (norms, biases) as it was
    config.json, tokenizer files   the Hugging Face architecture and tokenizer
    manifest.json         sha256 and size of every other file

It is written under a temporary name and renamed into place, so a reader sees
a whole checkpoint or none. Loading checks the version and every file's size
and hash before reading any tensor, reads only JSON and safetensors (nothing
is unpickled), and rebuilds the model with runtime modules that compute from
the stored codes (`runtime`; a quantized embedding looks its rows up from
the codes, and a head tied to it computes from the same codes). Its outputs
equal those of the fake-quantized model that was saved, up to float
summation order. Version 1 checkpoints (embedding in float.safetensors, no
outer layers) still load.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import MixbitsError, ModelLoadError, first_line
from ..activations import parse_activation
from ..formats import parse_format
from ..formats.storage import restore, store
from ..hashing import sha256_file
from ..models.registry import adapter_for
from ..models.loaded import LoadedModel
from ..plan import KEEP
from ..schema import (COUNT, FILE_NAME, MODULE_NAME, SHA256, SHAPE, Field, ListOf, MapOf, Nullable, SchemaError,
                      check, optional, read_json)
from .safetensors_writer import nbytes, write_safetensors

VERSION = 3  # 2: outer layers (the embedding in 16 bits or quantized); 3: quantized inputs ("activation")
READABLE = (1, 2, 3)
INFO, MANIFEST = "mixbits.json", "manifest.json"
QUANTIZED, FLOAT = "quantized.safetensors", "float.safetensors"


class CheckpointError(ModelLoadError):
    """A checkpoint is missing, damaged, or from another version."""


MANIFEST_SCHEMA = {"mixbits_checkpoint": Field(int),
                   "files": Field(MapOf(FILE_NAME, {"bytes": Field(COUNT), "sha256": Field(SHA256)}))}
LAYER_SCHEMA = {"name": Field(MODULE_NAME), "option": Field(str), "solver": Field(str), "shape": Field(SHAPE),
                "bits": Field(COUNT), "activation": optional(str), "head_activation": optional(str)}
INFO_SCHEMA = {"mixbits_checkpoint": Field(int), "layers": Field(ListOf(LAYER_SCHEMA)),
               "outer": optional(ListOf(LAYER_SCHEMA)), "tied": Field(MapOf(MODULE_NAME, MODULE_NAME)),
               "source": optional(Nullable(dict)), "quantization": optional(Nullable(dict)), "plan": optional(Nullable(dict))}
def _read_json(path: Path, schema) -> dict:
    """The JSON object in `path`, checked against `schema`; CheckpointError (one line) if it is not one."""
    data = read_json(path, CheckpointError, f"{path} is missing; it is not a complete mixbits checkpoint",
                     f"{path} is not valid UTF-8 JSON ({{error}}); write the checkpoint again")
    try:
        check(data, schema, path.name)
    except SchemaError as error:
        raise CheckpointError(f"{path.parent}: {error}; write the checkpoint again") from None
    return data


@dataclass
class SavedCheckpoint:
    path: Path
    files: dict[str, int]  # name -> bytes
    quantized_bits: int  # exact bits of the quantized layers, as the formats count them

    quantized_bytes: int  # bytes of the quantized layers' tensors in quantized.safetensors (its header excluded)

    def as_dict(self) -> dict:
        return {"path": str(self.path), "files": self.files, "quantized_bytes": self.quantized_bytes,
                "quantized_bits": self.quantized_bits}


def check_output_directory(directory: str | Path) -> None:
    """Refuse, before any work, to write a checkpoint over something that is not one."""
    directory = Path(directory)
    if directory.exists() and not (directory.is_dir() and (is_checkpoint(directory) or not any(directory.iterdir()))):
        raise MixbitsError(f"{directory} exists and is not a mixbits checkpoint; choose a new --out directory")


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / INFO).is_file()


def save_quantized(model: nn.Module | LoadedModel, report, directory: str | Path, *, tokenizer=None,
                   plan=None, source: dict | None = None) -> SavedCheckpoint:
    """Write the model `report` came from as a packed checkpoint in `directory` (replaced if a checkpoint)."""
    if isinstance(model, LoadedModel):
        tokenizer = tokenizer or model.tokenizer
        source = source or {"name": model.name, "sha256": model.sha256}
        model = model.model
    directory = Path(directory)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise MixbitsError("saving a checkpoint needs a Hugging Face model (one with a .config); save the state dict instead")
    if any(type(m).__name__ == "RotatedInput" for m in model.modules()):
        raise MixbitsError("checkpoints cannot hold an online Hadamard rotation yet; quantize without --online-hadamard to save")
    if not report.layers:
        raise MixbitsError("the report holds no quantized layers; quantize the model before saving it")
    check_output_directory(directory)

    modules = dict(model.named_modules())
    stored = {layer.name: stored_layer(report.tensors[layer.name], modules[layer.name])
              for layer in report.layers + report.outer}
    replaced = {f"{layer.name}.weight" for layer in report.layers + report.outer}
    floats, tied = float_tensors(model, replaced)
    return write_checkpoint(directory, config, tokenizer, report, stored, floats, tied, plan, source)


def stored_layer(quantized, module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a layer is stored as: its codes and parameters, or its weight in float16 (kept in 16 bits)."""
    return store(quantized) if quantized is not None else {"weight": module.weight.detach().half().contiguous()}


def write_checkpoint(directory: Path, config, tokenizer, report, stored: dict[str, dict], floats: dict, tied: dict,
                     plan=None, source: dict | None = None) -> SavedCheckpoint:
    """Write a checkpoint from its parts: each layer's stored tensors by name (`stored`, tensors or `Lazy` ones read
    as they are written), the float tensors and ties (`float_tensors`), the report's layers."""
    quantized: dict = {}
    entries: dict[str, list[dict]] = {"layers": [], "outer": []}
    layer_bytes = 0  # of the quantized layers alone
    for kind, reports in (("layers", report.layers), ("outer", report.outer)):
        for layer in reports:
            quantized.update({f"{layer.name}.{key}": value for key, value in stored[layer.name].items()})
            layer_bytes += sum(map(nbytes, stored[layer.name].values())) if kind == "layers" else 0
            entry = {"name": layer.name, "option": layer.option, "solver": layer.solver, "shape": list(layer.shape),
                     "bits": layer.bits}
            if getattr(layer, "activation", None):  # an embedding's: the input format of the head tied to it
                entry["head_activation" if kind == "outer" else "activation"] = layer.activation
            entries[kind].append(entry)
    layers = entries["layers"]
    info = {
        "mixbits_checkpoint": VERSION,
        "source": source,
        "layers": layers,
        "outer": entries["outer"],
        "tied": tied,
        "quantization": {key: value for key, value in report.as_dict().items() if key != "awq_scales"},
        "plan": None if plan is None else plan.as_dict(),
    }

    temporary = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        write_safetensors(temporary / QUANTIZED, quantized, {"mixbits_checkpoint": str(VERSION)})
        write_safetensors(temporary / FLOAT, floats, {"mixbits_checkpoint": str(VERSION)})
        (temporary / "config.json").write_text(config.to_json_string())
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        (temporary / INFO).write_text(json.dumps(info, indent=1) + "\n")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(temporary.iterdir())}
        (temporary / MANIFEST).write_text(json.dumps({"mixbits_checkpoint": VERSION, "files": files}, indent=1) + "\n")
        _replace_directory(temporary, directory)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    sizes = {name: entry["bytes"] for name, entry in files.items()}
    return SavedCheckpoint(directory, sizes, sum(layer["bits"] for layer in layers), layer_bytes)


@dataclass
class CheckpointContents:
    """A checkpoint as read and checked by `read_checkpoint`, before any model is built."""

    info: dict  # mixbits.json
    config: object  # the transformers config
    quantized: dict[str, torch.Tensor]  # quantized.safetensors
    floats: dict[str, torch.Tensor]  # float.safetensors
    layers: dict[str, object]  # each stored layer: its 16-bit weight, or its restored QuantizedTensor
    activations: dict[str, object]  # the input format of each quantized layer that has one


def read_checkpoint(directory: str | Path) -> CheckpointContents:
    """Every file of the checkpoint in `directory`, checked: sizes and hashes against the manifest, the JSON files
    against their schemas, then every layer and float tensor against a skeleton of the model built on the meta
    device (no memory). A damaged file fails in one line, and a hostile one cannot make a reader allocate more than
    the files hold."""
    directory = Path(directory)
    info = _checked_info(directory)
    config = _config(directory)
    skeleton = _build_model(config, directory, meta=True)
    quantized, floats = _tensors(directory)
    outer = info.get("outer", [])
    modules = dict(skeleton.named_modules())
    layers = {layer["name"]: _checked_layer(layer, layer in outer, modules, quantized, floats.get(f"{layer['name']}.bias"),
                                            directory) for layer in info["layers"] + outer}
    activations = {}
    for layer in info["layers"]:
        try:
            activations[layer["name"]] = _stored_activation(layer, "activation")
        except MixbitsError as error:
            raise CheckpointError(f"layer {layer['name']} of {directory}: {error}") from error
    expected = {key: value for key, value in skeleton.state_dict().items() if key.rpartition(".")[0] not in layers}
    rest = {key: value for key, value in floats.items()  # the stored layers' biases are checked with them
            if not (key.endswith(".bias") and key.rpartition(".")[0] in layers)}
    _check_floats(expected, rest, info["tied"], skeleton, directory)
    return CheckpointContents(info, config, quantized, floats, layers, activations)


def load_quantized(directory: str | Path) -> LoadedModel:
    """The model saved in `directory`, with runtime modules for its quantized layers; CheckpointError if damaged
    (everything is checked by `read_checkpoint` before the model is built)."""
    directory = Path(directory)
    contents = read_checkpoint(directory)
    info, floats = contents.info, dict(contents.floats)
    outer = info.get("outer", [])
    model = _build_model(contents.config, directory)
    modules = dict(model.named_modules())
    options = {layer["name"]: layer["option"] for layer in info["layers"] + outer}
    built: dict[str, nn.Module] = {}
    for name, stored in contents.layers.items():
        target = modules[name]
        module = _stored_module(options[name], stored, floats.pop(f"{name}.bias", None),
                                target if isinstance(target, nn.Embedding) else None, contents.activations.get(name))
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, module)
        built[name] = module
    tied = dict(info["tied"])
    _tie_to_quantized(model, tied, built, directory, outer)
    _load_floats(model, floats, tied, directory)
    del contents
    _return_freed_memory()
    tokenizer = _tokenizer(directory)
    source = info.get("source") or {}
    # The manifest holds every other file's hash, so its own hash identifies the checkpoint.
    return LoadedModel(model.eval(), tokenizer, f"{directory} ({source.get('name', 'unknown source')})",
                       sha256_file(directory / MANIFEST))


def _tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tensors of quantized.safetensors and float.safetensors (their headers checked by safetensors against the
    file's length, so no tensor is larger than its file)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(directory / QUANTIZED)), load_file(str(directory / FLOAT))
    except Exception as error:  # safetensors raises its own error types on malformed files
        raise CheckpointError(f"cannot read the tensors in {directory}: {first_line(error)}; write the checkpoint "
                              "again") from error


def _checked_layer(layer: dict, outer: bool, skeleton: dict[str, nn.Module], quantized: dict[str, torch.Tensor], bias,
                   directory: Path):
    """A layer of mixbits.json (and its float `bias`) checked against the modules of the model's skeleton: its
    16-bit weight, or its codes restored."""
    name, shape = layer["name"], tuple(layer["shape"])
    target = skeleton.get(name)
    embedding = isinstance(target, nn.Embedding)
    if not (isinstance(target, nn.Linear) or embedding and outer) or tuple(target.weight.shape) != shape:
        raise CheckpointError(f"layer {name} of {directory} does not match its config.json; write the checkpoint again")
    if (getattr(target, "bias", None) is None) != (bias is None) or bias is not None and (
            tuple(bias.shape) != (shape[0],) or not bias.is_floating_point()):
        raise CheckpointError(f"layer {name} of {directory} has " + ("no bias stored" if bias is None else
                              f"a {bias.dtype} bias of shape {list(bias.shape)}") + " where the model's config has "
                              + ("none" if getattr(target, "bias", None) is None else f"one of {shape[0]}")
                              + "; write the checkpoint again")
    tensors = layer_tensors(quantized, name)
    if layer["option"] == KEEP:
        weight = tensors.get("weight")
        if weight is None or tuple(weight.shape) != shape or not weight.is_floating_point():
            raise CheckpointError(f"layer {name} of {directory} has no {shape[0]}x{shape[1]} 16-bit weight stored; "
                                  "write the checkpoint again")
        return weight
    try:
        return restore(parse_format(layer["option"]), shape, tensors)
    except MixbitsError as error:
        raise CheckpointError(f"layer {name} of {directory}: {error}") from error


def _stored_module(option: str, stored, bias, embedding: nn.Embedding | None, activation=None):
    """The runtime module of one stored layer: float (from its 16-bit weight) or computing from its codes (`stored`
    is the weight or the restored QuantizedTensor), its inputs rounded to `activation` if given.

    An `embedding` (the model's own module) keeps its class with a float weight, so whatever its forward adds
    (Gemma's sqrt(hidden) scale) stays; held as codes, its `embed_scale` goes with them.
    """
    from ..runtime import QuantizedEmbedding, quantized_linear
    from ..runtime.linear import with_activation

    if option == KEEP:
        weight = nn.Parameter(stored.float(), requires_grad=False)
        if embedding is not None:
            embedding.weight = weight
            return embedding
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        module.weight = weight
        if bias is not None:
            module.bias = nn.Parameter(bias.float(), requires_grad=False)
        return with_activation(module, activation)
    if embedding is not None:
        return QuantizedEmbedding(stored, getattr(embedding, "embed_scale", None))
    return quantized_linear(stored, bias, activation)


def _tie_to_quantized(model: nn.Module, tied: dict[str, str], built: dict[str, nn.Module], directory: Path,
                      info_outer: list[dict]) -> None:
    """A weight tied to a quantized embedding (the output head): its module computes from the same codes, its
    inputs quantized to the embedding entry's `head_activation` if that is given; such ties are taken out of
    `tied`."""
    from ..runtime import IntLinear, QuantizedEmbedding, quantized_linear
    from ..runtime.embedding import TiedEmbedding

    for alias, kept in list(tied.items()):
        owner = built.get(kept.rpartition(".")[0])
        if owner is None or not isinstance(owner, QuantizedEmbedding):
            continue
        module_name, _, attribute = alias.rpartition(".")
        target = model.get_submodule(module_name) if module_name else None
        if attribute != "weight" or not isinstance(target, nn.Linear) or target.bias is not None:
            raise CheckpointError(f"{alias} in {directory} is tied to the quantized {kept} but is not a bias-free "
                                  "Linear's weight; write the checkpoint again")
        parent, _, child = module_name.rpartition(".")
        outer = next((entry for entry in info_outer if entry["name"] == kept.rpartition(".")[0]), {})
        try:
            activation = _stored_activation(outer, "head_activation")
        except MixbitsError as error:
            raise CheckpointError(f"{directory}: {error}") from error
        head = quantized_linear(owner.quantized(), None, activation)
        setattr(model.get_submodule(parent) if parent else model, child, head)
        # The embedding reads its rows from the head's codes (held once) where those rows are exactly the stored
        # ones: not for integer zero points, whose offset -z * s the head holds in float, nor for a rounded table.
        if isinstance(head, IntLinear) and head.exact and (head.center is not None
                                                           or getattr(head.format, "min", None) is not None):
            embed_parent, _, embed_child = kept.rpartition(".")[0].rpartition(".")
            setattr(model.get_submodule(embed_parent) if embed_parent else model, embed_child,
                    TiedEmbedding(head, owner.embed_scale))
        del tied[alias]


def _stored_activation(entry: dict, key: str):
    """The activation format an entry of mixbits.json names under `key`, or None; a MixbitsError if malformed."""
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MixbitsError(f"{entry.get('name', 'a layer')}'s {key} must be a format string, got {value!r}; "
                           "write the checkpoint again")
    try:
        fmt = parse_activation(value)
    except MixbitsError as error:
        raise MixbitsError(f"{entry.get('name', 'a layer')}'s {key}: {error}") from None
    if getattr(fmt, "value", 0) is None:
        raise MixbitsError(f"{entry.get('name', 'a layer')}'s {key} {value!r} has no scale (int8:static=SCALE); "
                           "write the checkpoint again")
    return fmt


def layer_tensors(quantized: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The stored tensors of layer `name` in quantized.safetensors, keyed without the layer's prefix."""
    prefix = name + "."
    return {key[len(prefix):]: value for key, value in quantized.items() if key.startswith(prefix)}


def checkpoint_info(directory: str | Path) -> dict:
    """The checkpoint's mixbits.json, after the same checks as loading."""
    return _checked_info(Path(directory))


def float_tensors(model: nn.Module, replaced: set[str], skip: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every state-dict tensor not in `replaced` (nor under `skip.`), each storage once; `tied` maps a duplicate
    name to the one kept.

    A tensor sharing its storage with a replaced one (a head tied to a stored embedding) is tied to it.
    """
    state = {name: tensor for name, tensor in model.state_dict(keep_vars=False).items()
             if skip is None or not name.startswith(skip + ".")}

    def key(tensor):
        return tensor.data_ptr(), tensor.numel(), tuple(tensor.shape)

    seen: dict[tuple[int, int, tuple], str] = {key(state[name]): name for name in replaced if name in state}
    floats: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    for name, tensor in state.items():
        if name in replaced:
            continue
        if key(tensor) in seen:
            tied[name] = seen[key(tensor)]
            continue
        seen[key(tensor)] = name
        floats[name] = tensor.detach().contiguous()
    return floats, tied


def _replace_directory(temporary: Path, directory: Path) -> None:
    """Move `temporary` to `directory`, replacing an old checkpoint there only after the new one is complete."""
    if not directory.exists():
        os.replace(temporary, directory)
        return
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    os.replace(directory, old)
    os.replace(temporary, directory)
    shutil.rmtree(old, ignore_errors=True)


def _manifest(directory: Path) -> dict[str, dict]:
    """The manifest's files (name -> bytes, sha256), after checking its version and that it lists the essentials."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; give the directory `mixbits quantize --out` wrote")
    if not (directory / MANIFEST).is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}; it is not a complete mixbits checkpoint")
    manifest = _read_json(directory / MANIFEST, MANIFEST_SCHEMA)
    files = manifest["files"]
    if manifest.get("mixbits_checkpoint") not in READABLE:
        raise CheckpointError(f"{directory} is a version {manifest.get('mixbits_checkpoint')!r} checkpoint; this mixbits "
                              f"reads versions {', '.join(map(str, READABLE))}: quantize again with this version")
    for name in (INFO, QUANTIZED, FLOAT, "config.json"):
        if name not in files:
            raise CheckpointError(f"{directory}'s manifest lists no {name}; write the checkpoint again")
    return files


def _checked_info(directory: Path) -> dict:
    files = _manifest(directory)
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, write it again")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(f"{path} has {size} bytes, the manifest says {entry.get('bytes')}: it is truncated "
                                  "or changed; write the checkpoint again")
        if sha256_file(path) != entry.get("sha256"):
            raise CheckpointError(f"{path} does not match its sha256 in the manifest; the file is damaged, write the checkpoint again")
    info = _read_json(directory / INFO, INFO_SCHEMA)
    if info["mixbits_checkpoint"] not in READABLE:
        raise CheckpointError(f"{directory / INFO} is version {info['mixbits_checkpoint']!r}, this mixbits reads "
                              f"{', '.join(map(str, READABLE))}; quantize again with this version")
    names = [layer["name"] for layer in info["layers"] + info.get("outer", [])]
    if len(set(names)) != len(names):
        raise CheckpointError(f"{directory / INFO} names a layer twice; write the checkpoint again")
    return info


def _config(directory: Path):
    """config.json, checked against CONFIG_SCHEMA (sizes bounded) and read by transformers."""
    from transformers import AutoConfig

    from ..models.loader import CONFIG_SCHEMA, quiet_transformers

    _read_json(directory / "config.json", CONFIG_SCHEMA)
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as error:  # transformers raises many types on configs it cannot read
        raise CheckpointError(f"cannot read {directory / 'config.json'}: {first_line(error)}; write the checkpoint "
                              "again") from error


def _build_model(config, directory: Path, meta: bool = False) -> nn.Module:
    """The architecture of `config` with uninitialised weights (they are all loaded next), or on the meta device
    (shapes only, no memory); its layers as they were saved (stacked experts as Linears)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from ..models.loader import quiet_transformers

    try:
        with quiet_transformers(), no_init_weights(), torch.device("meta") if meta else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        adapter_for(model).prepare(model)
    except Exception as error:  # a config transformers reads but cannot build
        raise CheckpointError(f"cannot build the model of {directory / 'config.json'}: {first_line(error)}") from error
    return model


def _check_floats(expected: dict[str, torch.Tensor], floats: dict[str, torch.Tensor], tied: dict[str, str],
                  skeleton: nn.Module, directory: Path) -> None:
    """float.safetensors and the ties hold exactly the `expected` tensors (the skeleton's, beyond the stored
    layers), each a float tensor of its shape; a tie names a tensor the checkpoint holds."""
    names = set(floats) | set(tied)
    missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which the model does not"
        raise CheckpointError(f"{directory / FLOAT} {what} ({len(missing)} missing, {len(unexpected)} unexpected); "
                              "write the checkpoint again")
    for key, value in floats.items():
        if tuple(value.shape) != tuple(expected[key].shape) or not value.is_floating_point():
            raise CheckpointError(f"{directory / FLOAT}'s {key} is {value.dtype} {list(value.shape)}, the model's is "
                                  f"float {list(expected[key].shape)}; write the checkpoint again")
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    for alias, kept in tied.items():
        if alias not in params or kept not in floats and kept not in params or kept in tied:
            raise CheckpointError(f"{directory / INFO} ties {alias} to {kept}, which the checkpoint does not hold; "
                                  "write the checkpoint again")
        if tuple(params[alias].shape) != tuple((floats[kept] if kept in floats else params[kept]).shape):
            raise CheckpointError(f"{directory / INFO} ties {alias} to {kept} of another shape; write the checkpoint "
                                  "again")


def _load_floats(model: nn.Module, floats: dict[str, torch.Tensor], tied: dict[str, str], directory: Path) -> None:
    """Put the (checked) float tensors and ties into the built model."""
    model.load_state_dict(floats, strict=False, assign=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, kept in tied.items():
        module_name, _, attribute = alias.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attribute, params[kept] if kept in params else floats[kept])


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc keeps them after the unpacking's temporaries).

    Without it, the resident memory of a loaded int8 model measured 860 MiB,
    more than the float32 model's.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _tokenizer(directory: Path):
    from transformers import AutoTokenizer

    from ..models.loader import quiet_transformers

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception:  # a checkpoint saved without a tokenizer is still a model
        return None

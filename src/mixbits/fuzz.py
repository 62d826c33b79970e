"""Seeded mutation of every kind of file mixbits reads, to show that its loaders refuse damage in one line.

Each target holds a small valid file set (a checkpoint, a plan, a sensitivity file, a GGUF, all of a tiny
random model) and a loader that goes the way a user's command goes. A trial makes one random edit, of the kind a
hand edit, a buggy writer or a hostile file makes (values replaced by other types, keys deleted, strings and
numbers changed, entries duplicated, bytes flipped, header words overwritten), runs the loader, and restores the
file. A checkpoint's manifest is rewritten to match the edited file, so the edit gets past the hashes. Every
trial must end loaded or refused with a one-line MixbitsError; anything else is counted as raw, with its message.

    outcome = fuzz(checkpoint_target(workdir), mutations=1000, seed=0)

Used by tests/test_loader_fuzz.py, tests/test_cli.py and bench/fuzz_loaders.py.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import shutil
import struct
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import MixbitsError

ODD_VALUES = [None, 0, -1, 1, 2**40, 2**63, 1.5, float("nan"), float("inf"), -1e308, True, "", "x", "é\u0000",
              "\udcff", "int4:g32:asym", "fp16", "../../etc/passwd", "/tmp/x", "model.layers.0", "kl", [], [1],
              [2**31, 2**31], [0, 64], {}, {"name": 1}, "a" * 300]
STRING_EDITS = ["", "9", ":", ".", "/", "..", "\u00ff", "0" * 12, "-1"]


@dataclass
class Outcome:
    target: str
    trials: int = 0
    loaded: int = 0
    refused: int = 0
    raw: list[str] = field(default_factory=list)  # "trial N (what was edited): Type: message", one per raw failure
    seconds: float = 0.0
    refusals: dict[str, int] = field(default_factory=dict)  # the start of each refusal message, counted


@dataclass
class Target:
    """Files to damage and the loader that reads them: `mutate(rng)` is a context manager that edits one file,
    yields a description of the edit, and restores the file on exit; `load()` reads the files as a command does;
    `written()` lists files the loader wrote (checked empty after a refusal)."""

    name: str
    mutate: Callable[[random.Random], contextlib.AbstractContextManager[str]]
    load: Callable[[], Any]
    written: Callable[[], list[str]] = lambda: []


def fuzz(target: Target, mutations: int, seed: int = 0) -> Outcome:
    rng = random.Random(seed)
    outcome = Outcome(target.name)
    start = time.perf_counter()
    for trial in range(mutations):
        with target.mutate(rng) as edit, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                target.load()
                outcome.loaded += 1
            except MixbitsError as error:
                message = str(error)
                if "\n" in message or not message:
                    outcome.raw.append(f"trial {trial} ({edit}): {type(error).__name__} of {message.count(chr(10)) + 1} "
                                       f"lines: {message[:200]!r}")
                else:
                    outcome.refused += 1
                    key = _message_kind(message)
                    outcome.refusals[key] = outcome.refusals.get(key, 0) + 1
                left = target.written()
                if left:
                    outcome.raw.append(f"trial {trial} ({edit}): refused but wrote {left[0]}")
            except Exception as error:  # noqa: BLE001 - what the fuzzing is looking for
                outcome.raw.append(f"trial {trial} ({edit}): {type(error).__name__}: {str(error)[:200]}")
        outcome.trials += 1
    outcome.seconds = time.perf_counter() - start
    return outcome


def _message_kind(message: str) -> str:
    """A refusal's message without its paths and values: what kind of check refused."""
    words = [w for w in message.split() if "/" not in w and not any(c.isdigit() for c in w)]
    return " ".join(words[:8])


# ---- edits


def json_nodes(value, path=()) -> Iterator[tuple[tuple, Any]]:
    """Every (path, value) in a JSON tree."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_nodes(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from json_nodes(item, path + (index,))


def mutate_json(data, rng: random.Random):
    """A copy of JSON `data` with one random edit."""
    data = copy.deepcopy(data)
    path, value = rng.choice(list(json_nodes(data)))
    if not path:
        return rng.choice(ODD_VALUES)
    parent = data
    for step in path[:-1]:
        parent = parent[step]
    key, edit = path[-1], rng.randrange(6)
    if edit == 0 and isinstance(parent, dict):
        del parent[key]
    elif edit == 1 and isinstance(value, str) and value:
        at = rng.randrange(len(value))
        parent[key] = value[:at] + rng.choice(STRING_EDITS) + value[at + 1:]
    elif edit == 2 and isinstance(parent, list):
        parent.insert(rng.randrange(len(parent) + 1), copy.deepcopy(value))
    elif edit == 3 and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = rng.choice([value + 1, value - 1, -value, value * 1000, 0, value / 3])
    elif edit == 4 and isinstance(parent, dict):  # a key renamed
        parent[key + rng.choice(["_", "s", "\u00e9"]) if isinstance(key, str) else key] = parent.pop(key)
    else:
        parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
    return data


def flip_bytes(content: bytes, rng: random.Random, end: int | None = None) -> bytes:
    """`content` with one to three bytes in [0, end) set to random values."""
    data = bytearray(content)
    for _ in range(rng.randrange(1, 4)):
        data[rng.randrange(end or len(data))] = rng.randrange(256)
    return bytes(data)


def mutate_json_bytes(content: bytes, rng: random.Random) -> bytes:
    """A JSON file's bytes edited: mostly one JSON edit, sometimes bytes flipped (invalid JSON or UTF-8)."""
    if rng.random() < 0.15:
        return flip_bytes(content, rng)
    return json.dumps(mutate_json(json.loads(content), rng), allow_nan=True).encode()


def mutate_safetensors(content: bytes, rng: random.Random) -> bytes:
    """A safetensors file with its header edited (as JSON, or its bytes and length word flipped); data unchanged."""
    length = struct.unpack("<Q", content[:8])[0]
    header, body = content[8:8 + length], content[8 + length:]
    if rng.random() < 0.2:
        return flip_bytes(content[:8 + length], rng) + body
    text = json.dumps(mutate_json(json.loads(header), rng), allow_nan=True).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def mutate_gguf(content: bytes, rng: random.Random, header_end: int) -> bytes:
    """A GGUF with its header (metadata and tensor descriptions, before `header_end`) damaged: bytes flipped, or a
    little-endian word overwritten with an odd count (lengths, dimensions, offsets and types are such words)."""
    if rng.random() < 0.5:
        return flip_bytes(content, rng, header_end)
    width = rng.choice([4, 8])
    at = rng.randrange(0, header_end - width)
    value = rng.choice([0, 1, 2, 3, 255, 2**31 - 1, 2**32 - 1, 2**40, 2**62, 2**64 - 1])
    value &= (1 << (8 * width)) - 1
    return content[:at] + value.to_bytes(width, "little") + content[at + width:]


@contextlib.contextmanager
def _replaced(files: dict[Path, bytes]) -> Iterator[None]:
    """Write `files`, then put back what each held (deleting those that did not exist)."""
    before = {path: path.read_bytes() if path.exists() else None for path in files}
    try:
        for path, content in files.items():
            path.write_bytes(content)
        yield
    finally:
        for path, content in before.items():
            if content is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(content)


# ---- targets: each builds its files from a tiny random model in `workdir`


def _tiny(seed: int = 0):
    from .models.tiny import tiny_model

    return tiny_model("llama", seed=seed, tie_word_embeddings=True)


def _windows():
    import torch

    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def checkpoint_target(workdir: Path) -> Target:
    """A tiny checkpoint (q4_0, its embedding q8_0 and tied head, int8 inputs) loaded by `load_quantized` and run,
    with mixbits.json, manifest.json, config.json or a safetensors header edited and the manifest rewritten to
    match."""
    import torch

    import mixbits
    from .io.checkpoint import load_quantized, save_quantized

    directory = Path(workdir) / "checkpoint"
    if not directory.exists():
        model = _tiny()
        report = mixbits.quantize(model, "q4_0", calibration=_windows(), embedding_format="q8_0",
                                  activation="int8:g32", progress=False)
        save_quantized(model, report, directory)
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    names = ["mixbits.json"] * 3 + ["manifest.json", "config.json", "config.json", "quantized.safetensors",
                                    "float.safetensors"]

    @contextlib.contextmanager
    def mutate(rng):
        name = rng.choice(names)
        original = (directory / name).read_bytes()
        if name.endswith(".safetensors"):
            content = mutate_safetensors(original, rng)
        else:
            content = mutate_json_bytes(original, rng)
        files = {directory / name: content}
        if name != "manifest.json":
            entry = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
            files[manifest_path] = json.dumps({**manifest, "files": {**manifest["files"], name: entry}}).encode()
        with _replaced(files):
            yield name

    ids = torch.arange(8).reshape(1, 8)

    def load():  # loaded means usable: it also runs
        with torch.no_grad():
            load_quantized(directory).model(ids)

    return Target("checkpoint", mutate, load)


def plan_target(workdir: Path) -> Target:
    """A plan of a tiny model's layers (formats and solvers mixed, a tie group, input formats) applied by
    `mixbits.quantize(model, plan=...)` as `mixbits quantize --plan` does."""
    import mixbits
    from .models.structure import quantizable_linears
    from .plan import LayerPlan, Plan

    path = Path(workdir) / "plan.json"
    pristine = _tiny()
    options = ["q4_0", "int3:g32:asym", "q8_0", "fp16", "nf4:g64"]
    layers = []
    for index, (name, linear) in enumerate(quantizable_linears(pristine)):
        group = name.rpartition(".")[0] + ".qkv" if name.endswith(("q_proj", "k_proj", "v_proj")) else name
        tied = group.endswith(".qkv")
        layers.append(LayerPlan(name, group, "q4_0" if tied else options[index % len(options)],
                                "gptq" if tied or index % 2 else "rtn", tuple(linear.weight.shape), 0.01,
                                "int8:g32" if index % 3 == 0 else None))
    if not path.exists():
        Plan(layers, {"name": "tiny llama"}, {"bits_per_weight": 4.0}).save(path)
    windows = _windows()

    @contextlib.contextmanager
    def mutate(rng):
        with _replaced({path: mutate_json_bytes(path.read_bytes(), rng)}):
            yield "plan.json"

    def load():
        plan = Plan.load(path)
        mixbits.quantize(copy.deepcopy(pristine), plan=plan, calibration=windows, progress=False)

    return Target("plan", mutate, load)


def sensitivity_target(workdir: Path) -> Target:
    """A tiny model's sensitivity file (proxy and KL damages, the embedding measured) reused by `plan_for_budget`
    as `mixbits plan --sensitivity FILE` does, at a bit budget and a whole-model byte budget."""
    from .allocate import Budget
    from .menu import parse_menu
    from .models.loader import load_model
    from .planning import plan_for_budget

    path = Path(workdir) / "sensitivity.json"
    loaded = load_model(_tiny())
    menu = parse_menu("int2:g32:asym,int3:g32:asym,q4_0,q8_0")
    settings = dict(calibration=_windows(), kl_windows=2, kl_len=16, fisher_windows=2, progress=False)
    if not path.exists():
        plan_for_budget(loaded, Budget(3.0, scope="model"), menu, sensitivity=path, **settings)
    original = path.read_bytes()

    @contextlib.contextmanager
    def mutate(rng):
        with _replaced({path: mutate_json_bytes(original, rng)}):
            yield "sensitivity.json"

    def load():
        for budget, damage in ((Budget(3.0), "kl"), (Budget(3.5, scope="model"), "proxy")):
            plan_for_budget(loaded, budget, menu, sensitivity=path, damage=damage, **settings)
            if path.read_bytes() != original:  # options it lacked were measured and written back: start again
                path.write_bytes(original)

    return Target("sensitivity", mutate, load)


def gguf_target(workdir: Path) -> Target:
    """A tiny model's GGUF (q8_0, a 64-token vocabulary) loaded by `load_model` as every command loads a .gguf,
    with its metadata or tensor descriptions damaged; the conversion cache is a directory of its own, which a
    refusal must leave empty."""
    import gguf

    import mixbits
    from .io.checkpoint import save_quantized
    from .io.gguf import export_gguf
    from .models.loader import load_model
    from .models.tiny import tiny_vocabulary_gguf

    workdir = Path(workdir)
    path = workdir / "model.gguf"
    if not path.exists():
        vocabulary = workdir / "vocabulary.gguf"
        tiny_vocabulary_gguf(vocabulary)
        model = _tiny()
        save_quantized(model, mixbits.quantize(model, "q8_0", progress=False), workdir / "gguf-checkpoint")
        export_gguf(workdir / "gguf-checkpoint", path, tokenizer_gguf=vocabulary)
    original = path.read_bytes()
    header_end = gguf.GGUFReader(str(path)).data_offset
    cache = workdir / "gguf-cache"

    @contextlib.contextmanager
    def mutate(rng):
        with _replaced({path: mutate_gguf(original, rng, header_end)}):
            yield "model.gguf"

    def load():
        shutil.rmtree(cache, ignore_errors=True)
        previous = os.environ.get("MIXBITS_CACHE")
        os.environ["MIXBITS_CACHE"] = str(cache)
        try:
            load_model(path)
        finally:
            if previous is None:
                del os.environ["MIXBITS_CACHE"]
            else:
                os.environ["MIXBITS_CACHE"] = previous

    def written():
        return [str(p) for p in cache.rglob("*")] if cache.exists() else []

    return Target("gguf", mutate, load, written)


TARGETS = {"checkpoint": checkpoint_target, "plan": plan_target, "sensitivity": sensitivity_target,
           "gguf": gguf_target}

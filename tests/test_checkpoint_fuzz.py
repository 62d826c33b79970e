"""Damaged checkpoints whose manifest was rewritten to match (a hand edit, a buggy writer): every one loads or
fails with a one-line MixbitsError, never a raw exception.

A seeded mutator edits mixbits.json or manifest.json (values replaced by other types, keys deleted, strings
changed, entries duplicated, bytes flipped) and rewrites the manifest's size and hash of the edited file.
"""

import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mixbits
from mixbits.errors import MixbitsError
from mixbits.hashing import sha256_file
from mixbits.io.checkpoint import load_quantized, save_quantized

MUTATIONS = int(__import__("os").environ.get("MIXBITS_FUZZ_MUTATIONS", "150"))
ODD_VALUES = [None, 0, -1, 1, 2**40, 1.5, float("nan"), True, "", "x", "é\u0000", "int4:g32:asym", "../../etc",
              "model.layers.0", [], [1], {}, {"name": 1}, "a" * 300]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    windows = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    report = mixbits.quantize(model, "q4_0", calibration=windows, embedding_format="q8_0", activation="int8:g32",
                              progress=False)
    directory = tmp_path_factory.mktemp("fuzz") / "ckpt"
    save_quantized(model, report, directory)
    return directory


def nodes(value, path=()):
    """Every (path, value) in a JSON tree."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from nodes(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from nodes(item, path + (index,))


def mutated(data, rng: random.Random):
    """A copy of JSON `data` with one random edit."""
    data = json.loads(json.dumps(data))
    path, value = rng.choice(list(nodes(data)))
    if not path:
        return rng.choice(ODD_VALUES)
    parent = data
    for step in path[:-1]:
        parent = parent[step]
    key, edit = path[-1], rng.randrange(5)
    if edit == 0 and isinstance(parent, dict):
        del parent[key]
    elif edit == 1 and isinstance(value, str) and value:
        at = rng.randrange(len(value))
        parent[key] = value[:at] + rng.choice(["", "9", ":", ".", "\u00ff", "0" * 12]) + value[at + 1:]
    elif edit == 2 and isinstance(parent, list):
        parent.insert(rng.randrange(len(parent) + 1), json.loads(json.dumps(value)))
    elif edit == 3 and isinstance(value, int) and not isinstance(value, bool):
        parent[key] = rng.choice([value + 1, value - 1, -value, value * 1000, 0])
    else:
        parent[key] = rng.choice(ODD_VALUES)
    return data


def rewrite(directory, name: str, content: bytes) -> None:
    (directory / name).write_bytes(content)
    if name != "manifest.json":
        manifest = json.loads((directory / "manifest.json").read_text())
        manifest["files"][name] = {"bytes": len(content), "sha256": sha256_file(directory / name)}
        (directory / "manifest.json").write_text(json.dumps(manifest))


def test_mutated_checkpoints_load_or_fail_in_one_line(checkpoint, tmp_path):
    import shutil

    rng = random.Random(0)
    work = tmp_path / "ckpt"
    raw, loaded, failed = [], 0, 0
    for trial in range(MUTATIONS):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(checkpoint, work)
        name = rng.choice(["mixbits.json", "mixbits.json", "mixbits.json", "manifest.json"])
        text = (work / name).read_bytes()
        if rng.random() < 0.15:  # bytes flipped: invalid JSON or UTF-8
            data = bytearray(text)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            content = bytes(data)
        else:
            content = json.dumps(mutated(json.loads(text), rng), allow_nan=True).encode()
        rewrite(work, name, content)
        try:
            load_quantized(work)
            loaded += 1
        except MixbitsError as error:
            assert "\n" not in str(error)
            failed += 1
        except Exception as error:  # noqa: BLE001 - what the test is looking for
            raw.append(f"trial {trial} ({name}): {type(error).__name__}: {error}")
    assert not raw, f"{len(raw)} raw exceptions of {MUTATIONS}:\n" + "\n".join(raw[:10])
    assert failed > MUTATIONS // 3  # the mutator does damage: most edits are refused

"""Damaged inputs to every loader (mixbits.fuzz): each ends loaded or refused with a one-line MixbitsError.

The mutator is seeded; MIXBITS_FUZZ_MUTATIONS sets the trials per target (bench/fuzz_loaders.py runs 100,000).
"""

import os

import pytest

from mixbits.fuzz import TARGETS, fuzz, mutate_json

MUTATIONS = int(os.environ.get("MIXBITS_FUZZ_MUTATIONS", "100"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("name", list(TARGETS))
def test_damaged_files_load_or_are_refused_in_one_line(name, workdir):
    target = TARGETS[name](workdir)
    target.load()  # the pristine files load
    outcome = fuzz(target, MUTATIONS, seed=1)
    assert not outcome.raw, f"{len(outcome.raw)} raw failures of {MUTATIONS}:\n" + "\n".join(outcome.raw[:10])
    assert outcome.refused > MUTATIONS // 3  # the mutator does damage: most edits are refused
    assert outcome.loaded + outcome.refused == MUTATIONS


def test_the_mutator_changes_one_thing():
    import random

    data = {"a": [1, 2, {"b": "text"}], "c": 3.5}
    rng = random.Random(0)
    changed = [mutate_json(data, rng) for _ in range(200)]
    assert data == {"a": [1, 2, {"b": "text"}], "c": 3.5}  # the original is untouched
    assert sum(c != data for c in changed) > 150


# Damage the random mutator finds only sometimes, each checked once on purpose.


def _rewritten(directory, name, edit):
    """Apply `edit` to the JSON file `name` of a checkpoint and rewrite the manifest to match."""
    import hashlib
    import json

    path = directory / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(num_hidden_layers=10**6), "num_hidden_layers must be a positive integer up to 1024"),
    (lambda c: c.update(hidden_size=2**20), "does not match its config.json"),  # a consistent skeleton, no memory
    (lambda c: c.update(vocab_size=2**24), "does not match its config.json"),
])
def test_a_config_with_absurd_sizes_is_refused_before_anything_is_built(edit, message, workdir, tmp_path):
    import shutil

    from mixbits.io.checkpoint import CheckpointError, load_quantized

    TARGETS["checkpoint"](workdir)
    directory = tmp_path / "ckpt"
    shutil.copytree(workdir / "checkpoint", directory)
    _rewritten(directory, "config.json", edit)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(directory)


def test_a_gguf_lacking_a_weight_is_refused_not_filled_at_random(workdir, tmp_path, monkeypatch):
    """transformers initialises weights a GGUF lacks at random and goes on; mixbits must refuse the file."""
    import gguf

    from mixbits.errors import ModelLoadError
    from mixbits.models.loader import load_model

    TARGETS["gguf"](workdir)
    content = bytearray((workdir / "model.gguf").read_bytes())
    at = content.find(b"blk.0.attn_k.weight")
    content[at:at + 3] = b"blq"  # a tensor name no architecture has
    path = tmp_path / "damaged.gguf"
    path.write_bytes(bytes(content))
    assert any(t.name.startswith("blq.0") for t in gguf.GGUFReader(str(path)).tensors)
    monkeypatch.setenv("MIXBITS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match="lacks 1 of the model's weights"):
        load_model(path)
    assert not any((tmp_path / "cache").rglob("*.safetensors"))


def test_the_gguf_header_reader_agrees_with_gguf_py(workdir):
    import gguf

    from mixbits.io.gguf_header import read_gguf_header

    TARGETS["gguf"](workdir)
    path = workdir / "model.gguf"
    header, reader = read_gguf_header(path), gguf.GGUFReader(str(path))
    assert header.data_offset == reader.data_offset
    assert [(t.name, t.shape, t.ggml_type, header.data_offset + t.offset, t.nbytes) for t in header.tensors] == \
        [(t.name, tuple(int(n) for n in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
         for t in reader.tensors]
    for key in ("llama.block_count", "llama.embedding_length", "general.architecture"):
        assert header.metadata[key] == reader.fields[key].contents()
    assert header.metadata["tokenizer.ggml.tokens"] == ("array", 8, len(reader.fields["tokenizer.ggml.tokens"].contents()))


def _gguf_word(content: bytes, after: bytes, skip: int, width: int, value: int) -> bytes:
    """`content` with the little-endian word of `width` bytes, `skip` bytes after the first `after`, set to `value`."""
    at = content.index(after) + len(after) + skip
    return content[:at] + value.to_bytes(width, "little") + content[at + width:]


@pytest.mark.parametrize("after, skip, width, value, message", [
    (b"tokenizer.ggml.tokens", 8, 8, 2**62, "more than the"),  # the token array's count (after type, item type)
    (b"token_embd.weight", 4, 8, 2**33, "ends at byte"),  # its first dimension: 2^39 values
    (b"token_embd.weight", 4, 8, 2**40, "has shape"),  # 2^46 values
    (b"token_embd.weight", 0, 4, 5, "has 5 dimensions"),
    (b"token_embd.weight", 4, 8, 0, "has shape"),
    (b"llama.block_count", 4, 4, 2**31 - 1, "num_hidden_layers must be"),  # a model of 2^31 blocks
    (b"llama.embedding_length", 4, 4, 4096, "describes a model of"),  # sizes the tensors do not hold
    (b"token_embd.weight", 4 + 2 * 8, 4, 999, "unknown GGML type 999"),  # its type, after two dimensions
])
def test_a_gguf_header_that_would_exhaust_memory_is_refused_at_once(after, skip, width, value, message, workdir,
                                                                    tmp_path, monkeypatch):
    """transformers trusts these words: a count of 2^62 or 2^31 blocks made it loop or allocate for many minutes."""
    from mixbits.errors import ModelLoadError
    from mixbits.models.loader import load_model

    TARGETS["gguf"](workdir)
    content = (workdir / "model.gguf").read_bytes()
    path = tmp_path / "damaged.gguf"
    path.write_bytes(_gguf_word(content, after, skip, width, value))
    monkeypatch.setenv("MIXBITS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=message) as refused:
        load_model(path)
    assert "\n" not in str(refused.value)
    assert not any((tmp_path / "cache").rglob("*"))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["groups"][0]["options"][0].update(kl=float("nan")), "must be a finite non-negative number"),
    (lambda s: s["groups"][0]["options"][0].update(bits=s["groups"][0]["options"][0]["bits"] + 1), "the file says"),
    (lambda s: s["groups"][0]["shapes"].pop(), "shapes"),
    (lambda s: s["groups"][1]["layers"].__setitem__(0, s["groups"][0]["layers"][0]), "another group"),
    (lambda s: s["groups"][0]["layers"].__setitem__(0, "model.layers.9.mlp.up_proj"), "this model does not have"),
])
def test_inconsistent_sensitivity_files_are_refused(edit, message, workdir):
    import json

    from mixbits.sensitivity import SensitivityError

    target = TARGETS["sensitivity"](workdir)
    path = workdir / "sensitivity.json"
    original = path.read_text()
    data = json.loads(original)
    edit(data)
    path.write_text(json.dumps(data))
    try:
        with pytest.raises(SensitivityError, match=message):
            target.load()
    finally:
        path.write_text(original)


def test_a_model_directory_whose_config_outgrows_its_weights_is_refused(tiny_llama_dir):
    """A config.json edited to 1000 blocks would have transformers build (and initialise) them all."""
    import json

    from mixbits.errors import ModelLoadError
    from mixbits.models.loader import load_model

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["num_hidden_layers"] = 1000
    (tiny_llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="describes a model of .* weights but holds"):
        load_model(tiny_llama_dir)

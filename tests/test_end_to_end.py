"""End-to-end checks on the real default model (SmolLM2-135M-Instruct), on few windows."""

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch

import mixbits
from mixbits.data import bos_token_id, eval_windows, load_text, tokenize
from mixbits.eval import ReferenceScores, score_windows
from mixbits.hashing import sha256_file
from mixbits.cache import cache_root
from mixbits.models.loader import MANIFEST, _cache_is_valid, default_gguf_path

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def loaded():
    return mixbits.load_model()


@pytest.fixture(scope="module")
def windows(loaded):
    return eval_windows(tokenize(load_text(), loaded.tokenizer), 4, 512)[0]


@pytest.fixture(scope="module")
def reference(loaded, windows):
    return ReferenceScores(loaded.model, windows, progress=False)


def test_default_model_shape(loaded):
    config = loaded.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert loaded.sha256 == sha256_file(default_gguf_path())
    assert bos_token_id(loaded.tokenizer) is None  # its GGUF says add_bos_token false: protocol windows are text only


def test_a_gguf_that_asks_for_a_bos_gets_one(tmp_path, monkeypatch):
    """transformers ignores tokenizer.ggml.add_bos_token; the loader honours it, as llama.cpp does."""
    import shutil
    import subprocess
    import sys

    monkeypatch.setenv("MIXBITS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "with-bos.gguf"
    shutil.copyfile(default_gguf_path(), path)
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_set_metadata", str(path), "tokenizer.ggml.add_bos_token",
                    "1", "--force"], check=True, capture_output=True)
    with_bos = mixbits.load_model(path)
    bos = with_bos.tokenizer.bos_token_id
    assert bos_token_id(with_bos.tokenizer) == bos is not None
    assert with_bos.tokenizer("hello")["input_ids"][0] == bos
    assert mixbits.load_model(path).tokenizer("hello")["input_ids"][0] == bos  # and so does the cache it left


def test_fp32_perplexity_is_sane(reference):
    # The full protocol (24 windows) gives 13.10; these 4 windows give about 9.8.
    assert 8.0 < reference.perplexity < 12.0


def test_int8_stays_close_and_int4_and_int3_degrade_in_order(loaded, windows, reference):
    results = {}
    for fmt in ("int8:ch:sym", "int4:g64:asym", "int3:g64:asym"):
        model = copy.deepcopy(loaded.model)
        mixbits.quantize(model, fmt, progress=False)
        results[fmt] = score_windows(model, windows, reference, progress=False)
    int8, int4, int3 = results.values()
    assert int8.perplexity == pytest.approx(reference.perplexity, rel=0.01)
    assert int8.kl < 0.005 and int8.agreement > 0.95
    assert reference.perplexity * 1.02 < int4.perplexity < int3.perplexity < reference.perplexity * 10
    assert int8.kl < int4.kl < int3.kl


def test_cli_main_job_reports_exact_bits_and_provenance(loaded):
    result = subprocess.run(
        [sys.executable, "-m", "mixbits", "quantize", "--format", "int8:ch:sym", "--windows", "2", "--window-len", "128",
         "--json"], capture_output=True, text=True, check=True)
    record = json.loads(result.stdout)
    shapes = [m.weight.shape for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    bits = sum(r * c * 8 + r * 16 for r, c in shapes)
    assert record["quantization"]["bits"] == bits
    assert record["quantization"]["bits_per_weight"] == bits / sum(r * c for r, c in shapes)
    assert record["model"]["sha256"] == loaded.sha256
    domains = record["evaluation"]["domains"]
    assert [d["name"] for d in domains] == ["pydoc", "austen", "kjv"]
    assert domains[0]["text_sha256"] == load_text().sha256
    assert domains[0]["windows"] == {"count": 2, "length": 128, "start": len(tokenize(load_text(), loaded.tokenizer)) // 2}
    assert all(d["kl"] < 0.01 for d in domains) and record["evaluation"]["mean"]["kl"] < 0.01
    assert record["versions"]["torch"].startswith("2.")


def test_corrupt_cache_is_rebuilt(loaded, tmp_path, monkeypatch):
    digest = loaded.sha256
    source = cache_root() / f"gguf-{digest}"
    monkeypatch.setenv("MIXBITS_CACHE", str(tmp_path))
    cache = tmp_path / f"gguf-{digest}"
    shutil.copytree(source, cache)
    weights = cache / "model.safetensors"
    with open(weights, "r+b") as handle:  # flip bytes in the middle of the tensor data
        handle.seek(weights.stat().st_size // 2)
        handle.write(b"\x00\x01\x02\x03")
    assert not _cache_is_valid(cache, digest)
    rebuilt = mixbits.load_model()
    assert _cache_is_valid(cache, digest)
    assert json.loads((cache / MANIFEST).read_text())["source_sha256"] == digest
    assert torch.equal(rebuilt.model.model.layers[15].mlp.down_proj.weight, loaded.model.model.layers[15].mlp.down_proj.weight)

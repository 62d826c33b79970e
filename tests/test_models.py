import copy
import json

import pytest
import torch

import mixbits
from mixbits.errors import MixbitsError, ModelLoadError
from mixbits.formats import parse_format
from mixbits.hashing import sha256_file
from mixbits.models import load_model, quantizable_linears
from mixbits.models.loader import CACHE_VERSION, MANIFEST, _cache_is_valid


def test_load_hugging_face_directory(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir)
    assert loaded.model.config.num_hidden_layers == 2
    assert loaded.tokenizer is None
    assert len(loaded.sha256) == 64
    assert load_model(tiny_llama_dir).sha256 == loaded.sha256


def test_load_in_memory_module_hashes_its_weights(tiny_llama_dir):
    module = load_model(tiny_llama_dir).model
    first = load_model(module).sha256
    with torch.no_grad():
        module.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    assert load_model(module).sha256 != first


def test_quantize_touches_only_block_linears_and_counts_their_bits(tiny_llama_dir):
    model = load_model(tiny_llama_dir).model
    embed = model.model.embed_tokens.weight.clone()
    up = model.model.layers[1].mlp.up_proj.weight.clone()
    report = mixbits.quantize(model, "int3:g16:asym", progress=False)
    names = [layer.name for layer in report.layers]
    assert len(names) == 14 and names[0] == "model.layers.0.self_attn.q_proj"
    fmt = parse_format("int3:g16:asym")
    assert report.bits == sum(fmt.bits(*m.weight.shape) for _, m in quantizable_linears(model))
    assert torch.equal(model.model.embed_tokens.weight, embed.half().float())  # the embedding is stored in 16 bits
    assert [(layer.name, layer.bits) for layer in report.outer] == [("model.embed_tokens", 16 * embed.numel())]
    new_up = model.model.layers[1].mlp.up_proj.weight
    assert not torch.equal(new_up, up)
    # Each group of 16 now holds at most 2^3 distinct values.
    assert max(len(torch.unique(g)) for g in new_up.reshape(-1, 16)) <= 8


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "nf4:g16", "lut3:g16", "ternary:g16", "fp8_e4m3:ch"])
def test_every_format_family_quantizes_a_model(tiny_llama_dir, name):
    model = load_model(tiny_llama_dir).model
    before = {n: m.weight.clone() for n, m in quantizable_linears(model)}
    report = mixbits.quantize(model, name, progress=False)
    fmt = parse_format(name)
    assert report.format == name
    assert report.bits == sum(fmt.bits(*w.shape) for w in before.values())
    for n, m in quantizable_linears(model):
        relative = ((m.weight - before[n]).norm() / before[n].norm()).item()
        assert 0 < relative < 0.7, (n, relative)


def test_quantizing_the_head_unties_it_from_the_embedding(tiny_llama_dir):
    model = load_model(tiny_llama_dir).model
    embed = model.model.embed_tokens.weight.clone()
    report = mixbits.quantize(model, "int4:g16:sym", include_head=True, progress=False)
    assert report.layers[-1].name == "lm_head"
    assert torch.equal(model.model.embed_tokens.weight, embed.half().float())
    assert not torch.equal(model.lm_head.weight, embed.half().float())


def test_gpt2_conv1d_layers_quantize_save_and_load_as_linears(tmp_path):
    """GPT-2 has no adapter and computes with transformers' Conv1D (x W + b): the generic path makes them Linears
    (same function, against the untouched model), then they quantize, count and load like any."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mixbits.io.checkpoint import load_quantized, save_quantized
    from mixbits.models.registry import adapter_for
    from mixbits.plan import option_bits

    torch.manual_seed(0)
    original = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    model = copy.deepcopy(original)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    report = mixbits.quantize(model, "int4:g16:asym", progress=False)
    assert len(report.layers) == 2 * 4  # c_attn, attn c_proj, c_fc, mlp c_proj per block
    assert report.bits == sum(option_bits("int4:g16:asym", *m.weight.T.shape) for n, m in original.named_modules()
                              if type(m).__name__ == "Conv1D")
    with torch.no_grad():
        float_copy = copy.deepcopy(original)
        adapter_for(float_copy).prepare(float_copy)
        assert torch.allclose(float_copy(ids).logits, original(ids).logits, atol=1e-5)
        save_quantized(model, report, tmp_path / "ckpt")
        assert torch.allclose(load_quantized(tmp_path / "ckpt").model(ids).logits, model(ids).logits, atol=1e-5)


def test_model_without_blocks_is_rejected():
    with pytest.raises(MixbitsError, match="no list of blocks"):
        mixbits.quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)), "int4:g4:sym")


def test_bad_model_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "model.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(tmp_path / "model.gguf")


def test_corrupt_gguf_is_rejected_and_leaves_no_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MIXBITS_CACHE", str(cache))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="could not read the model.s configuration in GGUF"):
        load_model(bad)
    assert not cache.exists() or not any(cache.iterdir())


def test_cache_validation_detects_corruption_and_staleness(tmp_path):
    cache = tmp_path / "gguf-abc"
    cache.mkdir()
    (cache / "model.safetensors").write_bytes(b"weights")
    (cache / "config.json").write_text("{}")
    files = {p.name: sha256_file(p) for p in cache.iterdir()}
    manifest = {"version": CACHE_VERSION, "source_sha256": "abc", "files": files}
    (cache / MANIFEST).write_text(json.dumps(manifest))
    assert _cache_is_valid(cache, "abc")
    assert not _cache_is_valid(cache, "other-source")
    (cache / "model.safetensors").write_bytes(b"weightz")
    assert not _cache_is_valid(cache, "abc")
    (cache / "model.safetensors").write_bytes(b"weights")
    (cache / MANIFEST).write_text(json.dumps({**manifest, "version": CACHE_VERSION + 1}))
    assert not _cache_is_valid(cache, "abc")
    (cache / MANIFEST).write_text("{truncated")
    assert not _cache_is_valid(cache, "abc")
    (cache / MANIFEST).unlink()
    assert not _cache_is_valid(cache, "abc")

"""Rotation and activation-aware scaling keep the float model's function."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import mixbits
from mixbits.data import load_text, tokenize
from mixbits.errors import TransformError
from mixbits.formats import parse_format
from mixbits.transforms.rotation import RotatedInput, rotate
from mixbits.transforms.scaling import scale_model


def tiny_llama(kv_heads=4, layers=2):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms with real, uneven weights so folding them matters
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.rand_like(parameter) * 2 - 0.5)
    return model


def tokens(count=3, length=20):
    return torch.randint(0, 64, (count, length), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("online", [False, True])
def test_rotation_keeps_a_tiny_llama_equal(online):
    model = tiny_llama()
    x = tokens()
    with torch.no_grad():
        before = model(x).logits
        kind = rotate(model, online_down=online)
        after = model(x).logits
    assert kind.residual == "hadamard"  # 48 = 4 x 12
    assert (kind.down_proj is not None) == online
    assert (after - before).abs().max() < 1e-4
    assert all(torch.all(n.weight == 1.0) for n in (model.model.norm, model.model.layers[0].input_layernorm))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert isinstance(model.model.layers[0].mlp.down_proj, RotatedInput) == online


def test_rotation_changes_the_weights_it_claims_to():
    model = tiny_llama()
    original = copy.deepcopy(model)
    rotate(model)
    q0, q1 = original.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q0, q1)
    # A rotation keeps each row's norm once the norm weight is folded in.
    folded = q0 * original.model.layers[0].input_layernorm.weight[None, :]
    assert torch.allclose(folded.norm(dim=1), q1.norm(dim=1), rtol=1e-5)


@pytest.mark.model
def test_rotation_keeps_the_default_model_equal_on_real_text():
    loaded = mixbits.load_model()
    ids = tokenize(load_text(), loaded.tokenizer)[60000:60256][None]
    model = loaded.model
    with torch.no_grad():
        before = model(ids).logits
        rotate(model, online_down=True)
        after = model(ids).logits
    # Logits reach about 40; fp32 rounding through 30 blocks moved them by under 1e-4 when measured.
    assert (after - before).abs().max() < 1e-3


def test_unsupported_architecture_is_named():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(TransformError, match="rotation needs an architecture adapter; gpt2 has none .*llama"):
        rotate(model)
    with pytest.raises(mixbits.MixbitsError, match="activation-aware scaling needs an architecture adapter"):
        mixbits.quantize(model, "int4:g16:asym", awq=True, calibration=tokens())
    with pytest.raises(mixbits.MixbitsError, match="rotation needs an architecture adapter"):
        mixbits.quantize(model, "int4:g16:asym", rotate=True)



def test_a_family_without_adapter_still_quantizes_saves_and_loads(tmp_path):
    """GPT-NeoX has no adapter: the generic path finds its blocks and Linears (fused query_key_value too)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from mixbits.io.checkpoint import load_quantized, save_quantized

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=64)).eval()
    report = mixbits.quantize(model, "int4:g16:asym", solver="gptq", calibration=tokens(), progress=False)
    assert len(report.layers) == 2 * 4 and report.layers[0].name.endswith("query_key_value")
    save_quantized(model, report, tmp_path / "ckpt")
    ids = tokens(1, 12)
    with torch.no_grad():
        assert torch.allclose(load_quantized(tmp_path / "ckpt").model(ids).logits, model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])  # with grouped-query attention v -> o is not scalable
def test_awq_scaling_keeps_the_function_and_never_raises_the_error(kv_heads):
    model = tiny_llama(kv_heads)
    x = tokens()
    with torch.no_grad():
        before = model(x).logits
    groups = scale_model(model, x, parse_format("int3:g16:asym"))
    with torch.no_grad():
        after = model(x).logits
    assert (after - before).abs().max() < 1e-4
    assert len(groups) == 2 * (4 if kv_heads == 4 else 3)
    assert all(g.error <= g.error_unscaled for g in groups)
    assert any(g.alpha > 0 and g.error < 0.99 * g.error_unscaled for g in groups)


def test_calibrated_pipeline_end_to_end_on_a_tiny_llama():
    """gptq+awq+rotation runs through the whole pipeline, head included, and reports exact bits."""
    model = tiny_llama(kv_heads=2)
    fmt = parse_format("int3:g16:asym")
    report = mixbits.quantize(model, fmt, solver="gptq", awq=True, rotate=True, online_hadamard=True,
                              calibration=tokens(6, 16), include_head=True, progress=False)
    assert report.method == "gptq+awq+rotate"
    assert len(report.layers) == 2 * 7 + 1 and report.layers[-1].name == "lm_head"
    assert report.bits == sum(fmt.bits(*layer.shape) for layer in report.layers)
    assert report.rotation == {"residual": "hadamard", "down_proj": "hadamard"}
    assert report.peak_memory_bytes > 0
    for layer in report.layers:  # every group of 16 weights holds at most the 8 levels of int3
        weight = model.get_submodule(layer.name).weight.detach()
        assert max(torch.unique(group).numel() for group in weight.reshape(-1, 16)) <= 8, layer.name


def test_too_little_calibration_text_states_the_minimum(tmp_path):
    loaded = mixbits.load_model(tiny_llama(), tokenizer=lambda text, add_special_tokens: {"input_ids": list(range(10))})
    (tmp_path / "short.txt").write_text("short")
    with pytest.raises(mixbits.MixbitsError, match="need at least 256"):
        mixbits.quantize(loaded, "int4:g16:asym", solver="gptq", calibration=tmp_path / "short.txt",
                         calibration_windows=2, calibration_len=64)


def test_calibration_without_tokenizer_says_what_to_pass():
    with pytest.raises(mixbits.MixbitsError, match="pass calibration= a \\[windows, tokens\\] tensor"):
        mixbits.quantize(tiny_llama(), "int4:g16:asym", solver="gptq")

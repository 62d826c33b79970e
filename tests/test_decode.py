"""mixbits' decoder computes what the transformers model computes, faster."""

import pytest
import torch
from torch import nn

from mixbits.formats import parse_format
from mixbits.runtime import IntLinear, TrellisLinear, VectorLinear, quantized_linear
from mixbits.runtime.decode import Decoder, DecodeUnsupported, Stacked
from mixbits.runtime.kernels import native
from mixbits.solvers import round_to_nearest

needs_native = pytest.mark.skipif(native() is None, reason="native kernels unavailable (no compiler or no AVX2)")


def tiny(kind: str = "llama", **overrides) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    settings = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    settings.update(overrides)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    if kind == "qwen3":
        settings["head_dim"] = 16
    model = model_class(config_class(**settings)).eval()
    with torch.no_grad():  # larger than the default initialisation, so that the logits differ clearly
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.2)
    return model


def quantize_linears(model: nn.Module, fmt: str) -> nn.Module:
    """Every decoder Linear replaced by its runtime module (kernel where the shape allows, else dequantize)."""
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    quantized = round_to_nearest(child.weight.detach(), parse_format(fmt))
                    setattr(parent, name, quantized_linear(quantized, child.bias))
    return model


def reference(model, ids, new_tokens):
    with torch.no_grad():
        logits = model(ids.unsqueeze(0)).logits[0]
        tokens = model.generate(ids.unsqueeze(0), attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                eos_token_id=None)[0]
    return logits, tokens


def check_against_transformers(model, native_steps=True, atol=1e-4):
    ids = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(1))
    expected_logits, expected_tokens = reference(model, ids, 20)
    decoder = Decoder(model)
    if not native_steps:
        decoder.native = None
    assert torch.allclose(decoder.logits(ids), expected_logits, atol=atol, rtol=0)
    # prompts of 12 (modules: dequantize and multiply) and 5 tokens (kernels), then one token per step
    assert torch.equal(decoder.generate(ids, 20), expected_tokens)
    short = ids[:5]
    assert torch.equal(decoder.generate(short, 20), reference(model, short, 20)[1])


@needs_native
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_float_model_matches_transformers(kind):
    model = tiny(kind)
    check_against_transformers(model)
    assert Decoder(model).native is not None  # the native block steps ran


def test_operator_path_matches_transformers():
    check_against_transformers(tiny("llama"), native_steps=False)


def test_per_head_norms_run_on_operators():
    model = tiny("qwen3")
    decoder = Decoder(model)
    assert decoder.native is None  # q/k norms: the PyTorch-operator path
    check_against_transformers(model, native_steps=False)


def test_bfloat16_model_matches_transformers():
    model = tiny("llama").to(torch.bfloat16)
    ids = torch.randint(0, 96, (10,), generator=torch.Generator().manual_seed(1))
    expected, _ = reference(model, ids, 1)
    got = Decoder(model).logits(ids)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), expected.float(), atol=0.1 * expected.float().abs().max().item())


@needs_native
@pytest.mark.parametrize("fmt", ["int4:g32:asym", "int8:ch:sym"])
def test_quantized_model_matches_its_modules(fmt):
    model = quantize_linears(tiny("llama"), fmt)
    assert isinstance(model.model.layers[0].self_attn.q_proj, IntLinear)
    check_against_transformers(model)
    decoder = Decoder(model)
    assert isinstance(decoder.blocks[0].qkv, IntLinear) and decoder.blocks[0].qkv.out_features == 64 + 2 * 32


@needs_native
@pytest.mark.parametrize("fmt", ["q4_0", "int8:ch:sym", "mxfp4", None])
def test_quantized_inputs_decode_as_the_model_computes(fmt):
    from mixbits.activations import parse_activation
    from mixbits.runtime.linear import with_activation

    model = tiny("llama") if fmt is None else quantize_linears(tiny("llama"), fmt)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if hasattr(child, "in_features"):  # the Linears, not the activation function
                    setattr(parent, name, with_activation(child, parse_activation("int8:g32")))
    check_against_transformers(model)
    qkv = Decoder(model).blocks[0].qkv
    # stacked (one input quantization for q, k and v) unless the format cannot stack
    assert isinstance(qkv, Stacked) if fmt == "mxfp4" else str(qkv.activation) == "int8:g32:sym:scale=fp32"


@needs_native
def test_vector_codebooks_decode_from_their_tables():
    model = quantize_linears(tiny("llama"), "vq2x6:g32")
    assert isinstance(model.model.layers[0].self_attn.q_proj, VectorLinear)
    check_against_transformers(model)
    assert isinstance(Decoder(model).blocks[0].qkv, Stacked)  # a codebook per matrix: side by side, not stacked


@needs_native
def test_trellis_codes_decode_from_their_bit_streams():
    model = quantize_linears(tiny("llama"), "trellis2x5:ch")
    assert isinstance(model.model.layers[0].mlp.down_proj, TrellisLinear)
    check_against_transformers(model)


def test_formats_without_a_kernel_run_side_by_side():
    model = quantize_linears(tiny("llama"), "mxfp4")
    check_against_transformers(model)
    assert isinstance(Decoder(model).blocks[0].qkv, Stacked)


@needs_native
def test_stacking_keeps_the_parts_working():
    torch.manual_seed(0)
    parts = [quantized_linear(round_to_nearest(torch.randn(rows, 64), parse_format("int4:g32:asym")), torch.randn(rows))
             for rows in (48, 16, 16)]
    x = torch.randn(3, 64)
    before = [part(x) for part in parts]
    stacked = IntLinear.stack(parts)
    assert torch.allclose(stacked(x), torch.cat(before, dim=-1), atol=1e-5)
    for part, old in zip(parts, before):
        assert torch.allclose(part(x), old, atol=1e-5)
        assert part.codes.untyped_storage().data_ptr() == stacked.codes.untyped_storage().data_ptr()  # no copy
    other = quantized_linear(round_to_nearest(torch.randn(16, 64), parse_format("int8:ch:sym")))
    assert IntLinear.stack([parts[0], other]) is None  # nibbles and bytes do not stack


def test_sampling_is_reproducible_and_a_tiny_top_p_is_greedy():
    model = tiny("llama")
    decoder = Decoder(model)
    ids = torch.randint(0, 96, (6,), generator=torch.Generator().manual_seed(1))
    first = decoder.generate(ids, 15, sample=True, temperature=1.5, generator=torch.Generator().manual_seed(3))
    again = decoder.generate(ids, 15, sample=True, temperature=1.5, generator=torch.Generator().manual_seed(3))
    other = decoder.generate(ids, 15, sample=True, temperature=1.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(decoder.generate(ids, 15, sample=True, top_p=1e-6), decoder.generate(ids, 15))


def test_stops_at_the_end_token():
    model = tiny("llama")
    ids = torch.randint(0, 96, (6,), generator=torch.Generator().manual_seed(1))
    free = Decoder(model).generate(ids, 10)
    stop = int(free[8])
    stopped = Decoder(model).generate(ids, 10, eos_token_id=stop)
    first = 6 + int((free[6:] == stop).nonzero()[0])
    assert torch.equal(stopped, free[:first + 1])


def test_unsupported_models_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(DecodeUnsupported, match="needs an architecture adapter"):
        Decoder(model)
    window = tiny("llama")
    window.config.sliding_window = 8
    with pytest.raises(DecodeUnsupported, match="sliding window"):
        Decoder(window).generate(torch.arange(6), 4)


def test_generate_falls_back_to_transformers_where_the_decoder_cannot_run():
    """mixbits.generate: the decoder's tokens where it runs, transformers' greedy tokens (and a note) where not."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mixbits import generate

    model = tiny("llama")
    ids = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(1))
    expected = reference(model, ids, 8)[1][12:]
    notes = []
    tokens, runtime = generate(model, ids.unsqueeze(0), 8, note=notes.append)
    assert runtime == "mixbits decoder" and torch.equal(tokens, expected) and notes == []
    forced, runtime = generate(model, ids, 8, transformers=True, note=notes.append)
    assert runtime == "transformers generate" and torch.equal(forced, expected) and notes == []

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()
    short = torch.arange(5)
    with torch.no_grad():
        expected = gpt2.generate(short.unsqueeze(0), attention_mask=torch.ones(1, 5, dtype=torch.long),
                                 max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)[0, 5:]
    tokens, runtime = generate(gpt2, short, 6, note=notes.append)
    assert runtime == "transformers generate" and torch.equal(tokens, expected)
    assert len(notes) == 1 and "needs an architecture adapter" in notes[0]

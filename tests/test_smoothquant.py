"""SmoothQuant: scales folded so that inputs with outlier channels quantize well, the float model unchanged."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mixbits
from mixbits.activations import fake_quantize, parse_activation
from mixbits.calibrate import InputStats
from mixbits.errors import MixbitsError
from mixbits.formats import parse_format
from mixbits.transforms.scaling import scale_model, search_smoothing

WINDOWS = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))


def outlier_llama():
    """A tiny LLaMA whose norms give a few channels 30x the others, as real models' activations have."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40]] *= 30
    return model


def test_folded_scales_leave_the_float_model_unchanged():
    model = outlier_llama()
    with torch.no_grad():
        before = model(WINDOWS).logits
        groups = scale_model(model, WINDOWS, parse_format("int8:ch:sym"), parse_activation("int8:token"))
        after = model(WINDOWS).logits
    assert any(group.alpha > 0 for group in groups)  # outliers: smoothing was chosen somewhere
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-4)


def test_smoothing_cuts_the_w8a8_error_on_outlier_channels():
    torch.manual_seed(0)
    x = torch.randn(400, 96)
    x[:, [5, 50]] *= 60  # outlier input channels
    weights = [torch.randn(80, 96) * 0.1, torch.randn(48, 96) * 0.1]
    stats = InputStats(x.T @ x / len(x), x.abs().mean(0), x.abs().amax(0), len(x), x)
    act, fmt = parse_activation("int8:token"), parse_format("int8:ch:sym")
    scales, group = search_smoothing(weights, [stats, stats], fmt, act)

    def error(s):  # the W8A8 output error, computed here from the scales alone
        rounded = fake_quantize(x / s, act)
        return sum(float((rounded @ fmt.quantize(w * s).dequantize().T - x @ w.T).pow(2).sum()) for w in weights)

    assert group.alpha > 0
    assert error(scales) < 0.5 * error(torch.ones(96))
    assert error(scales) == pytest.approx(group.error, rel=1e-4)


def test_quantize_with_smoothquant_and_its_refusals():
    model = outlier_llama()
    report = mixbits.quantize(model, "int8:ch:sym", smooth=True, activation="int8:token", calibration=WINDOWS,
                              progress=False)
    assert report.method == "rtn+smoothquant" and report.scaled
    with pytest.raises(MixbitsError, match="--act"):
        mixbits.quantize(outlier_llama(), "int8:ch:sym", smooth=True, calibration=WINDOWS, progress=False)
    with pytest.raises(MixbitsError, match="either --awq or --smoothquant"):
        mixbits.quantize(outlier_llama(), "int8:ch:sym", smooth=True, awq=True, activation="int8:token",
                         calibration=WINDOWS, progress=False)


def test_smoothing_for_static_inputs_searches_with_the_scale_quantize_will_measure():
    torch.manual_seed(0)
    x = torch.randn(400, 96)
    x[:, [5, 50]] *= 60
    weights = [torch.randn(80, 96) * 0.1]
    stats = InputStats(x.T @ x / len(x), x.abs().mean(0), x.abs().amax(0), len(x), x)
    act, fmt = parse_activation("int8:static"), parse_format("int8:ch:sym")
    scales, group = search_smoothing(weights, [stats], fmt, act)

    def error(s):  # the static scale: the smoothed input's largest magnitude over 127
        rounded = fake_quantize(x / s, act.calibrated(float((x / s).abs().max())))
        return float((rounded @ fmt.quantize(weights[0] * s).dequantize().T - x @ weights[0].T).pow(2).sum())

    assert group.alpha > 0 and error(scales) < 0.5 * error(torch.ones(96))
    assert error(scales) == pytest.approx(group.error, rel=1e-4)
    model = outlier_llama()
    report = mixbits.quantize(model, "int8:ch:sym", smooth=True, activation="int8:static", calibration=WINDOWS,
                              progress=False)
    assert all(parse_activation(layer.activation).value > 0 for layer in report.layers)

"""GPTAQ: GPTQ fitted to the float model's outputs, against least squares, brute-force cross terms and GPTQ."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

import mixbits
from mixbits.calibrate import SequentialCalibration
from mixbits.cli import main
from mixbits.formats import parse_format
from mixbits.models.structure import quantizable_linears, transformer_blocks
from mixbits.models.tiny import tiny_model
from mixbits.solvers import GptqSettings, asymmetric_target, solve

EXACT = GptqSettings(damp=0.0, shrink=0.0, asymmetry=1.0)


def inputs(rows=2048, cols=64, seed=0):
    """Correlated float-model inputs X_f and the same tokens' inputs X after an upstream error."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) / cols**0.5 + torch.eye(cols)
    floats = torch.randn(rows, cols, generator=generator) @ mixing
    upstream = 0.3 * torch.randn(rows, cols, generator=generator) @ mixing + 0.1 * floats.roll(1, dims=1)
    return floats, floats + upstream


def terms(floats, quantized):
    """The Hessian and cross term, in float64 (the oracle's precision)."""
    floats, quantized = floats.double(), quantized.double()
    return quantized.T @ quantized / len(quantized), (floats - quantized).T @ quantized / len(quantized)


def float_output_error(q, w, floats, quantized):
    return float(((quantized.double() @ q.double().T - floats.double() @ w.double().T) ** 2).sum())


def test_the_full_target_is_the_least_squares_fit_to_the_float_output():
    floats, quantized = inputs()
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    hessian, cross = terms(floats, quantized)
    target = asymmetric_target(weight, hessian, cross, EXACT)
    # Oracle: numpy's least squares of min ||X Q^T - X_f W^T|| over Q.
    solution, *_ = np.linalg.lstsq(quantized.double().numpy(), (floats.double() @ weight.double().T).numpy(), rcond=None)
    assert np.allclose(target.numpy(), solution.T, rtol=1e-6, atol=1e-6)
    half = asymmetric_target(weight, hessian, cross, dataclasses.replace(EXACT, asymmetry=0.5))
    assert torch.allclose(half, (weight + target) / 2, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int3:g32:asym", "int4:g32:sym", "nf4:g32"])
def test_gptaq_fits_the_float_output_better_than_gptq(fmt):
    floats, quantized = inputs(seed=3)
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(4))
    hessian, cross = terms(floats, quantized)
    settings = GptqSettings(shrink=0.0, asymmetry=1.0)
    plain = solve(weight, parse_format(fmt), "gptq", hessian, settings=settings).dequantize()
    fitted = solve(weight, parse_format(fmt), "gptaq", hessian, settings=settings, cross=cross).dequantize()
    gptq_error = float_output_error(plain, weight, floats, quantized)
    gptaq_error = float_output_error(fitted, weight, floats, quantized)
    # The least-squares weights' error is the part no weights remove; GPTAQ removes most of the rest.
    floor = float_output_error(asymmetric_target(weight, hessian, cross, EXACT), weight, floats, quantized)
    assert floor < gptaq_error < gptq_error
    assert gptaq_error - floor < 0.6 * (gptq_error - floor)
    # Without a cross term, or at asymmetry 0, GPTAQ is GPTQ exactly.
    same = solve(weight, parse_format(fmt), "gptaq", hessian, settings=settings).codes
    zero = solve(weight, parse_format(fmt), "gptaq", hessian, settings=dataclasses.replace(settings, asymmetry=0.0),
                 cross=cross).codes
    reference = solve(weight, parse_format(fmt), "gptq", hessian, settings=settings).codes
    assert torch.equal(same, reference) and torch.equal(zero, reference)


def direct_inputs(model, windows):
    seen = {}
    handles = [linear.register_forward_pre_hook(
        lambda module, args, name=name: seen.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]).double()))
        for name, linear in quantizable_linears(model)]
    with torch.no_grad():
        model(windows)
    for handle in handles:
        handle.remove()
    return seen


def test_cross_terms_equal_a_direct_computation():
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=3)
    float_model = copy.deepcopy(model)
    windows = torch.randint(0, 64, (11, 12), generator=torch.Generator().manual_seed(1))  # batches of 8 and 3
    collected = {}
    for block in SequentialCalibration(model, windows, reference=True):
        for stage in block.stages():
            stats = block.stats(stage.linears)
            for name, linear in zip(stage.names, stage.linears):
                collected[name] = stats[linear]
                with torch.no_grad():
                    linear.weight.mul_(0.9).add_(0.01)  # any change, stage by stage, as quantizing makes
    floats, changed = direct_inputs(float_model, windows), direct_inputs(model, windows)
    first_stage = [name for name in floats if name.startswith("model.layers.0.self_attn.") and "o_proj" not in name]
    for name in floats:
        x, x_float = changed[name], floats[name]
        cross = (x_float - x).T @ x / len(x)
        if name in first_stage:  # the first Linears read the float model's own inputs
            assert torch.count_nonzero(collected[name].cross) == 0
        else:
            assert cross.abs().max() > 1e-4
        assert torch.allclose(collected[name].cross.double(), cross, rtol=1e-4, atol=1e-6), name


def test_quantize_with_gptaq():
    """On the calibration windows it is fitted to, GPTAQ's model stays closer to the float model than GPTQ's; the
    first stage, which reads the float model's inputs, is solved exactly as GPTQ solves it."""
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=4)
    windows = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(windows).logits.log_softmax(-1)
    results = {}
    for solver in ("gptq", "gptaq"):
        copied = copy.deepcopy(model)
        report = mixbits.quantize(copied, "int2:g16:asym", solver=solver, calibration=windows, progress=False,
                                  gptq=GptqSettings(asymmetry=1.0))
        with torch.no_grad():
            logits = copied(windows).logits.log_softmax(-1)
        kl = float((reference.exp() * (reference - logits)).sum(-1).mean())
        results[solver] = report, kl
    (gptq, gptq_kl), (gptaq, gptaq_kl) = results["gptq"], results["gptaq"]
    assert gptaq.solver == "gptaq" and gptaq.gptq.asymmetry == 1.0 and gptaq.bits == gptq.bits
    assert gptaq_kl < gptq_kl
    prefix, _ = transformer_blocks(model)
    for name in (layer.name for layer in gptq.layers):
        same = torch.equal(gptq.tensors[name].codes, gptaq.tensors[name].codes)
        assert same == (name.startswith(f"{prefix}.0.self_attn.") and "o_proj" not in name), name


def test_gptaq_refuses_rescaled_inputs_in_one_line(tiny_llama_dir, capsys):
    code = main(["quantize", "--model", str(tiny_llama_dir), "--format", "int4:g32:asym", "--solver", "gptaq", "--awq",
                 "--no-eval"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "gptaq" in error and len(error.splitlines()) == 1

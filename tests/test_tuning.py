"""Block-wise tuning: starts at the solver's result, lowers the block error it optimises, never raises it, and what it
finds is stored and loaded exactly."""

import copy

import pytest
import torch

import mixbits
from mixbits.calibrate import SequentialCalibration, run_block
from mixbits.cli import main
from mixbits.formats import parse_format
from mixbits.io.checkpoint import load_quantized, save_quantized
from mixbits.models.tiny import tiny_model
from mixbits.solvers import solve
from mixbits.solvers.tuning import TuneSettings, _Layer, tune_block

WINDOWS = torch.randint(0, 64, (12, 32), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("fmt", ["int3:g16:asym", "int4:g16:sym", "nf4:g16", "fp4_e2m1:g16:scale=fp16"])
@pytest.mark.parametrize("solver", ["gptq", "rtn"])
def test_tuning_starts_at_the_solver_result(fmt, solver):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=generator)  # 40 columns: the last group of 16 is padded
    inputs = torch.randn(256, 40, generator=generator)
    quantized = solve(weight, parse_format(fmt), solver, inputs.T @ inputs / 256, keep_source=True)
    layer = _Layer(quantized)
    grouped = quantized.format.decode(quantized.codes, quantized.params)
    # The same values (a minifloat's -0 may come back as +0, which GPTQ's final re-encoding of its values gives).
    assert torch.equal(quantized.format.decode(layer.codes(), quantized.params), grouped)
    assert torch.equal(layer.weight().detach(), quantized.dequantize())
    assert torch.equal(layer.result().dequantize(), quantized.dequantize())


def first_block(model):
    """The first block's calibration (with its float reference) and the float block's outputs."""
    block = next(iter(SequentialCalibration(model, WINDOWS, reference=True)))
    original, floats = block.reference
    return block, run_block(original, floats, block.kwargs)


def solved(block, fmt):
    """The block's Linears solved by GPTQ stage by stage, weights replaced, sources kept."""
    tensors = {}
    for stage in block.stages():
        stats = block.stats(stage.linears)[stage.linears[0]]
        for name, linear in zip(stage.names, stage.linears):
            tensor = solve(linear.weight, parse_format(fmt), "gptq", stats.hessian, keep_source=True)
            with torch.no_grad():
                linear.weight.copy_(tensor.dequantize())
            tensors[name[len(block.prefix) + 1:]] = tensor
    return tensors


def block_error(block, targets):
    with torch.no_grad():
        return float((run_block(block.block, block.inputs, block.kwargs) - targets).square().mean())


@pytest.mark.parametrize("fmt", ["int2:g16:asym", "int3:g16:asym"])
def test_tuning_lowers_the_block_error(fmt):
    block, targets = first_block(tiny_model("llama"))
    tensors = solved(block, fmt)
    start = block_error(block, targets)
    tuned, record = tune_block(block.block, block.kwargs, block.inputs, targets, tensors, TuneSettings(steps=40))
    end = block_error(block, targets)  # measured apart from the tuner, on the weights it left
    assert record.kept and record.layers == 7
    assert end < 0.9 * start
    assert record.start_error == pytest.approx(start, rel=1e-4) and record.end_error == pytest.approx(end, rel=1e-4)
    changed = sum(int((tuned[name].codes != tensors[name].codes).sum()) for name in tensors)
    assert changed > 0
    for name, tensor in tuned.items():  # the same format and bits: codes within range, scales as the codec stores them
        low, high = tensor.format.code_range
        assert tensor.codes.min() >= low and tensor.codes.max() <= high
        assert torch.equal(tensor.format.scale.round(tensor.params["scale"]), tensor.params["scale"])
        assert torch.equal(tensor.params["zero"], tensors[name].params["zero"])


def test_tuning_never_leaves_a_block_worse():
    block, targets = first_block(tiny_model("llama", seed=1))
    tensors = solved(block, "int4:g16:asym")
    start = block_error(block, targets)
    # Steps far too large for the error: the run ends worse, and the solver's result is kept.
    tuned, record = tune_block(block.block, block.kwargs, block.inputs, targets, tensors, TuneSettings(steps=3, lr=5.0))
    assert not record.kept and record.end_error == record.start_error
    assert block_error(block, targets) == pytest.approx(start, rel=1e-6)
    assert all(torch.equal(tuned[name].codes, tensors[name].codes) for name in tensors)


def test_quantize_with_tuning_stores_what_it_found(tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():
        reference = model(WINDOWS).logits.log_softmax(-1)
    results = {}
    for tune in (None, TuneSettings(steps=30)):
        quantized = copy.deepcopy(model)
        report = mixbits.quantize(quantized, "int2:g16:asym", solver="gptq", calibration=WINDOWS, tune=tune,
                                  progress=False)
        with torch.no_grad():
            logits = quantized(WINDOWS).logits.log_softmax(-1)
        results[tune is not None] = report, float((reference.exp() * (reference - logits)).sum(-1).mean()), quantized
    (plain, plain_kl, _), (tuned, tuned_kl, quantized) = results[False], results[True]
    assert tuned.bits == plain.bits and tuned.method == "gptq+tune"
    assert len(tuned.tuning) == 3 and all(r.end_error <= r.start_error for r in tuned.tuning)
    assert tuned_kl < plain_kl  # on the windows it was tuned on
    assert tuned.as_dict()["tuning"]["steps"] == 30
    save_quantized(quantized, tuned, tmp_path / "tuned")
    with torch.no_grad():
        stored = load_quantized(tmp_path / "tuned").model(WINDOWS[:2]).logits
        assert torch.allclose(stored, quantized(WINDOWS[:2]).logits, atol=1e-4)


def test_tune_steps_are_checked_in_one_line(tiny_llama_dir, capsys):
    code = main(["quantize", "--model", str(tiny_llama_dir), "--format", "int4:g32:asym", "--tune", "0", "--no-eval"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "--tune" in error and len(error.splitlines()) == 1

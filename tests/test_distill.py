"""Distillation of scales to the float model's logits: lowers the KL it is judged by, never raises it, moves only
scales, stores them in their codec, and runs from quantize and the command line."""

import copy

import pytest
import torch
from torch.nn import functional as F

from mixbits.models.tiny import tiny_model
from mixbits.quantize import quantize
from mixbits.solvers.distill import DistillSettings, distill_scales

WINDOWS = torch.randint(0, 64, (6, 32), generator=torch.Generator().manual_seed(5))


def kl(teacher, model, windows) -> float:
    """Mean KL(teacher || model) per token, computed here from both models' logits."""
    with torch.no_grad():
        p = F.log_softmax(teacher(windows).logits.float(), dim=-1)
        q = F.log_softmax(model(windows).logits.float(), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def quantized(fmt: str):
    teacher = tiny_model("llama")
    model = copy.deepcopy(teacher)
    report = quantize(model, fmt, progress=False)
    return teacher, model, report


@pytest.mark.parametrize("fmt", ["int2:g16:asym", "trellis2x4:ch"])
def test_distillation_lowers_the_kl_and_moves_only_scales(fmt):
    teacher, model, report = quantized(fmt)
    start = kl(teacher, model, WINDOWS)
    tensors, record = distill_scales(model, teacher, report.tensors, WINDOWS,
                                     DistillSettings(steps=30, lr=0.01, judge=6))
    end = kl(teacher, model, WINDOWS)
    assert record.kept and record.layers == 14 and end < 0.95 * start
    assert record.start_kl == pytest.approx(start, rel=1e-3) and record.end_kl == pytest.approx(end, rel=1e-3)
    for name, tensor in tensors.items():
        before = report.tensors[name]
        if before is None:  # a layer kept in 16 bits
            continue
        assert torch.equal(tensor.codes, before.codes)
        assert all(torch.equal(tensor.params[k], before.params[k]) for k in before.params if k != "scale")
        assert torch.equal(tensor.params["scale"].half().float(), tensor.params["scale"])
        ratio = tensor.params["scale"] / before.params["scale"]
        assert float(ratio.min()) >= 0.77 and float(ratio.max()) <= 1.3  # within exp(+-1/4), then rounded to fp16
        assert torch.equal(dict(model.named_modules())[name].weight, tensor.dequantize())


def test_a_worse_result_is_not_kept():
    teacher, model, report = quantized("int2:g16:asym")
    start = kl(teacher, model, WINDOWS)
    # Steps of a quarter in log scale, each in the gradient's sign, overshoot: the start is better and stays.
    tensors, record = distill_scales(model, teacher, report.tensors, WINDOWS[:1],
                                     DistillSettings(steps=2, lr=1.0, judge=1))
    assert not record.kept and record.end_kl == record.start_kl
    assert all(torch.equal(tensors[n].params["scale"], report.tensors[n].params["scale"]) for n in tensors
               if tensors[n] is not None)
    assert kl(teacher, model, WINDOWS) == pytest.approx(start, rel=1e-6)


def test_quantize_distills_after_the_blocks():
    teacher = tiny_model("llama")
    model = copy.deepcopy(teacher)
    report = quantize(model, "int3:g16:asym", solver="gptq", calibration=WINDOWS, distill=DistillSettings(steps=4, judge=2),
                      progress=False)
    summary = report.as_dict()
    assert summary["method"] == "gptq+distill"
    assert summary["distillation"]["steps"] == 4 and summary["distillation"]["layers"] == 14
    # The model as left computes the KL the record gives, and holds the stored tensors' values.
    assert kl(teacher, model, WINDOWS[:2]) == pytest.approx(summary["distillation"]["end_kl"], rel=1e-3)
    modules = dict(model.named_modules())
    assert all(torch.equal(modules[n].weight, t.dequantize()) for n, t in report.tensors.items() if t is not None)

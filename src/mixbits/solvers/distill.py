"""End-to-end tuning of scales to the float model's logits (distillation).

Block-wise tuning (`solvers.tuning`) matches each block's output; what a user
sees is the next-token distribution. After every block is quantized, this
tunes one log multiplier a per stored scale (per row or group) of every
quantized layer whose scales are plain floats (fp16, bf16, fp32; the Linears,
and the input embedding when it is quantized), the codes
held fixed, by signed gradient descent on KL(float model || quantized model)
of the next-token distributions over the calibration windows: the scales-only
end-to-end stage of EfficientQAT, with the float model as teacher rather than
the text. The stored scale is the codec's rounding of s * exp(a), |a| <= 1/4.

Each step takes `batch` windows in a fixed shuffled order; the step size
starts at `lr` and decays linearly to 0. The teacher's distributions are
computed as each step needs them (a model's logits over all calibration
windows would take gigabytes). The result is kept only if it lowers the KL
over the first `judge` calibration windows, measured before and after with
the scales rounded as stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .. import defaults
from ..formats import QuantizedTensor
from ..formats.granularity import ungroup
from ..formats.scales import CastScale
from .tuning import frozen, write_weights

MAX_LOG_SCALE = 0.25


@dataclass(frozen=True)
class DistillSettings:
    """steps: signed-gradient steps over the whole model; batch: calibration windows per step; lr: the first step's
    size in log scale; judge: the windows the result is judged on."""

    steps: int = defaults.DISTILL_STEPS
    batch: int = defaults.DISTILL_BATCH
    lr: float = defaults.DISTILL_LR
    judge: int = defaults.DISTILL_JUDGE

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1 or self.judge < 1 or not self.lr > 0:
            raise ValueError(f"distillation needs steps, batch, judge >= 1 and lr > 0, got {self.steps}, "
                             f"{self.batch}, {self.judge}, {self.lr}")

    def as_dict(self) -> dict:
        return {"steps": self.steps, "batch": self.batch, "lr": self.lr, "judge": self.judge}


@dataclass
class DistillRecord:
    layers: int
    start_kl: float  # mean KL per token over the judged windows, as the solver left the model
    end_kl: float  # the same after distillation (the result's: never above start_kl)
    kept: bool

    def as_dict(self) -> dict:
        return {"layers": self.layers, "start_kl": self.start_kl, "end_kl": self.end_kl, "kept": self.kept}


def distillable(tensor: QuantizedTensor | None) -> bool:
    """Whether the scales of `tensor` can be tuned: stored as plain floats, with no second-level scale."""
    return (tensor is not None and "scale" in tensor.params and isinstance(getattr(tensor.format, "scale", None), CastScale)
            and not tensor.format.has_second_level)


def _logits(model: nn.Module, ids: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    if weights is None:
        return model(ids).logits.float()
    from torch.func import functional_call

    return functional_call(model, {f"{name}.weight": w for name, w in weights.items()}, (ids,)).logits.float()


def _kl(teacher: nn.Module, student_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) per token of `ids` [windows, tokens]."""
    with torch.no_grad():
        target = F.log_softmax(_logits(teacher, ids), dim=-1)
    return F.kl_div(F.log_softmax(student_logits, dim=-1), target, log_target=True, reduction="none").sum(-1).mean()


def distill_scales(model: nn.Module, teacher: nn.Module, tensors: dict[str, QuantizedTensor | None],
                   windows: torch.Tensor, settings: DistillSettings = DistillSettings(), seed: int = 0
                   ) -> tuple[dict[str, QuantizedTensor | None], DistillRecord]:
    """Tune the scales of the quantized Linears of `model` named (from the model) in `tensors` so that `model` on
    `windows` ([windows, tokens] token ids) gives `teacher`'s next-token distributions; returns the tensors (tuned
    where kept) and a record. The model's weights are left as the returned tensors say."""
    names = [name for name, tensor in tensors.items() if distillable(tensor)]
    logs = {name: torch.zeros_like(tensors[name].params["scale"], requires_grad=True) for name in names}

    def scales(name: str, log: torch.Tensor) -> torch.Tensor:
        return tensors[name].params["scale"] * log.exp()

    def weight(name: str, scale: torch.Tensor) -> torch.Tensor:
        tensor = tensors[name]
        return ungroup(tensor.format.decode(tensor.codes, {**tensor.params, "scale": scale}), tensor.shape)

    def rounded() -> dict[str, QuantizedTensor]:
        return {name: QuantizedTensor(tensors[name].format, tensors[name].shape, tensors[name].codes,
                                      {**tensors[name].params,
                                       "scale": tensors[name].format.scale.round(scales(name, logs[name].detach()))})
                for name in names}

    def judged(candidate: dict[str, QuantizedTensor]) -> float:
        judge = windows[:settings.judge]
        with torch.no_grad():
            weights = {name: tensor.dequantize() for name, tensor in candidate.items()}
            return sum(float(_kl(teacher, _logits(model, judge[i:i + 1], weights), judge[i:i + 1]))
                       for i in range(len(judge))) / len(judge)

    with frozen(model):
        start = {name: tensors[name] for name in names}
        start_kl = judged(start)
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
        with torch.enable_grad():
            for step in range(settings.steps if names else 0):
                chosen = order[(step * settings.batch + torch.arange(settings.batch)) % len(windows)]
                ids = windows[chosen]
                weights = {name: weight(name, scales(name, log)) for name, log in logs.items()}
                loss = _kl(teacher, _logits(model, ids, weights), ids)
                grads = torch.autograd.grad(loss, list(logs.values()))
                size = settings.lr * (1 - step / settings.steps)
                with torch.no_grad():
                    for log, grad in zip(logs.values(), grads):
                        log.sub_(grad.sign(), alpha=size).clamp_(-MAX_LOG_SCALE, MAX_LOG_SCALE)
        tuned = rounded()
        end_kl = judged(tuned) if names else start_kl
    kept = end_kl < start_kl
    result = dict(tensors)
    if kept:
        result.update(tuned)
    write_weights(model, names, result)
    return result, DistillRecord(len(names), start_kl, min(start_kl, end_kl), kept)

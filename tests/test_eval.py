import math

import pytest
import torch
from torch import nn

from mixbits.eval import ReferenceScores, score_windows


class FixedLogits(nn.Module):
    """Predicts the same next-token logits at every position."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)

    def forward(self, input_ids):
        return self.logits.expand(*input_ids.shape, -1)


WINDOWS = torch.tensor([[0, 1, 1, 0, 2], [2, 2, 0, 1, 1]])


def test_uniform_model_has_perplexity_equal_to_vocabulary():
    result = score_windows(FixedLogits([0.0] * 3), WINDOWS, progress=False)
    assert result.predictions == 8
    assert result.perplexity == pytest.approx(3.0)


def test_perplexity_kl_and_agreement_against_known_values():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    model, reference = FixedLogits(q.log().tolist()), FixedLogits(p.log().tolist())
    result = score_windows(model, WINDOWS, reference, progress=False)
    targets = WINDOWS[:, 1:].flatten()
    assert result.perplexity == pytest.approx(math.exp(-q[targets].log().mean().item()), rel=1e-5)
    assert result.reference_perplexity == pytest.approx(math.exp(-p[targets].log().mean().item()), rel=1e-5)
    assert result.kl == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-5)
    assert result.agreement == 0.0  # argmax 0 vs argmax 2


def test_precomputed_reference_gives_the_same_numbers():
    reference = FixedLogits([1.0, 0.0, -1.0])
    model = FixedLogits([0.5, 0.0, -0.2])
    streamed = score_windows(model, WINDOWS, reference, progress=False)
    cached = score_windows(model, WINDOWS, ReferenceScores(reference, WINDOWS, progress=False), progress=False)
    assert cached.kl == pytest.approx(streamed.kl)
    assert cached.agreement == streamed.agreement == 1.0
    assert cached.reference_perplexity == pytest.approx(streamed.reference_perplexity)


def test_model_against_itself_has_zero_kl():
    model = FixedLogits([0.3, -1.0, 2.0])
    result = score_windows(model, WINDOWS, model, progress=False)
    assert result.kl == pytest.approx(0.0, abs=1e-7)
    assert result.agreement == 1.0
    assert result.perplexity == pytest.approx(result.reference_perplexity)

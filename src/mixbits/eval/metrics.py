"""Perplexity, KL divergence against a reference, and top-1 agreement.

Each window is scored on its own: its first token is not predicted, so a
window of L tokens contributes L - 1 predictions. Perplexity is exp of the
mean negative log-likelihood over all predictions of all windows. KL is
KL(reference || model) of the next-token distributions, averaged over the
same positions; agreement is the fraction of positions where both models'
most likely next token is the same.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from .. import defaults
from ..corpus import resolve_text
from ..data import Text, WindowSpec, bos_token_id, eval_windows, tokenize
from ..models.loaded import LoadedModel


@dataclass
class Evaluation:
    perplexity: float
    mean_nll: float
    predictions: int
    kl: float | None = None
    agreement: float | None = None
    reference_perplexity: float | None = None
    seconds: float = 0.0
    windows: WindowSpec | None = None
    text_name: str | None = None
    text_sha256: str | None = None

    def as_dict(self) -> dict:
        record = asdict(self)
        record["windows"] = self.windows.as_dict() if self.windows else None
        return record


class ReferenceScores:
    """A reference model's log-probabilities on fixed windows, computed once.

    Lets many quantized variants be compared without rerunning the reference.
    Memory: windows x (length - 1) x vocabulary float32 (2.4 GB for the
    default protocol); pass the reference model itself to stream instead.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, progress: bool = True):
        self.windows = windows
        self.logprobs = [
            _logprobs(model, window) for window in tqdm(windows, desc="reference", disable=not progress, leave=False)
        ]
        nll = sum(_nll(lp, w).sum().item() for lp, w in zip(self.logprobs, windows))
        self.perplexity = math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))


def evaluate(
    model: nn.Module | LoadedModel,
    text: str | Text | None = None,
    *,
    reference: nn.Module | LoadedModel | ReferenceScores | None = None,
    windows: int = defaults.EVAL_WINDOWS,
    window_len: int = defaults.WINDOW_LEN,
    tokenizer=None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate `model` on `windows` windows of `window_len` tokens from the middle of `text`.

    `text` is None (CPython's pydoc topics), a text source name (`mixbits.corpus`),
    a path to a text file or folder, or a `Text`. With a `reference` (model or `ReferenceScores`), KL divergence
    and top-1 agreement against it are reported too.
    """
    # A bare module is used as is: wrapping it in load_model would hash its weights for nothing.
    module, own_tokenizer = (model.model, model.tokenizer) if isinstance(model, LoadedModel) else (model, None)
    text = resolve_text(text)
    tokens = tokenize(text, tokenizer or own_tokenizer)
    batch, spec = eval_windows(tokens, windows, window_len, bos_token_id(tokenizer or own_tokenizer))
    ref = reference.model if isinstance(reference, LoadedModel) else reference
    result = score_windows(module, batch, ref, progress=progress)
    result.windows, result.text_name, result.text_sha256 = spec, text.name, text.sha256
    return result


@torch.inference_mode()
def score_windows(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | ReferenceScores | None = None,
    progress: bool = True,
) -> Evaluation:
    """Score `model` on a [count, length] batch of token windows."""
    if isinstance(reference, ReferenceScores) and not torch.equal(reference.windows, windows):
        raise ValueError("reference scores were computed on different windows")
    start = time.perf_counter()
    nll_sum = kl_sum = ref_nll_sum = 0.0
    agree = 0
    for i, window in enumerate(tqdm(windows, desc="evaluate", disable=not progress, leave=False)):
        logprobs = _logprobs(model, window)
        nll_sum += _nll(logprobs, window).sum().item()
        if reference is None:
            continue
        if isinstance(reference, ReferenceScores):
            ref_logprobs = reference.logprobs[i]
        else:
            ref_logprobs = _logprobs(reference, window)
            ref_nll_sum += _nll(ref_logprobs, window).sum().item()
        kl_sum += (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum().item()
        agree += (ref_logprobs.argmax(-1) == logprobs.argmax(-1)).sum().item()
    count = windows.shape[0] * (windows.shape[1] - 1)
    result = Evaluation(math.exp(nll_sum / count), nll_sum / count, count)
    if reference is not None:
        result.kl = kl_sum / count
        result.agreement = agree / count
        result.reference_perplexity = (
            reference.perplexity if isinstance(reference, ReferenceScores) else math.exp(ref_nll_sum / count)
        )
    result.seconds = time.perf_counter() - start
    return result


@torch.inference_mode()
def _logprobs(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities of the next token at every position but the last: [L - 1, V]."""
    inputs = window.unsqueeze(0)
    output = model(input_ids=inputs, use_cache=False) if hasattr(model, "config") else model(inputs)
    logits = output.logits if hasattr(output, "logits") else output
    return torch.log_softmax(logits[0, :-1].float(), dim=-1)


def _nll(logprobs: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    return -logprobs.gather(-1, window[1:].unsqueeze(-1)).squeeze(-1)

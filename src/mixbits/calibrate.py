"""Block-sequential calibration: input statistics of every Linear, one block at a time.

The calibration windows run through the embedding once; from then on only one
block's inputs ([windows, tokens, hidden]) and outputs live in memory. For a
block, `BlockCalibration` finds its *stages*: the Linears that read the same
input tensor (q/k/v, then o, then gate/up, then down in a LLaMA block), in
forward order. Statistics of a stage are gathered by running the block up to
that stage's last Linear, so a solver can quantize stage by stage and every
later stage sees the already-quantized earlier ones (GPTQ's "true sequential"
order). `outputs()` runs the finished block to give the next block's inputs.

With a float reference (`SequentialCalibration(..., reference=True)`, for
GPTAQ), a float copy of each block runs beside it on the float model's own
block inputs, and each Linear's statistics also hold the cross term
(X_float - X)^T X of its float-model input against its input here.

Statistics per stage input X (all tokens of all windows, as rows):
    hessian  = X^T X / tokens   (float32 products of up to FLUSH_ROWS rows summed in float64, stored float32)
    abs_mean = mean |X| per input channel
    abs_max  = max |X| per input channel
    cross    = (X_float - X)^T X / tokens, with a reference (same summation as the Hessian)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .corpus import MIX_NAME, calibration_mix, resolve_text
from .data import bos_token_id, calibration_windows, tokenize
from .errors import MixbitsError
from .models.loaded import LoadedModel
from .models.structure import transformer_blocks

BATCH = 8  # windows per block forward
FLUSH_ROWS = 4096  # input rows summed in float32 before they join the float64 sum of X^T X
SAMPLE_ROWS, SAMPLE_STRIDE = 512, 31  # input rows kept as a sample: spread over windows and positions


@dataclass
class InputStats:
    hessian: torch.Tensor  # [C, C] float32, X^T X / tokens
    abs_mean: torch.Tensor  # [C]
    abs_max: torch.Tensor  # [C]
    tokens: int
    sample: torch.Tensor | None = None  # [<= SAMPLE_ROWS, C]: every SAMPLE_STRIDE-th input row, for errors that
    # depend on the inputs themselves (quantized activations), not only on X^T X
    cross: torch.Tensor | None = None  # [C, C] float32, (X_float - X)^T X / tokens: how the float model's input to
    # the layer differs from this one (GPTAQ); None without a reference or where the rows do not pair up (experts)


class _Sum:
    """A float64 sum of [C, C] products, each added in float32 first until FLUSH_ROWS rows are pending: converting a
    product per window (inputs of one 512-token window at a time) took a seventh of the statistics pass."""

    def __init__(self, channels: int):
        self.total = torch.zeros(channels, channels, dtype=torch.float64)
        self.partial, self.pending = None, 0

    def add(self, left: torch.Tensor, right: torch.Tensor) -> None:
        product = left.T @ right
        self.partial = product if self.partial is None else self.partial.add_(product)
        self.pending += left.shape[0]
        if self.pending >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> torch.Tensor:
        if self.partial is not None:
            self.total += self.partial.double()
            self.partial, self.pending = None, 0
        return self.total


class _Accumulator:
    def __init__(self):
        self.gram = None

    def add(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """Add inputs `x`; with `reference`, the float model's inputs for the same tokens, to the cross term."""
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if self.gram is None:
            channels = rows.shape[1]
            self.gram = _Sum(channels)
            self.cross = _Sum(channels) if reference is not None else None
            self.abs_sum = torch.zeros(channels, dtype=torch.float64)
            self.abs_max = torch.zeros(channels)
            self.tokens = self.sampled = 0
            self.rows: list[torch.Tensor] = []
        self.gram.add(rows, rows)
        if self.cross is not None:
            if reference is None or reference.numel() != rows.numel():
                self.cross = None  # rows that do not pair up token by token (an expert's routed tokens)
            else:
                self.cross.add(reference.detach().reshape(rows.shape).float() - rows, rows)
        if self.sampled < SAMPLE_ROWS:
            self.rows.append(rows[::SAMPLE_STRIDE][:SAMPLE_ROWS - self.sampled].clone())
            self.sampled += len(self.rows[-1])
        magnitude = rows.abs()
        self.abs_sum += magnitude.sum(0).double()
        self.abs_max = torch.maximum(self.abs_max, magnitude.amax(0))
        self.tokens += rows.shape[0]

    def stats(self) -> InputStats:
        cross = None if self.cross is None else (self.cross.flush() / self.tokens).float()
        return InputStats((self.gram.flush() / self.tokens).float(), (self.abs_sum / self.tokens).float(), self.abs_max,
                          self.tokens, torch.cat(self.rows), cross)


def _no_tokens(linear: nn.Linear) -> InputStats:
    channels = linear.in_features
    return InputStats(torch.zeros(channels, channels), torch.zeros(channels), torch.zeros(channels), 0)


class _StopBlock(Exception):
    """Raised by a hook once the Linears of interest have run: the rest of the block is skipped."""


@dataclass
class Stage:
    names: list[str]  # qualified names of Linears reading one input, forward order
    linears: list[nn.Linear]


def block_inputs(model: nn.Module, windows: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Inputs of the first block for every window ([N, T, hidden]) and the keyword arguments of each block.

    Blocks need not share their call: models that alternate sliding-window
    and global attention pass each layer its own mask and rotary embedding.
    The keyword arguments of every block come from one full forward of the
    first window; they broadcast over batches of windows of the same length.
    """
    _, blocks = transformer_blocks(model)
    captured: list[torch.Tensor] = []
    calls: list[dict[str, Any] | None] = [None] * len(blocks)

    def grab(index):
        def hook(module, args, kwargs):
            if index == 0:
                captured.append((args[0] if args else kwargs["hidden_states"]).detach())
            if calls[index] is None:
                calls[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            elif index == 0:
                raise _StopBlock  # later windows only need block 0's input
        return hook

    handles = [block.register_forward_pre_hook(grab(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        forward_windows(model, windows)
    finally:
        for handle in handles:
            handle.remove()
    if any(call is None for call in calls):
        raise MixbitsError("the model's forward skipped some of its blocks; block-wise calibration needs every block")
    return torch.cat(captured), calls


def forward_windows(model: nn.Module, windows: torch.Tensor) -> None:
    """Run the model on each window alone, for what hooks record; a hook may stop a window early (_StopBlock)."""
    with torch.no_grad():
        for window in windows:
            try:
                model(window[None], use_cache=False)
            except _StopBlock:
                pass


def _run(block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any]) -> Iterator[torch.Tensor | None]:
    """Block outputs batch by batch (None for a batch a hook stopped early)."""
    with torch.no_grad():
        for start in range(0, len(inputs), BATCH):
            try:
                out = block(inputs[start:start + BATCH], **kwargs)
            except _StopBlock:
                yield None
                continue
            yield out[0] if isinstance(out, tuple) else out


def run_block(block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """A block's outputs for all `inputs`, computed in batches of windows."""
    return torch.cat(list(_run(block, inputs, kwargs)))


class BlockCalibration:
    """Statistics and outputs of one block for a fixed set of inputs.

    `reference`, if given, is (the block as the float model has it, the float
    model's inputs to it): statistics then hold each Linear's cross term.
    """

    def __init__(self, block: nn.Module, prefix: str, inputs: torch.Tensor, kwargs: dict[str, Any],
                 reference: tuple[nn.Module, torch.Tensor] | None = None):
        self.block, self.prefix, self.inputs, self.kwargs = block, prefix, inputs, kwargs  # kwargs: this block's call
        self.reference = reference
        self._reference_outputs: torch.Tensor | None = None

    def stages(self) -> list[Stage]:
        """Linears grouped by the input tensor they read, in forward order (from one window)."""
        names = {module: f"{self.prefix}.{name}" for name, module in self.block.named_modules() if isinstance(module, nn.Linear)}
        seen: list[tuple[nn.Linear, torch.Tensor]] = []
        handles = [m.register_forward_pre_hook(lambda m, args: seen.append((m, args[0]))) for m in names]
        try:
            next(_run(self.block, self.inputs[:1], self.kwargs))
        finally:
            for handle in handles:
                handle.remove()
        stages: list[Stage] = []
        last_input = None
        for module, x in seen:
            if any(module in stage.linears for stage in stages):
                continue  # a Linear called twice keeps its first stage
            if x is last_input:
                stages[-1].names.append(names[module])
                stages[-1].linears.append(module)
            else:
                stages.append(Stage([names[module]], [module]))
            last_input = x
        called = {linear for stage in stages for linear in stage.linears}
        # Linears the first window did not reach (experts its tokens were not routed to), each on its own, last.
        stages += [Stage([name], [module]) for module, name in names.items() if module not in called]
        return stages

    def stats(self, linears: list[nn.Linear]) -> dict[nn.Linear, InputStats]:
        """Input statistics of `linears` under the block's current weights.

        Each Linear's input is accumulated once even when several share it;
        the block stops after the last of them has run. A Linear no window
        reaches (an expert nothing is routed to) gets statistics of 0 tokens.
        """
        accumulators: dict[nn.Linear, _Accumulator] = {}
        remaining: set[nn.Linear] = set()
        batch_inputs: list[tuple[torch.Tensor, _Accumulator]] = []
        floats = self._float_inputs(linears)
        batch = {}

        def record(module, args):
            x = args[0]
            shared = next((acc for seen, acc in batch_inputs if seen is x), None)
            if shared is None:
                shared = accumulators.setdefault(module, _Accumulator())
                float_input = batch["floats"].get(module) if floats is not None else None
                # Only inputs of every token pair up row by row with the float model's (not an expert's routed ones).
                whole = x.shape[:-1].numel() == batch["tokens"]
                shared.add(x, float_input if whole and float_input is not None else None)
                batch_inputs.append((x, shared))
            accumulators.setdefault(module, shared)
            remaining.discard(module)
            if not remaining:
                raise _StopBlock

        handles = [linear.register_forward_pre_hook(record) for linear in linears]
        try:
            for start in range(0, len(self.inputs), BATCH):
                remaining.update(linears)
                batch_inputs.clear()
                window = self.inputs[start:start + BATCH]
                batch["tokens"] = window.shape[:-1].numel()
                if floats is not None:
                    batch["floats"] = next(floats)
                for _ in _run(self.block, window, self.kwargs):
                    pass
        finally:
            for handle in handles:
                handle.remove()
        return {linear: accumulators[linear].stats() if linear in accumulators else _no_tokens(linear) for linear in linears}

    def _float_inputs(self, linears: list[nn.Linear]) -> Iterator[dict[nn.Linear, torch.Tensor]] | None:
        """Per batch of windows, the input each of `linears` gets in the float model (its twin in the reference block,
        on the reference inputs), or None without a reference."""
        if self.reference is None:
            return None
        block, inputs = self.reference
        twins = dict(block.named_modules())
        pairs = {twins[name]: module for name, module in self.block.named_modules() if module in set(linears)}

        def batches():
            for start in range(0, len(inputs), BATCH):
                found: dict[nn.Linear, torch.Tensor] = {}

                def capture(module, args):
                    found.setdefault(pairs[module], args[0])
                    if len(found) == len(pairs):
                        raise _StopBlock

                handles = [twin.register_forward_pre_hook(capture) for twin in pairs]
                try:
                    for _ in _run(block, inputs[start:start + BATCH], self.kwargs):
                        pass
                finally:
                    for handle in handles:
                        handle.remove()
                yield found

        return batches()

    def outputs(self) -> torch.Tensor:
        return run_block(self.block, self.inputs, self.kwargs)

    def reference_outputs(self) -> torch.Tensor:
        """The float block's outputs on the float inputs (the next block's reference inputs, and tuning's targets),
        computed once: the float copy never changes."""
        if self._reference_outputs is None:
            block, inputs = self.reference
            self._reference_outputs = run_block(block, inputs, self.kwargs)
        return self._reference_outputs


class SequentialCalibration:
    """Calibration of each block in order, as an iterable of `BlockCalibration`.

    The next block's inputs are the outputs of the previous block as it is
    when the caller resumes the iteration (quantized, if the caller quantized
    it); after the last block, `outputs` holds the last block's outputs. With
    `reference`, each block is copied before it is yielded, and the copies
    carry the float model's activations alongside (`reference_outputs` at
    the end): the statistics' cross terms.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, reference: bool = False):
        self.model, self.windows, self.reference = model, windows, reference
        self.outputs: torch.Tensor | None = None
        self.reference_outputs: torch.Tensor | None = None

    def __iter__(self) -> Iterator[BlockCalibration]:
        prefix, blocks = transformer_blocks(self.model)
        inputs, calls = block_inputs(self.model, self.windows)
        floats = inputs if self.reference else None
        for index, block in enumerate(blocks):
            original = copy.deepcopy(block) if self.reference else None
            calibration = BlockCalibration(block, f"{prefix}.{index}", inputs, calls[index],
                                           None if original is None else (original, floats))
            yield calibration
            inputs = calibration.outputs()
            if original is not None:
                floats = calibration.reference_outputs()
        self.outputs, self.reference_outputs = inputs, floats


def input_stats(inputs: torch.Tensor, reference: torch.Tensor | None = None) -> InputStats:
    """Statistics of a tensor of inputs [..., C] taken directly (e.g. the output head's), with the cross term against
    `reference` (the float model's inputs) if given."""
    accumulator = _Accumulator()
    for start in range(0, len(inputs), BATCH):
        accumulator.add(inputs[start:start + BATCH], None if reference is None else reference[start:start + BATCH])
    return accumulator.stats()


def calibration_stats(model: nn.Module, windows: torch.Tensor) -> dict[str, InputStats]:
    """Input statistics of every Linear in the blocks of the unmodified model, by qualified name."""
    found: dict[str, InputStats] = {}
    for calibration in SequentialCalibration(model, windows):
        for stage in calibration.stages():
            stats = calibration.stats(stage.linears)
            found.update({name: stats[linear] for name, linear in zip(stage.names, stage.linears)})
    return found


def calibration_data(model, source, count: int, length: int) -> tuple[torch.Tensor, dict]:
    """Calibration token windows [count, length] and a record of what they are.

    `source` is None for the default calibration mix (`mixbits.corpus`), a
    text source name, a text file or folder (windows from the start of its
    first half), or the windows themselves as a [windows, tokens] int64 tensor.
    """
    if isinstance(source, torch.Tensor):
        if source.dim() != 2 or source.dtype != torch.long:
            raise MixbitsError("calibration token windows must be a [windows, tokens] int64 tensor")
        return source, {"text": calibration_name(source), "count": source.shape[0], "length": source.shape[1], "start": 0}
    tokenizer = model.tokenizer if isinstance(model, LoadedModel) else None
    if tokenizer is None:
        raise MixbitsError("gptq, awq and plans need calibration text: load the model with its tokenizer, "
                           "or pass calibration= a [windows, tokens] tensor of token ids")
    if source is None:
        return calibration_mix(tokenizer, count, length)
    text = resolve_text(source)
    windows, spec = calibration_windows(tokenize(text, tokenizer), count, length, bos_token_id(tokenizer))
    return windows, {"text": text.name, "text_sha256": text.sha256, **spec.as_dict()}


def calibration_name(source) -> str:
    """The name `calibration_data` records for `source`: the mix's, the text's, or the token windows' digest (so a
    sensitivity measured on token ids is reused only on the same ids)."""
    if isinstance(source, torch.Tensor):
        import hashlib

        return f"token ids sha256 {hashlib.sha256(source.contiguous().numpy().tobytes()).hexdigest()[:16]}"
    if source is None:
        return MIX_NAME
    return resolve_text(source).name


def calibrated_texts(record) -> tuple[str, ...] | None:
    """Names of the texts a `calibration_data` record drew from: () for none (data-free), None if unknown (token ids)."""
    if not isinstance(record, dict):
        return ()
    if isinstance(record.get("sources"), list):
        return tuple(str(s.get("name")) for s in record["sources"] if isinstance(s, dict))
    if "text_sha256" in record:
        return (str(record.get("text")),)
    return None

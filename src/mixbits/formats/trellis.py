"""Trellis codes after incoherence processing (QTIP, Tseng et al., 2024): a bit-shift trellis over a fixed codebook.

`trellisDxK:ch[:state=L][:scale=CODEC]`: each row is rotated (random signs, then
a Hadamard transform along the inputs), divided by its scale, and coded as a
walk through a trellis of 2^L states: every step covers D consecutive weights
and shifts K new bits into an L-bit state; the D weights are the state's
codeword, row `state` of a fixed table of 2^L x D pseudo-random Gaussian
values (the rotation makes the weights close to Gaussian). A row of C weights
is C / D steps and costs K bits a step plus the first state's other bits:
(C / D + P) * K bits with P = ceil(L / K) - 1, plus its scale. So
`trellis2x4:ch` is 2 bits per weight, `trellis2x5:ch` 2.5 and `trellis2x6:ch`
3, plus a few bits per row. The table and the signs are functions of the
format and the row length: nothing of them is stored.

The bit stream: a row's codes are symbols of K bits, s_0, s_1, ...; the state
of step t is the top L bits of the (P + 1) K bits of s_t .. s_{t+P}, the newest
symbol highest, so the next state is (state >> K) | (s << (L - K)). Encoding is
the Viterbi algorithm: the walk whose codewords are nearest to the row in
(weighted) squared error, among all 2^(L + K (T - 1)) walks of T steps.
GPTQ feeds each block of columns' error forward as for any format
(`solvers.gptq`), the walk continuing from the previous block's last state.

The rotation R = diag(signs) H / sqrt(C) is orthogonal, so x W^T = (x R)(W R)^T:
the runtime rotates its inputs and multiplies by the rotated rows directly.
It needs a Hadamard matrix of order C (`transforms.hadamard`: 576 and 1536
are 36 x 16 and 12 x 128) or falls back to a seeded random orthogonal matrix.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import FormatError
from .base import Clip, Format
from .granularity import Granularity, Grouped
from .naming import granularity_field, int_option, scale_option, scale_suffix, split
from .scales import DEFAULT_SCALE, ScaleCodec

DEFAULT_STATE_BITS = 12
MAX_STATE_BITS = 16
MAX_DIM = 4
SIGN_SEED = 0x5EED
# The scale multipliers `fit` tries (times each row's RMS), on a sample of rows.
SCALE_GRID = (0.9, 1.0, 1.1, 1.2)
FIT_ROWS = 16
VITERBI_ROWS = 256  # rows per call of the torch Viterbi (its back pointers: rows x steps x 2^(L-K) bytes)


def _splitmix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 values (wrapping arithmetic): well-mixed, portable bits."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@functools.cache
def _table(state_bits: int, dim: int) -> torch.Tensor:
    uniform = ((_splitmix(np.arange(2**state_bits * dim, dtype=np.uint64) + np.uint64(dim << 32))
                >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return torch.special.ndtri(torch.from_numpy(uniform)).float().reshape(2**state_bits, dim)


def codebook(state_bits: int, dim: int) -> torch.Tensor:
    """The fixed codebook [2^L, D]: standard normal quantiles of hashed state numbers (a fresh copy)."""
    return _table(state_bits, dim).clone()


@functools.cache
def _signs(cols: int) -> torch.Tensor:
    bits = _splitmix(np.arange(cols, dtype=np.uint64) + np.uint64(SIGN_SEED << 32)) >> np.uint64(63)
    return torch.from_numpy(1.0 - 2.0 * bits.astype(np.float64)).float()


def rotate(rows: torch.Tensor) -> torch.Tensor:
    """Rows [..., C] times R (random signs, then the normalised Hadamard transform of order C)."""
    from ..transforms.hadamard import hadamard_transform

    return hadamard_transform(rows * _signs(rows.shape[-1]), dim=-1)


def unrotate(rows: torch.Tensor) -> torch.Tensor:
    """Rows [..., C] times R^T, undoing `rotate` (by the fast transform, transposed: no C x C matrix)."""
    from ..transforms.hadamard import hadamard_transform

    return hadamard_transform(rows, dim=-1, transpose=True) * _signs(rows.shape[-1])


def viterbi(target: torch.Tensor, weight: torch.Tensor | None, table: torch.Tensor, step_bits: int,
            start: torch.Tensor | None = None) -> torch.Tensor:
    """The states [N, T] of the best walk for each of N sequences `target` [N, T, D]: the least sum over steps of
    sum_d weight (target - table[state])^2 (`weight` [N, T, D] or [T, D], None for 1), over walks of the bit-shift
    trellis of 2^L = len(table) states whose first state follows `start` [N] (a previous walk's last state) if
    given, else is free. Ties go to the lowest state. The native kernel when built, else torch."""
    from ..runtime.kernels import native

    n, steps, dim = target.shape
    if weight is None:
        weight = torch.ones(steps, dim)
    weight = weight.float().expand(n, steps, dim).contiguous()
    first = torch.full((n,), -1, dtype=torch.int64) if start is None else start.long()
    module = native()
    if module is not None:
        return module.trellis_viterbi(target.float().contiguous(), weight, table.float().contiguous(), step_bits,
                                      first.contiguous()).long()
    return torch.cat([_viterbi_torch(target[i:i + VITERBI_ROWS].float(), weight[i:i + VITERBI_ROWS], table.float(),
                                     step_bits, first[i:i + VITERBI_ROWS])
                      for i in range(0, n, VITERBI_ROWS)]) if n else torch.zeros(0, steps, dtype=torch.long)


def _viterbi_torch(target, weight, table, step_bits: int, start: torch.Tensor) -> torch.Tensor:
    n, steps, dim = target.shape
    states = table.shape[0]
    fanin, kept = 2**step_bits, states >> step_bits  # predecessors per state; states sharing them
    squares = table.square().T  # [D, S]
    back = torch.zeros(steps, n, kept, dtype=torch.uint8 if fanin <= 256 else torch.int16)
    cost = torch.full((n, states), math.inf)
    free = start < 0
    cost[free] = 0.0
    cost[~free, start[~free]] = 0.0
    after = free.clone()  # rows whose first state is free take no transition at step 0
    for t in range(steps):
        w = weight[:, t]
        error = w @ squares - 2 * (w * target[:, t]) @ table.T  # sum_d w (x - c)^2 less its constant
        if t == 0 and bool(after.all()):
            cost = error
            continue
        # State s = (sym << (L-K)) | r follows the 2^K states (r << K) | j: the best of them for each r.
        best, choice = cost.reshape(n, kept, fanin).min(dim=2)
        back[t] = choice.to(back.dtype)
        moved = best.repeat(1, fanin) + error
        cost = torch.where(after[:, None], error, moved) if t == 0 else moved
    path = torch.empty(n, steps, dtype=torch.long)
    state = cost.argmin(dim=1)
    low = kept - 1
    for t in range(steps - 1, -1, -1):
        path[:, t] = state
        if t:
            r = state & low
            state = (r << step_bits) | back[t].long().gather(1, r[:, None])[:, 0] & (fanin - 1)
    return path


@dataclass(frozen=True)
class TrellisFormat(Format):
    dim: int
    step_bits: int
    granularity: Granularity
    state_bits: int = DEFAULT_STATE_BITS
    scale: ScaleCodec = DEFAULT_SCALE
    show_scale: bool = field(default=False, compare=False)
    clip_grid = (1.0,)  # `fit` searches the scale itself
    rounds_each_weight = False

    PATTERN = re.compile(r"trellis(\d+)x(\d+)")

    def __post_init__(self):
        if not 1 <= self.dim <= MAX_DIM or not 1 <= self.step_bits <= 8:
            raise FormatError(f"trellis codes take 1 to {MAX_DIM} weights per step and 1 to 8 bits per step, got "
                              f"trellis{self.dim}x{self.step_bits}; e.g. trellis2x5:ch (2.5 bits per weight)")
        if not self.step_bits < self.state_bits <= MAX_STATE_BITS:
            raise FormatError(f"a trellis state needs more bits than a step and at most {MAX_STATE_BITS}, got "
                              f"state={self.state_bits} with {self.step_bits}-bit steps")
        if self.granularity.kind != "channel":
            raise FormatError(f"trellis codes take one scale per row (ch), got {self.granularity}; e.g. "
                              f"trellis{self.dim}x{self.step_bits}:ch")

    @classmethod
    def parse(cls, text: str) -> "TrellisFormat":
        head, positional, options = split(text, ("state", "scale"))
        match = cls.PATTERN.fullmatch(head)
        if not match or len(positional) != 1:
            raise FormatError(f"{text!r}: write a trellis code as trellisDxK:ch, e.g. trellis2x5:ch (2 weights per "
                              "5-bit step) or trellis2x4:ch:state=14")
        scale, explicit = scale_option(options)
        state = int_option(text, options, "state")
        state = DEFAULT_STATE_BITS if state is None else state
        return cls(int(match.group(1)), int(match.group(2)), granularity_field(text, positional, f"{head}:ch"),
                   state, scale, explicit)

    def __str__(self) -> str:
        state = f":state={self.state_bits}" if self.state_bits != DEFAULT_STATE_BITS else ""
        return f"trellis{self.dim}x{self.step_bits}:{self.granularity}{state}" + scale_suffix(self.scale, self.show_scale)

    @property
    def vector_size(self) -> int:
        return self.dim

    @property
    def code_bits(self) -> int:
        return self.step_bits

    @property
    def code_bits_per_weight(self) -> float:
        return self.step_bits / self.dim

    @property
    def prefix(self) -> int:
        """Symbols before the first step's own: the first state's other L - K bits, in whole symbols."""
        return -(-self.state_bits // self.step_bits) - 1

    def steps(self, cols: int) -> int:
        if cols % self.dim:
            raise FormatError(f"{self} cannot cut rows of {cols} weights into steps of {self.dim}; use trellis1x"
                              f"{max(1, self.step_bits // self.dim)}:ch or another format for this layer")
        return cols // self.dim

    def code_count(self, rows: int, cols: int) -> int:
        return rows * (self.steps(cols) + self.prefix)

    def parameter_bits(self, rows: int, cols: int) -> int:
        return self.per_group_bits(self.scale, rows, cols)

    def stored_params(self) -> dict[str, ScaleCodec]:
        return {"scale": self.scale}

    @property
    def table(self) -> torch.Tensor:
        return _table(self.state_bits, self.dim)

    # Codes are [R, 1, P + T]: each row's symbols, as stored.

    def flat_codes(self, codes: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        return codes[:, 0, :]

    def grouped_codes(self, flat: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        return flat.reshape(shape[0], 1, -1)

    @property
    def stream_offset(self) -> int:
        """The bit of a row's stream where the first step's state starts, (P + 1) K - L."""
        return (self.prefix + 1) * self.step_bits - self.state_bits

    def states(self, codes: torch.Tensor) -> torch.Tensor:
        """Each step's state [..., T] from symbols [..., P + T]."""
        k, shift = self.step_bits, self.stream_offset
        symbols = codes.long()
        steps = symbols.shape[-1] - self.prefix
        window = sum(symbols[..., j:j + steps] << (j * k) for j in range(self.prefix + 1))
        return window >> shift

    def symbols(self, states: torch.Tensor) -> torch.Tensor:
        """Symbols [..., P + T] of the walk through `states` [..., T] (consecutive states must follow each other)."""
        k, shift = self.step_bits, self.stream_offset
        window = states[..., :1] << shift
        first = [(window >> (j * k)) & (2**k - 1) for j in range(self.prefix)]
        return torch.cat([*first, states >> (self.state_bits - k)], dim=-1)

    def fit(self, grouped: Grouped, clip: Clip = 1.0, importance=None) -> dict[str, torch.Tensor]:
        return self.fit_rotated(rotate(grouped.values[:, 0, :].float()), clip)

    def fit_rotated(self, rotated: torch.Tensor, clip: Clip = 1.0) -> dict[str, torch.Tensor]:
        """A scale per row of already rotated rows [R, C]: its RMS times the multiplier of SCALE_GRID that codes a
        sample of rows with the least squared error."""
        rms = rotated.square().mean(dim=1, keepdim=True).sqrt().clamp(min=1e-30)
        sample = torch.linspace(0, rotated.shape[0] - 1, min(FIT_ROWS, rotated.shape[0])).round().long().unique()
        errors = []
        for multiplier in SCALE_GRID:
            scale = self.scale.round(rms[sample] * multiplier * clip)
            approx = self._walk(rotated[sample] / scale) * scale
            errors.append(float((approx - rotated[sample]).square().sum()))
        best = SCALE_GRID[int(np.argmin(errors))]
        return {"scale": self.scale.round(rms * best * clip)[:, None, :]}

    def _walk(self, rows: torch.Tensor) -> torch.Tensor:
        """The codewords of the best walk for scaled rotated `rows` [R, C], [R, C]."""
        steps = self.steps(rows.shape[-1])
        states = viterbi(rows.reshape(rows.shape[0], steps, self.dim), None, self.table, self.step_bits)
        return self.table[states].reshape(rows.shape)

    def encode(self, values: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        rows, cols = values.shape[0], values.shape[-1]
        rotated = rotate(values[:, 0, :].float()) / params["scale"][:, 0, :]
        states = viterbi(rotated.reshape(rows, self.steps(cols), self.dim), None, self.table, self.step_bits)
        return self.symbols(states)[:, None, :].to(torch.uint8)

    def rotated_values(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoded rows in the rotated basis, [R, C]."""
        states = self.states(codes[:, 0, :])
        return self.table[states].reshape(states.shape[0], -1) * params["scale"][:, 0, :]

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return unrotate(self.rotated_values(codes, params))[:, None, :]

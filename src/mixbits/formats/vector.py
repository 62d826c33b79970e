"""Vector codebooks: `d` consecutive weights of a row share one code, an index into a learned codebook.

`vqDxI:GRAN[:stages=S][:scale=CODEC][:table=CODEC]`: vectors of D weights
along the inputs, each coded by S indices of I bits into S codebooks of 2^I
vectors (residual stages: stage s codes what the stages before it left), times
a scale per group (GRAN: ch for one per row, gN with N a multiple of D). The
codes cost S * I / D bits per weight; the codebooks, one set per matrix
(S * 2^I * D entries in the table codec, fp16 by default), and the scales are
counted in the matrix's bits and stored with it. `vq4x8:ch` is 2 bits per
weight plus 16 per row plus 16 KiB of codebook per matrix.

The scale is each group's RMS. The codebooks are learned by k-means over the
matrix's vectors divided by their scale, each coordinate weighted by its
importance (the Hessian's diagonal, as GPTVQ and SqueezeLLM weigh) times its
group's squared scale, seeded by
k-means++ on a fixed-seed sample of the vectors. `encode` picks the nearest
codeword stage by stage (greedy residual); GPTQ picks it in the metric of the
inverse Hessian of the columns not yet rounded (`nearest_codes` with a
`metric`, see `solvers.gptq`).

Groups are whole vectors; per-row scales (ch) need rows of a multiple of D
weights. A partial last group is padded as every format pads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import FormatError
from .base import Clip, Format
from .granularity import Granularity, Grouped
from .lut import fit_weights
from .naming import granularity_field, int_option, scale_option, scale_suffix, split
from .scales import DEFAULT_SCALE, ScaleCodec, scale_codec

MAX_DIM, MAX_INDEX_BITS, MAX_STAGES = 16, 16, 4
KMEANS_STEPS = 20
SAMPLES_PER_CODEWORD = 64  # k-means fits the codebook to at most this many vectors per codeword, drawn at random
DISTANCE_ELEMENTS = 2**24  # vectors x codewords per chunk of a nearest-codeword search (64 MiB of float32)


def nearest_codes(vectors: torch.Tensor, books: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy residual codes [N, S] of `vectors` [N, d] in codebooks `books` [S, K, d].

    With `metric` M [d, d], distances are |(v - c) M|^2 (GPTQ passes the inverse of the upper factor of the
    columns' inverse Hessian); without, Euclidean.
    """
    residual = vectors if metric is None else vectors @ metric
    codes = []
    for book in books:
        mapped = book if metric is None else book @ metric
        code = _nearest(residual, mapped)
        codes.append(code)
        residual = residual - mapped[code]
    return torch.stack(codes, dim=-1)


def _nearest(points: torch.Tensor, centers: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest of `centers` [K, d] for each of `points` [N, d], in chunks; coordinates weighted by
    `weights` [N, d] if given. Distances come from one matrix product (|c|^2 - 2 x.c); the two closest are then
    compared exactly, so a point on a codeword finds that codeword. Ties go to the lower index."""
    squares = (centers * centers).T  # [d, K]
    chunk = max(1, DISTANCE_ELEMENTS // max(1, centers.shape[0]))
    found = []
    for start in range(0, points.shape[0], chunk):
        x = points[start:start + chunk]
        w = None if weights is None else weights[start:start + chunk]
        distance = squares.sum(0) - 2 * x @ centers.T if w is None else w @ squares - 2 * (w * x) @ centers.T
        if centers.shape[0] == 1:
            found.append(distance.argmin(dim=1))
            continue
        candidates = distance.topk(2, dim=1, largest=False).indices.sort(dim=1).values  # [n, 2], lower index first
        gap = (x[:, None, :] - centers[candidates]) ** 2
        exact = (gap if w is None else gap * w[:, None, :]).sum(-1)
        found.append(candidates.gather(1, (exact[:, 1] < exact[:, 0]).long()[:, None])[:, 0])
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)


def kmeans(points: torch.Tensor, weights: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` centers [count, d] of `points` [N, d] under per-coordinate `weights` (k-means++ seeding, then
    Lloyd's steps on a sample of SAMPLES_PER_CODEWORD points per center), deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    if points.shape[0] > SAMPLES_PER_CODEWORD * count:
        # Drawn in proportion to each point's total weight, with replacement, and weighted by how often it was drawn
        # (its coordinates in their own proportions): the sample's weighted error estimates the whole set's without
        # bias. A uniform sample misses the few heavy points that dominate the error (a down_proj input channel with
        # 3000 times the median H_jj), and the codebook then has no codewords where they lie.
        mass = weights.sum(dim=1)
        if not bool(mass.sum() > 0):
            mass = torch.ones_like(mass)
        pick = torch.multinomial(mass / mass.sum(), SAMPLES_PER_CODEWORD * count, replacement=True,
                                 generator=generator)
        pick, drawn = pick.unique(return_counts=True)
        points = points[pick]
        weights = weights[pick] / mass[pick, None].clamp(min=1e-30) * drawn[:, None]
    n = points.shape[0]
    centers = torch.empty(count, points.shape[1])
    centers[0] = points[torch.randint(n, (1,), generator=generator)]
    gap = (weights * (points - centers[0]) ** 2).sum(dim=1)
    for k in range(1, count):
        total = float(gap.sum())
        index = int(torch.multinomial(gap / total, 1, generator=generator)) if total > 0 else k % n
        centers[k] = points[index]
        gap = torch.minimum(gap, (weights * (points - centers[k]) ** 2).sum(dim=1))
    for _ in range(KMEANS_STEPS):
        index = _nearest(points, centers, weights)
        total = torch.zeros_like(centers).index_add_(0, index, weights * points)
        mass = torch.zeros_like(centers).index_add_(0, index, weights)
        centers = torch.where(mass > 0, total / mass.clamp(min=1e-30), centers)
    return centers


@dataclass(frozen=True)
class VectorFormat(Format):
    dim: int
    index_bits: int
    granularity: Granularity
    stages: int = 1
    scale: ScaleCodec = DEFAULT_SCALE
    table: ScaleCodec = DEFAULT_SCALE
    show_scale: bool = field(default=False, compare=False)
    show_table: bool = field(default=False, compare=False)
    clip_grid = (1.0,)  # k-means places the codewords itself
    shared_across_rows = True
    rounds_each_weight = False

    PATTERN = re.compile(r"vq(\d+)x(\d+)")

    def __post_init__(self):
        if not 1 <= self.dim <= MAX_DIM or not 1 <= self.index_bits <= MAX_INDEX_BITS:
            raise FormatError(f"vector codebooks take vectors of 1 to {MAX_DIM} weights and indices of 1 to "
                              f"{MAX_INDEX_BITS} bits, got vq{self.dim}x{self.index_bits}; e.g. vq4x8:ch")
        if not 1 <= self.stages <= MAX_STAGES:
            raise FormatError(f"vector codebooks take 1 to {MAX_STAGES} stages, got {self.stages}")
        if self.granularity.kind == "tensor" or (self.granularity.kind == "group" and self.granularity.size % self.dim):
            raise FormatError(f"vq{self.dim}x{self.index_bits} needs per-row scales (ch) or groups of a multiple of "
                              f"{self.dim} weights, got {self.granularity}")

    @classmethod
    def parse(cls, text: str) -> "VectorFormat":
        head, positional, options = split(text, ("stages", "scale", "table"))
        match = cls.PATTERN.fullmatch(head)
        if not match or len(positional) != 1:
            raise FormatError(f"{text!r}: write a vector codebook as vqDxI:GRAN, e.g. vq4x8:ch (4 weights per 8-bit "
                              "index) or vq8x8:ch:stages=2")
        scale, explicit = scale_option(options)
        table = scale_codec(options["table"]) if "table" in options else DEFAULT_SCALE
        stages = int_option(text, options, "stages") or 1
        return cls(int(match.group(1)), int(match.group(2)), granularity_field(text, positional, f"{head}:ch"),
                   stages, scale, table, explicit, "table" in options)

    def __str__(self) -> str:
        stages = f":stages={self.stages}" if self.stages > 1 else ""
        table = f":table={self.table.name}" if self.show_table or self.table != DEFAULT_SCALE else ""
        return (f"vq{self.dim}x{self.index_bits}:{self.granularity}{stages}"
                + scale_suffix(self.scale, self.show_scale) + table)

    @property
    def vector_size(self) -> int:
        return self.dim

    @property
    def code_bits(self) -> int:
        return self.index_bits

    @property
    def code_bits_per_weight(self) -> float:
        return self.index_bits * self.stages / self.dim

    @property
    def codewords(self) -> int:
        return 2**self.index_bits

    def code_count(self, rows: int, cols: int) -> int:
        return rows * -(-cols // self.dim) * self.stages

    def parameter_bits(self, rows: int, cols: int) -> int:
        return self.per_group_bits(self.scale, rows, cols) + self.table.bits(1, self.stages * self.codewords * self.dim)

    def stored_params(self) -> dict[str, ScaleCodec]:
        return {"scale": self.scale, "codebook": self.table}

    def param_shape(self, name: str, rows: int, cols: int) -> tuple[int, int, int]:
        if name == "codebook":
            return self.stages, self.codewords, self.dim
        return rows, self.granularity.groups_per_row(cols), 1

    # Grouped codes are [R, G, S * v]: each group's v vectors' codes, stage by stage.

    def vectors(self, values: torch.Tensor) -> torch.Tensor:
        """Grouped `values` [R, G, g] as vectors [R, G, g / d, d]."""
        if values.shape[-1] % self.dim:
            raise FormatError(f"{self} cannot cut rows of {values.shape[-1]} weights into vectors of {self.dim}; use "
                              f"groups of a multiple of {self.dim} (e.g. vq{self.dim}x{self.index_bits}:g{8 * self.dim}) "
                              "or a smaller vector")
        return values.reshape(*values.shape[:-1], -1, self.dim)

    def fit(self, grouped: Grouped, clip: Clip = 1.0, importance=None) -> dict[str, torch.Tensor]:
        values = grouped.values
        present = torch.ones_like(values) if grouped.mask is None else grouped.mask.expand_as(values).float()
        mean_square = (values * values * present).sum(-1, keepdim=True) / present.sum(-1, keepdim=True)
        scale = self.scale.round(mean_square.sqrt() * clip)
        points = self.vectors(values / scale).reshape(-1, self.dim)
        # A scaled point's error costs scale^2 times its importance in the weights' own units.
        weights = self.vectors(fit_weights(grouped, importance) * scale.square()).reshape(-1, self.dim)
        books = []
        for stage in range(self.stages):
            book = self.table.round(kmeans(points, weights, self.codewords, seed=stage))
            books.append(book)
            points = points - book[_nearest(points, book, weights)]
        return {"scale": scale, "codebook": torch.stack(books)}

    def encode(self, values: torch.Tensor, params: dict[str, torch.Tensor], metric: torch.Tensor | None = None
               ) -> torch.Tensor:
        vectors = self.vectors(values / params["scale"])  # [R, G, v, d]
        codes = nearest_codes(vectors.reshape(-1, self.dim), params["codebook"], metric)
        codes = codes.reshape(*vectors.shape[:-1], self.stages).transpose(-1, -2)  # [R, G, S, v]
        return codes.reshape(*values.shape[:-1], -1).to(torch.uint8 if self.index_bits <= 8 else torch.int32)

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        books = params["codebook"]
        staged = codes.long().reshape(*codes.shape[:-1], self.stages, -1)  # [R, G, S, v]
        vectors = sum(books[s][staged[..., s, :]] for s in range(self.stages))  # [R, G, v, d]
        return vectors.reshape(*codes.shape[:-1], -1) * params["scale"]

    def flat_codes(self, codes: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        rows, cols = shape
        staged = codes.reshape(rows, codes.shape[1], self.stages, -1).transpose(1, 2)  # [R, S, G, v]
        return staged.reshape(rows, self.stages, -1)[..., :-(-cols // self.dim)].reshape(rows, -1)

    def grouped_codes(self, flat: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        rows, cols = shape
        per_group = (self.granularity.size if self.granularity.kind == "group" else cols) // self.dim
        groups = self.granularity.groups_per_row(cols)
        staged = flat.reshape(rows, self.stages, -1)
        pad = groups * per_group - staged.shape[-1]  # vectors wholly in a partial group's padding: its last code
        if pad:
            staged = torch.cat([staged, staged[..., -1:].expand(rows, self.stages, pad)], dim=-1)  # [R, S, G * v]
        return staged.reshape(rows, self.stages, groups, per_group).transpose(1, 2).reshape(rows, groups, -1)

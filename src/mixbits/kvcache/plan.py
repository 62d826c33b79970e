"""Per-layer key and value options of a KV cache, chosen to a budget by the knapsack (KVTuner), and their JSON form.

A KV plan names, for every block, how its keys and how its values are
cached ("none": in the model's precision). Its size is counted at a context
length, since residual windows and partial channel groups hold tokens in 16
bits: `cache_bits(context)` is exact at that length. It lives in the plan file
beside the weights' layers, under "kv_cache":

    "kv_cache": {"context": 4096, "budget": {"bits_per_number": 3.0}, "damage": 0.012,
                 "layers": [{"block": 0, "keys": "int4:g64:asym", "values": "int2:g64:asym"}, ...]}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..allocate import BudgetError, Option, allocate
from ..errors import MixbitsError
from ..schema import COUNT, SIZE, Check, Field, ListOf, Nullable, SchemaError, check, optional
from .options import KVQuant, parse_kv

NONE = "none"  # keys or values cached in the model's precision
KINDS = ("keys", "values")

LAYER_SCHEMA = {"block": Field(COUNT), "keys": Field(str), "values": Field(str)}
KV_SCHEMA = {"context": Field(SIZE), "budget": optional(Nullable(dict)),
             "damage": optional(Nullable(Check(float, lambda x: math.isfinite(x) and x >= 0, "a non-negative number"))),
             "layers": Field(ListOf(LAYER_SCHEMA))}


class KVPlanError(MixbitsError):
    """A KV plan is malformed or does not fit the model."""


@dataclass(frozen=True)
class CacheShape:
    """What a cache's size depends on: blocks, key/value heads, head width, the model's bits per number."""

    blocks: int
    kv_heads: int
    head_dim: int
    model_bits: int = 32

    def numbers(self, context: int) -> int:
        """Numbers one block's keys (or values) hold at `context` tokens."""
        return context * self.kv_heads * self.head_dim

    def bits(self, option: KVQuant | None, context: int) -> int:
        """Exact bits of one block's keys (or values) under `option` at `context` tokens."""
        if option is None:
            return self.numbers(context) * self.model_bits
        return option.cache_bits(context, self.kv_heads, self.head_dim)


@dataclass(frozen=True)
class KVBudget:
    """A cache budget at a context length: mean bits per cached number, or total bytes."""

    context: int
    bits_per_number: float | None = None
    bytes: int | None = None

    def __post_init__(self):
        if (self.bits_per_number is None) == (self.bytes is None):
            raise BudgetError("give the KV budget either as bits per cached number or as a size in bytes")
        if self.context < 1:
            raise BudgetError(f"the KV budget's context must be at least 1 token, got {self.context}")
        if self.bits_per_number is not None and not (math.isfinite(self.bits_per_number) and self.bits_per_number > 0):
            raise BudgetError(f"the KV budget must be a positive number of bits per cached number, got "
                              f"{self.bits_per_number}")
        if self.bytes is not None and self.bytes <= 0:
            raise BudgetError(f"the KV budget must be a positive size, got {self.bytes} bytes")

    def total_bits(self, shape: CacheShape) -> int:
        if self.bytes is not None:
            return 8 * self.bytes
        return math.floor(self.bits_per_number * 2 * shape.blocks * shape.numbers(self.context))

    def as_dict(self) -> dict:
        return {"context": self.context, "bits_per_number": self.bits_per_number, "bytes": self.bytes}


@dataclass
class KVPlan:
    layers: list[tuple[KVQuant | None, KVQuant | None]]  # per block: (keys, values)
    context: int
    budget: dict = field(default_factory=dict)
    damage: float | None = None  # the allocator's predicted total (sum of per-layer KLs)

    def cache_bits(self, shape: CacheShape, context: int | None = None) -> int:
        context = context or self.context
        return sum(shape.bits(option, context) for pair in self.layers for option in pair)

    def as_dict(self) -> dict:
        return {"context": self.context, "budget": self.budget, "damage": self.damage,
                "layers": [{"block": i, "keys": str(k) if k else NONE, "values": str(v) if v else NONE}
                           for i, (k, v) in enumerate(self.layers)]}

    @classmethod
    def from_dict(cls, data: dict) -> "KVPlan":
        try:
            check(data, KV_SCHEMA, "the plan's kv_cache")
        except SchemaError as error:
            raise KVPlanError(f"{error}; make the KV plan with `mixbits kv-plan` or fix the entry") from None
        blocks = [entry["block"] for entry in data["layers"]]
        if blocks != list(range(len(blocks))):
            raise KVPlanError("the plan's kv_cache.layers must list blocks 0, 1, 2, ... in order, once each")
        layers = []
        for entry in data["layers"]:
            try:
                layers.append((parse_kv(entry["keys"]), parse_kv(entry["values"])))
            except MixbitsError as error:
                raise KVPlanError(f"kv_cache block {entry['block']}: {error}") from None
        return cls(layers, data["context"], data.get("budget") or {}, data.get("damage"))

    def check_model(self, shape: CacheShape) -> None:
        if len(self.layers) != shape.blocks:
            raise KVPlanError(f"the KV plan has {len(self.layers)} blocks; this model has {shape.blocks}: make the KV "
                              "plan for this model with `mixbits kv-plan`")
        for pair in self.layers:
            for option in pair:
                if option is not None:
                    option.check_head_dim(shape.head_dim)


def check_budget(shape: CacheShape, options: list[KVQuant], budget: KVBudget) -> None:
    """Refuse, before any measurement, options that do not fit the model's heads and a budget below every
    allocation's size."""
    for option in options:
        option.check_head_dim(shape.head_dim)
    smallest = min([shape.bits(None, budget.context)] + [shape.bits(option, budget.context) for option in options])
    least = 2 * shape.blocks * smallest
    if budget.total_bits(shape) < least:
        numbers = 2 * shape.blocks * shape.numbers(budget.context)
        raise BudgetError(f"the KV budget of {budget.total_bits(shape) / 8:,.0f} bytes is below the smallest cache these "
                          f"options make at {budget.context} tokens ({least / 8:,.0f} bytes, {least / numbers:.3f} bits "
                          "per number); raise it or add smaller options")


def allocate_kv(damage: dict[tuple[int, str], dict[str, float]], shape: CacheShape, budget: KVBudget) -> KVPlan:
    """Per block, the key and value options of least total damage within `budget`: `damage[(block, kind)]` maps
    each measured option string ("none" for the model's precision, damage 0) to its damage."""
    groups = {}
    for (block, kind), options in damage.items():
        choices = {NONE: 0.0, **options}
        groups[f"{block}.{kind}"] = [Option(name, shape.bits(parse_kv(name), budget.context), float(value))
                                     for name, value in choices.items()]
    if sorted(damage) != sorted((b, k) for b in range(shape.blocks) for k in KINDS):
        raise KVPlanError("the KV damage table must hold every block's keys and values")
    chosen = allocate(groups, budget.total_bits(shape))
    layers = [(parse_kv(chosen[f"{b}.keys"].name), parse_kv(chosen[f"{b}.values"].name)) for b in range(shape.blocks)]
    total = sum(option.damage for option in chosen.values())
    return KVPlan(layers, budget.context, budget.as_dict(), total)

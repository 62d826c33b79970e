"""A quantization plan: which option each layer gets, as readable, hand-editable JSON.

The plan is the contract between deciding (measure, allocate) and doing
(quantize). Per layer it names the option (a format string, or "fp16" to keep
the layer in 16-bit), the solver, the layer's shape, its tie group (layers of
one group must share an option, e.g. q/k/v that will be fused) and the damage
the allocator predicted for the layer's group (the same on every layer of a
group: damage is measured per group, so the plan's total counts each group once), and optionally
the format its inputs are rounded to as the model runs ("activation", e.g.
"int8:g32"; absent: float inputs). A plan may also hold the KV cache's options per block under "kv_cache"
(`kvcache.plan`); a plan of the cache alone has no weight layers. Bits are never trusted from the file: they are
recomputed from the option and shape by the one bit-counting function, so an
edited plan reports its true size.

    {"mixbits_plan": 1, "model": {...}, "budget": {...}, "damage": "proxy",
     "layers": [{"name": "model.layers.0.self_attn.q_proj", "group": "model.layers.0.qkv",
                 "option": "int3:g64:asym", "solver": "gptq", "shape": [576, 576], "damage": 0.0012}, ...]}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .defaults import SOLVERS
from .errors import MixbitsError
from .files import write_json
from .formats import parse_format
from .kvcache.plan import KVPlan
from .schema import DAMAGE, MODULE_NAME, SHAPE, Field, ListOf, Nullable, SchemaError, check, optional, read_json

PLAN_VERSION = 1
KEEP = "fp16"  # keep the layer unquantized, stored in 16 bits


class PlanError(MixbitsError):
    """A plan file is missing, malformed, or inconsistent."""


LAYER_SCHEMA = {"name": Field(MODULE_NAME), "group": optional(str), "option": Field(str), "solver": optional(str),
                "shape": Field(SHAPE), "damage": optional(Nullable(DAMAGE)), "activation": optional(Nullable(str))}
PLAN_SCHEMA = {"mixbits_plan": Field(int), "model": optional(Nullable(dict)), "budget": optional(Nullable(dict)),
               "damage": optional(str), "layers": Field(ListOf(LAYER_SCHEMA)), "kv_cache": optional(Nullable(dict))}  # "totals" is recomputed, not read


def option_bits(option: str, rows: int, cols: int) -> int:
    """Exact storage bits of a [rows, cols] layer under `option`."""
    if option == KEEP:
        return 16 * rows * cols
    return parse_format(option).bits(rows, cols)


class LayerTotals:
    """Exact totals over `self.layers` (anything with `bits` and `weights`): reports and plans alike."""

    @property
    def bits(self) -> int:
        return sum(layer.bits for layer in self.layers)

    @property
    def weights(self) -> int:
        return sum(layer.weights for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights


@dataclass
class LayerPlan:
    name: str
    group: str
    option: str
    solver: str
    shape: tuple[int, int]
    damage: float | None = None
    activation: str | None = None  # the format the layer's inputs are rounded to (activations.parse_activation)

    @property
    def bits(self) -> int:
        return option_bits(self.option, *self.shape)

    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1]

    def as_dict(self) -> dict:
        entry = {"name": self.name, "group": self.group, "option": self.option, "solver": self.solver,
                 "shape": list(self.shape), "bits": self.bits, "damage": self.damage}
        return entry if self.activation is None else {**entry, "activation": self.activation}


@dataclass
class Plan(LayerTotals):
    layers: list[LayerPlan]
    model: dict = field(default_factory=dict)  # name and sha256 of the model it was made for
    budget: dict = field(default_factory=dict)  # what was asked, e.g. {"bits_per_weight": 3.0, "bits": ...}
    damage: str = "proxy"  # which damage the allocator minimised
    kv_cache: KVPlan | None = None  # the KV cache's options per block

    def __post_init__(self):
        self.validate()

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights if self.layers else 0.0

    def validate(self) -> None:
        if not self.layers and self.kv_cache is None:
            raise PlanError("the plan has no layers; make one with `mixbits plan`")
        names = set()
        options: dict[str, tuple[str, str, str]] = {}
        for layer in self.layers:
            if layer.name in names:
                raise PlanError(f"the plan lists layer {layer.name} twice; keep one entry per layer")
            names.add(layer.name)
            if layer.solver not in SOLVERS:
                raise PlanError(f"layer {layer.name}: unknown solver {layer.solver!r}; use one of {', '.join(SOLVERS)}")
            if layer.option != KEEP:
                try:
                    parse_format(layer.option)
                except MixbitsError as error:
                    raise PlanError(f"layer {layer.name}: {error}") from None
            if layer.activation is not None:
                from .activations import parse_activation

                try:
                    parse_activation(layer.activation)
                except MixbitsError as error:
                    raise PlanError(f"layer {layer.name}'s activation: {error}") from None
            chosen = (layer.option, layer.solver)
            first = options.setdefault(layer.group, (*chosen, layer.name))
            if first[:2] != chosen:
                raise PlanError(
                    f"layers {first[2]} and {layer.name} are tied in group {layer.group} but have different options "
                    f"({'/'.join(first[:2])} vs {'/'.join(chosen)}); give every layer of a group the same option"
                )

    @property
    def damage_total(self) -> float | None:
        """Predicted damage of the whole plan: each group's once (None if some group has none)."""
        per_group: dict[str, float | None] = {}
        for layer in self.layers:
            per_group.setdefault(layer.group, layer.damage)
        values = list(per_group.values())
        return None if any(v is None for v in values) else sum(values)

    def as_dict(self) -> dict:
        return {
            "mixbits_plan": PLAN_VERSION,
            "model": self.model,
            "budget": self.budget,
            "damage": self.damage,
            "totals": {"bits": self.bits, "weights": self.weights, "bits_per_weight": self.bits_per_weight,
                       "damage": self.damage_total},
            "layers": [layer.as_dict() for layer in self.layers],
            **({} if self.kv_cache is None else {"kv_cache": self.kv_cache.as_dict()}),
        }

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically (temporary file, then rename)."""
        write_json(path, self.as_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if not isinstance(data, dict) or "mixbits_plan" not in data:
            raise PlanError("not a mixbits plan (no \"mixbits_plan\" version field); make one with `mixbits plan`")
        if data["mixbits_plan"] != PLAN_VERSION:
            raise PlanError(f"plan version {data['mixbits_plan']!r} is not supported (this mixbits reads {PLAN_VERSION})")
        try:
            check(data, PLAN_SCHEMA, "the plan")
        except SchemaError as error:
            raise PlanError(f"{error}; make the plan with `mixbits plan` or fix the entry") from None
        layers = [LayerPlan(entry["name"], entry.get("group", entry["name"]), entry["option"],
                            entry.get("solver", "rtn"), tuple(entry["shape"]), entry.get("damage"),
                            entry.get("activation"))
                  for entry in data["layers"]]
        kv_cache = None if data.get("kv_cache") is None else KVPlan.from_dict(data["kv_cache"])
        return cls(layers, data.get("model") or {}, data.get("budget") or {}, data.get("damage", "proxy"), kv_cache)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        data = read_json(path, PlanError, f"plan file {path} does not exist; make one with `mixbits plan`",
                         f"cannot read plan {path}: {{error}}")
        return cls.from_dict(data)

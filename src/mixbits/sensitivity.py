"""The measured damage of every option on every group of tied layers, and its JSON file.

A `Sensitivity` holds, per group (its layers, shapes and block; the input
embedding at block -1, an untied head after the last block), each option's
exact bits, proxy, output error and measured KL, with what they were measured
on (model, calibration, GPTQ settings, KL windows). Files are checked against
a schema and for consistency before use, and against the model and menu
before reuse.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .defaults import SOLVERS
from .errors import MixbitsError
from .files import write_json
from .menu import Choice, allowed, embedding_choices
from .models.loaded import LoadedModel
from .plan import option_bits
from .schema import (COUNT, DAMAGE, MODULE_NAME, SHAPE, SIZE, Check, Field, ListOf, MapOf, Nullable, SchemaError,
                     check, optional, read_json)
from .solvers import GptqSettings

SENSITIVITY_VERSION = 1
DAMAGES = ("kl", "proxy")


class SensitivityError(MixbitsError):
    """A sensitivity file is missing, malformed, or made for another model or menu."""


@dataclass
class OptionDamage:
    option: str
    solver: str
    bits: int
    proxy: float
    output_error: float
    kl: float | None
    seconds: float

    @property
    def choice(self) -> Choice:
        return Choice(self.option, self.solver)


@dataclass
class GroupSensitivity:
    name: str
    layers: list[str]
    shapes: list[tuple[int, int]]
    block: int
    options: list[OptionDamage]

    @property
    def weights(self) -> int:
        return sum(rows * cols for rows, cols in self.shapes)

    def bits(self, choice: Choice) -> int:
        return sum(option_bits(choice.option, rows, cols) for rows, cols in self.shapes)

    @property
    def embedding(self) -> bool:
        """The input embedding's group (measured at block -1; the output head's is at the block count)."""
        return self.block < 0

    def applicable(self, choice: Choice) -> Choice | None:
        """The choice as this group takes it (an embedding rounds to nearest), None if it cannot take it."""
        if not self.embedding:
            return choice
        mapped = embedding_choices([choice])
        return mapped[0] if mapped else None

    def find(self, choice: Choice) -> OptionDamage | None:
        choice = self.applicable(choice)
        return next((o for o in self.options if o.choice == choice), None)


@dataclass
class Sensitivity:
    """Damage of every (group, option), with what it was measured on."""

    groups: list[GroupSensitivity]
    model: dict = field(default_factory=dict)  # name, sha256
    calibration: dict = field(default_factory=dict)  # text, windows, length, fisher_windows
    kl_windows: dict | None = None  # count and length of the KL windows; None if only the proxy was measured
    other_parameters: int = 0  # parameters outside the block layers (embedding, head, norms, biases)
    seconds: dict = field(default_factory=dict)
    outer: list[GroupSensitivity] = field(default_factory=list)  # the embedding and an untied head, if measured

    @property
    def weights(self) -> int:
        return sum(group.weights for group in self.groups)

    @property
    def damages(self) -> tuple[str, ...]:
        return DAMAGES if self.kl_windows else ("proxy",)

    def check(self, model: LoadedModel | None, menu: list[Choice], target: str | None = None,
              calibration: tuple[str, int, int] | None = None, gptq: GptqSettings | None = None,
              clip_search: bool | None = None) -> None:
        """Refuse a sensitivity measured on another model, without every option of `menu` (that `target` allows),
        or, where given, on other calibration windows ((text name, count, length)), with other GPTQ settings or
        another clip search setting."""
        if model is not None and self.model.get("sha256") not in (None, model.sha256):
            raise SensitivityError(f"the sensitivity file was measured on another model ({self.model.get('name')}, "
                                   f"sha256 {self.model['sha256'][:12]}); measure this one")
        if model is not None:
            self.check_model(model)
        c = self.calibration
        if calibration is not None and (c.get("text"), c.get("count"), c.get("length")) != tuple(calibration):
            raise SensitivityError(f"the sensitivity file was measured on {c.get('count')} x {c.get('length')} tokens "
                                   f"of {c.get('text')}, not {calibration[1]} x {calibration[2]} of {calibration[0]}; "
                                   "measure again")
        if gptq is not None and c.get("gptq") != gptq.measurement_key():
            raise SensitivityError(f"the sensitivity file was measured with GPTQ settings {c.get('gptq')}; pass the "
                                   "same --damp/--shrink or measure again")
        if clip_search is not None and c.get("clip_search") != clip_search:
            raise SensitivityError("the sensitivity file was measured " + ("with" if c.get("clip_search") else "without")
                                   + " the clip search; pass the same --no-clip-search or measure again")
        missing = self.missing(menu, target)
        if missing:
            raise SensitivityError(f"the sensitivity file has no measurement of {missing[0]}; "
                                   "measure again with this option list")

    def missing(self, menu: list[Choice], target: str | None = None) -> list[Choice]:
        """The options of `menu` (that `target` allows) some group was not measured under."""
        return [choice for choice in menu
                if any(group.applicable(choice) is not None and group.find(choice) is None
                       and all(allowed(choice, tuple(s), target) for s in group.shapes)
                       for group in self.groups + self.outer)]

    def extended(self, other: "Sensitivity") -> "Sensitivity":
        """These measurements plus `other`'s options (measured alike on the same groups) that these lack."""
        if other.groups and [g.name for g in other.groups] != [g.name for g in self.groups]:
            raise SensitivityError("the new measurements group the layers differently (--no-ties?); measure again")
        if (other.model, other.calibration, other.kl_windows) != (self.model, self.calibration, self.kl_windows):
            raise SensitivityError("the new measurements were taken on another model, calibration or KL windows; "
                                   "measure again")
        def merged(mine: GroupSensitivity, new: GroupSensitivity) -> GroupSensitivity:
            return GroupSensitivity(mine.name, mine.layers, mine.shapes, mine.block,
                                    mine.options + [o for o in new.options if mine.find(o.choice) is None])

        groups = [merged(g, new) for g, new in zip(self.groups, other.groups)] if other.groups else self.groups
        theirs = {g.name: g for g in other.outer}
        outer = [merged(g, theirs.pop(g.name)) if g.name in theirs else g for g in self.outer] + list(theirs.values())
        seconds = {key: self.seconds.get(key, 0.0) + other.seconds.get(key, 0.0)
                   for key in {*self.seconds, *other.seconds}}
        return Sensitivity(groups, self.model, self.calibration, self.kl_windows, self.other_parameters, seconds, outer)

    def rank_correlation(self) -> dict[str, float | None]:
        """Spearman correlation of each proxy with the measured KL: over all (group, option) pairs,
        and the mean over groups of the correlation across their options (how well a proxy orders choices)."""
        if not self.kl_windows:
            return {}
        from scipy.stats import spearmanr

        result: dict[str, float | None] = {}
        measured = [[o for o in g.options if o.kl is not None] for g in self.groups]  # a selective one's KLs
        for proxy in ("proxy", "output_error"):
            pairs = [(getattr(o, proxy), o.kl) for options in measured for o in options]
            result[f"{proxy}_all"] = float(spearmanr(*zip(*pairs)).statistic) if len(pairs) > 2 else None
            within = [spearmanr([getattr(o, proxy) for o in options], [o.kl for o in options]).statistic
                      for options in measured if len(options) > 2]
            within = [r for r in within if not math.isnan(r)]
            result[f"{proxy}_within_groups"] = float(sum(within) / len(within)) if within else None
        return result

    def as_dict(self) -> dict:
        return {
            "mixbits_sensitivity": SENSITIVITY_VERSION,
            "model": self.model,
            "calibration": self.calibration,
            "kl_windows": self.kl_windows,
            "other_parameters": self.other_parameters,
            "seconds": self.seconds,
            "rank_correlation": self.rank_correlation(),
            "groups": [group_dict(g) for g in self.groups],
            "outer": [group_dict(g) for g in self.outer],
        }

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically (temporary file, then rename)."""
        write_json(path, self.as_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Sensitivity":
        """The sensitivity in `path`, checked against SENSITIVITY_SCHEMA and for consistency (`validate`)."""
        path = Path(path)
        data = read_json(path, SensitivityError,
                         f"sensitivity file {path} does not exist; measure with `mixbits plan --sensitivity FILE`",
                         f"cannot read sensitivity file {path}: {{error}}")
        if not isinstance(data, dict) or data.get("mixbits_sensitivity") != SENSITIVITY_VERSION:
            raise SensitivityError(f"{path} is not a version-{SENSITIVITY_VERSION} mixbits sensitivity file; measure again")
        try:
            check(data, SENSITIVITY_SCHEMA, path.name)
        except SchemaError as error:
            raise SensitivityError(f"{error}; measure again") from None
        calibration = {"clip_search": True, **(data.get("calibration") or {})}  # files before it was recorded used it
        found = cls([group_from_dict(g) for g in data["groups"]], data.get("model") or {}, calibration,
                    data.get("kl_windows"), data.get("other_parameters", 0), data.get("seconds") or {},
                    [group_from_dict(g) for g in data.get("outer") or []])
        found.validate(path)
        return found

    def validate(self, path: Path | str) -> None:
        """Refuse measurements that contradict themselves: a group's layers and shapes of different lengths, a
        layer in two groups, options unknown, measured twice or with bits that are not the option's, or a KL
        missing where KL windows are recorded."""
        seen: set[str] = set()
        for group in self.groups + self.outer:
            where = f"{path}: group {group.name}"
            if not group.layers or len(group.layers) != len(group.shapes):
                raise SensitivityError(f"{where} lists {len(group.layers)} layers and {len(group.shapes)} shapes; "
                                       "measure again")
            if seen & set(group.layers) or len(set(group.layers)) != len(group.layers):
                raise SensitivityError(f"{where} holds a layer another group (or it) already holds; measure again")
            seen |= set(group.layers)
            if not group.options:
                raise SensitivityError(f"{where} has no measured options; measure again")
            choices = set()
            for option in group.options:
                if option.solver not in SOLVERS:
                    raise SensitivityError(f"{where}: unknown solver {option.solver!r}; measure again")
                try:
                    bits = group.bits(option.choice)
                except MixbitsError as error:
                    raise SensitivityError(f"{where}: {error}; measure again") from None
                if bits != option.bits:
                    raise SensitivityError(f"{where}: {option.option} is {bits} bits, the file says {option.bits}; "
                                           "measure again")
                if option.choice in choices:
                    raise SensitivityError(f"{where} measures {option.choice} twice; measure again")
                choices.add(option.choice)

    def check_model(self, model: LoadedModel) -> None:
        """Refuse measurements of layers `model` does not have, or has in other shapes."""
        modules = dict(model.model.named_modules())
        for group in self.groups + self.outer:
            for name, shape in zip(group.layers, group.shapes):
                weight = getattr(modules.get(name), "weight", None)
                if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(shape):
                    raise SensitivityError(f"the sensitivity file measures {name} as {shape[0]}x{shape[1]}, which "
                                           "this model does not have; measure this model")


_OPTION_SCHEMA = {"option": Field(str), "solver": Field(str), "bits": Field(COUNT), "proxy": Field(DAMAGE),
                  "output_error": Field(DAMAGE), "kl": Field(Nullable(DAMAGE)), "seconds": Field(DAMAGE)}
_GROUP_SCHEMA = {"name": Field(str), "layers": Field(ListOf(MODULE_NAME)), "shapes": Field(ListOf(SHAPE)),
                 "block": Field(Check(int, lambda n: n >= -1, "-1 (the embedding) or a block index")),
                 "options": Field(ListOf(_OPTION_SCHEMA))}
SENSITIVITY_SCHEMA = {
    "mixbits_sensitivity": Field(int),
    "model": optional(Nullable({"name": optional(Nullable(str)), "sha256": optional(Nullable(str))})),
    "calibration": optional(Nullable(dict)),
    "kl_windows": optional(Nullable({"count": Field(SIZE), "length": Field(SIZE)})),
    "other_parameters": optional(COUNT),
    "seconds": optional(Nullable(MapOf(str, DAMAGE))),
    "groups": Field(ListOf(_GROUP_SCHEMA)),
    "outer": optional(Nullable(ListOf(_GROUP_SCHEMA))),
}


def group_dict(group: GroupSensitivity) -> dict:
    return {"name": group.name, "layers": group.layers, "shapes": [list(s) for s in group.shapes], "block": group.block,
            "options": [asdict(o) for o in group.options]}


def group_from_dict(data: dict) -> GroupSensitivity:
    options = [OptionDamage(**{key: o[key] for key in _OPTION_SCHEMA}) for o in data["options"]]
    return GroupSensitivity(data["name"], list(data["layers"]), [tuple(s) for s in data["shapes"]], data["block"],
                            options)


def group_name(layers: list[str]) -> str:
    """`model.layers.0.self_attn.q_proj+k_proj+v_proj` for tied layers; the layer's name for one."""
    if len(layers) == 1:
        return layers[0]
    parts = [name.split(".") for name in layers]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return ".".join(parts[0][:common]) + "." + "+".join(".".join(p[common:]) for p in parts)


def other_parameters(model: nn.Module, quantized: list[tuple[str, nn.Linear]]) -> int:
    """Parameters outside the quantized weights (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters()) - sum(linear.weight.numel() for _, linear in quantized)

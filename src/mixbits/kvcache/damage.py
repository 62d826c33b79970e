"""The measured damage of each KV option on each block's keys and values, and its JSON file.

Damage is the KL divergence of the model's next-token distributions on the
calibration windows when only one block's keys (or values) are read through
one option, everything else in the model's precision: blocks before it are
untouched, so their outputs come from one float forward (`damage.KLMeter`).
Windows should be as long as the contexts the cache will serve: rounding
error grows with the number of keys a query reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..damage import KLMeter
from ..errors import MixbitsError
from ..files import write_json
from ..schema import DAMAGE, Field, ListOf, MapOf, SchemaError, check, read_json
from .fake import attention_modules, fake_quantized_kv
from .options import KVQuant, parse_kv
from .plan import KINDS

KV_DAMAGE_VERSION = 1
SCHEMA = {"mixbits_kv_damage": Field(int), "model": Field(dict), "calibration": Field(dict),
          "options": Field(ListOf(str)),
          "blocks": Field(ListOf({kind: Field(MapOf(str, DAMAGE)) for kind in KINDS}))}


class KVDamageError(MixbitsError):
    """A KV damage file is missing, malformed, or made for another model."""


@dataclass
class KVDamage:
    model: dict  # name and sha256
    calibration: dict  # what the windows were
    options: list[str]
    blocks: list[dict[str, dict[str, float]]]  # per block: kind -> option -> KL
    seconds: float = 0.0

    def table(self) -> dict[tuple[int, str], dict[str, float]]:
        """damage[(block, kind)] = {option: KL}, as `plan.allocate_kv` takes it."""
        return {(b, kind): dict(entry[kind]) for b, entry in enumerate(self.blocks) for kind in KINDS}

    def save(self, path: str | Path) -> None:
        write_json(path, {"mixbits_kv_damage": KV_DAMAGE_VERSION, "model": self.model, "calibration": self.calibration,
                          "options": self.options, "seconds": self.seconds, "blocks": self.blocks})

    @classmethod
    def load(cls, path: str | Path) -> "KVDamage":
        data = read_json(Path(path), KVDamageError, f"KV damage file {path} does not exist",
                         f"cannot read KV damage file {path}: {{error}}")
        try:
            check(data, SCHEMA, str(path))
        except SchemaError as error:
            raise KVDamageError(f"{error}; measure it again") from None
        if data["mixbits_kv_damage"] != KV_DAMAGE_VERSION:
            raise KVDamageError(f"{path}: version {data['mixbits_kv_damage']!r} is not supported; measure it again")
        for option in data["options"]:
            try:
                parse_kv(option)
            except MixbitsError as error:
                raise KVDamageError(f"{path}: {error}") from None
        return cls(data["model"], data["calibration"], data["options"], data["blocks"], data.get("seconds", 0.0))


def applies_to(option: KVQuant, kind: str) -> bool:
    """Whether `option` can store this kind of cache (values have no rotary embedding to store before)."""
    return kind == "keys" or not option.pre_rope


def measure_kv_damage(model: nn.Module, windows: torch.Tensor, options: list[KVQuant], model_record: dict,
                      calibration: dict, progress=None) -> KVDamage:
    """Every (block, keys or values, option)'s KL on `windows` [N, T], that layer alone quantized."""
    blocks = len(attention_modules(model, "KV-cache damage")[0])
    started = time.perf_counter()
    meter = KLMeter(model, windows)
    table: list[dict[str, dict[str, float]]] = []
    for block in range(blocks):
        entry: dict[str, dict[str, float]] = {}
        for kind in KINDS:
            entry[kind] = {}
            for option in options:
                if not applies_to(option, kind):
                    continue
                layers = [(None, None)] * blocks
                layers[block] = (option, None) if kind == "keys" else (None, option)
                with fake_quantized_kv(model, layers):
                    entry[kind][str(option)] = meter.measure(block)
        table.append(entry)
        if progress is not None:
            progress(block + 1, blocks)
    return KVDamage(model_record, calibration, [str(o) for o in options], table, time.perf_counter() - started)

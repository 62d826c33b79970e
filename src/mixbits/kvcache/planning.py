"""From a model and a cache budget to a KV plan: measure (or reuse) each option's damage per block, then allocate."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..calibrate import calibration_data
from ..models.loaded import LoadedModel
from .damage import KVDamage, KVDamageError, measure_kv_damage
from .fake import attention_modules
from .options import KVQuant
from .plan import CacheShape, KVBudget, KVPlan, allocate_kv

# What `mixbits kv-plan` chooses from unless told: 8, 4, 3 and 2 bits, the 2-bit option per channel with a
# residual window as KIVI stores keys.
DEFAULT_OPTIONS = ("int8:ch:sym", "int4:g64:asym", "int3:g32:asym", "int2:g32:asym:min=fp16/channel/residual64")
DAMAGE_WINDOWS, DAMAGE_WINDOW_LEN = 4, 2048


def cache_shape(model: nn.Module) -> CacheShape:
    """The blocks, key/value heads, head width and bits per number of `model`'s cache."""
    modules, facts = attention_modules(model, "KV-cache quantization")
    dtype = next(model.parameters()).dtype
    return CacheShape(len(modules), facts["kv_heads"], facts["head_dim"], 8 * dtype.itemsize)


def kv_damage(loaded: LoadedModel, options: list[KVQuant], windows: int = DAMAGE_WINDOWS,
              window_len: int = DAMAGE_WINDOW_LEN, path: str | Path | None = None, progress=None) -> KVDamage:
    """Each option's damage on each block's keys and values: read from `path` if it exists (it must have been
    measured for this model, on these windows, with every option: else KVDamageError), else measured and written to
    `path` (if given)."""
    tokens, calibration = calibration_data(loaded, None, windows, window_len)
    if path is not None and Path(path).exists():
        found = KVDamage.load(path)
        if found.model.get("sha256") != loaded.sha256 or found.calibration != calibration:
            raise KVDamageError(f"{path} was measured on another model or other windows; remove it or give a "
                                "new --damage-file")
        missing = [str(o) for o in options if str(o) not in found.options]
        if not missing:
            return found
        raise KVDamageError(f"{path} lacks options {', '.join(missing)}; remove it to measure them all again")
    measured = measure_kv_damage(loaded.model, tokens, options, {"name": loaded.name, "sha256": loaded.sha256},
                                 calibration, progress)
    if path is not None:
        measured.save(path)
    return measured


def plan_kv(loaded: LoadedModel, budget: KVBudget, options: list[KVQuant], damage: KVDamage) -> KVPlan:
    """The per-block key and value options of least measured damage within `budget`, from `options` only."""
    names = {str(o) for o in options}
    table = {(block, kind): {name: kl for name, kl in found.items() if name in names}
             for (block, kind), found in damage.table().items()}
    return allocate_kv(table, cache_shape(loaded.model), budget)


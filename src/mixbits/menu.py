"""The options a mixed-precision plan chooses from, and the layers users pin.

An option is a format from the registry with the solver that quantizes it,
written `int3:g64:asym` (the default solver) or `int3:g64:asym@rtn`, or
`fp16`: keep the layer unquantized, stored in 16 bits. A pin fixes the
option of every layer whose name matches a shell-style pattern:
`*.down_proj=int4:g64:asym`, `model.layers.0.*=fp16`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from .defaults import SOLVERS
from .errors import MixbitsError
from .formats import TrellisFormat, parse_format
from .plan import KEEP

# From 2.15 to 5.3 bits per weight, with options just above 2.5, 3 and 4 bpw (int2:g32,
# int3:ch, int4:ch: one scale per row) so plans at those budgets need not send layers a
# whole bit down (the menu without them filled 3.0 and 4.0 bpw with int2 and int3 layers:
# bench/results/mixed.md), and fp16 for a layer that needs it. Each option costs about
# four minutes of measuring on the default model.
DEFAULT_OPTIONS = (
    "int2:g128:asym", "int2:g64:asym", "int2:g32:asym", "int3:ch:asym", "lut3:ch", "int3:g128:asym", "int3:g64:asym",
    "int4:ch:asym", "int4:g128:asym", "int4:g64:asym", "int5:g64:asym", KEEP,
)
DEFAULT_SOLVER = "gptq"
# With a target runtime, only options it can load: llama.cpp's block types (see io.gguf) and f16.
TARGET_OPTIONS = {"gguf": ("q4_0", "q4_1", "q4_k", "q6_k", "q8_0", KEEP)}


class MenuError(MixbitsError):
    """An option or pin is malformed."""


@dataclass(frozen=True)
class Choice:
    """One way to store a layer: a canonical format string (or fp16) and its solver."""

    option: str
    solver: str

    def __str__(self) -> str:
        return self.option if self.option == KEEP else f"{self.option}@{self.solver}"

    @property
    def format(self):
        return None if self.option == KEEP else parse_format(self.option)


def parse_choice(text: str, solver: str = DEFAULT_SOLVER) -> Choice:
    """`int3:g64:asym`, `int3:g64:asym@rtn` or `fp16` as a `Choice` (the format string made canonical)."""
    text = text.strip()
    option, _, named = text.partition("@")
    if named:
        solver = named
    if solver not in SOLVERS:
        raise MenuError(f"option {text!r}: unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if option == KEEP:
        return Choice(KEEP, "rtn")  # nothing to solve; one spelling so ties compare equal
    if not option:
        raise MenuError("empty option; give format strings such as int3:g64:asym separated by commas")
    return Choice(str(parse_format(option)), solver)


def parse_menu(text: str | list[str] | tuple[str, ...] | None = None, solver: str = DEFAULT_SOLVER) -> list[Choice]:
    """The options a comma-separated list (or a sequence) names; the default menu for None."""
    items = DEFAULT_OPTIONS if text is None else text.split(",") if isinstance(text, str) else text
    choices: list[Choice] = []
    for item in items:
        choice = parse_choice(item, solver)
        if choice not in choices:
            choices.append(choice)
    if not choices:
        raise MenuError("the option list is empty; give at least one format, e.g. --options int3:g64:asym,int4:g64:asym")
    return choices


@dataclass(frozen=True)
class Pin:
    pattern: str
    choice: Choice

    def matches(self, layer: str) -> bool:
        return fnmatch.fnmatchcase(layer, self.pattern)


def parse_pin(text: str, solver: str = DEFAULT_SOLVER) -> Pin:
    pattern, sep, option = text.partition("=")
    if not sep or not pattern.strip() or not option.strip():
        raise MenuError(f"pin {text!r} must look like PATTERN=OPTION, e.g. '*.down_proj=int4:g64:asym' or 'model.layers.0.*=fp16'")
    return Pin(pattern.strip(), parse_choice(option, solver))


def pinned_choice(layers: list[str], pins: list[Pin]) -> Choice | None:
    """The option pins give a group of tied layers (None if no pin matches); conflicting pins are an error."""
    found: dict[Choice, str] = {}
    for layer in layers:
        for pin in pins:
            if pin.matches(layer):
                found.setdefault(pin.choice, f"{pin.pattern} (matching {layer})")
                break  # the first matching pin wins for a layer
    if len(found) > 1:
        first, second = list(found.items())[:2]
        raise MenuError(
            f"tied layers {', '.join(layers)} are pinned to different options: {first[0]} by {first[1]} and "
            f"{second[0]} by {second[1]}; pin them alike"
        )
    return next(iter(found), None)


def allowed(choice: Choice, shape: tuple[int, int], target: str | None) -> bool:
    """Whether a layer of `shape` can take `choice` and still be exported to `target` (None: anything goes)."""
    if choice.option == KEEP:
        return True
    fmt = choice.format
    if fmt.vector_size > 1 and fmt.granularity.kind == "channel" and shape[1] % fmt.vector_size:
        return False  # rows that do not cut into whole vectors
    if target is None:
        return True
    if target == "gguf":
        from .io.gguf import gguf_representable

        return gguf_representable(choice.option, shape)
    raise MenuError(f"unknown target {target!r}; use one of {', '.join(TARGET_OPTIONS)}")


def embedding_choices(menu: list[Choice]) -> list[Choice]:
    """The options of `menu` an input embedding can take: 16 bits, or a format whose rows decode on their own
    (`runtime.embedding`), always rounded to nearest (no Hessian describes a lookup's input)."""
    from .runtime.embedding import QuantizedEmbedding

    found: list[Choice] = []
    for choice in menu:
        if choice.option == KEEP or QuantizedEmbedding.supports(choice.format):
            mapped = Choice(choice.option, "rtn")
            if mapped not in found:
                found.append(mapped)
    return found


def group_choices(layers: list[str], shapes: list[tuple[int, int]], menu: list[Choice], pins: list[Pin],
                  target: str | None = None, embedding: bool = False) -> list[Choice]:
    """The options measured on a group of tied layers: every menu option all its layers allow, and its pin.
    For an input `embedding`, those it can take (`embedding_choices`)."""
    pinned = pinned_choice(layers, pins)
    if embedding:
        menu = embedding_choices(menu)
        if pinned is not None:
            if not embedding_choices([pinned]):
                raise MenuError(f"{layers[0]} is pinned to {pinned}, which an embedding cannot look up row by row; "
                                "pin a format with groups or per-channel scales, e.g. q8_0")
            pinned = embedding_choices([pinned])[0]
    if pinned is not None and not all(allowed(pinned, shape, None) for shape in shapes):
        size = pinned.format.vector_size
        instead = (f"vq{size}x{round(pinned.format.code_bits_per_weight * size)}:g{8 * size}"
                   if isinstance(pinned.format, TrellisFormat) else str(pinned.format).replace(':ch', f':g{8 * size}'))
        raise MenuError(f"{layers[0]} is pinned to {pinned}, which cannot cut its rows of {shapes[0][1]} weights into "
                        f"vectors of {size}; pin it with groups instead, e.g. {instead}")
    if pinned is not None and not all(allowed(pinned, shape, target) for shape in shapes):
        raise MenuError(f"{layers[0]} is pinned to {pinned}, which a {target} file cannot hold; pin an option "
                        f"such as {TARGET_OPTIONS[target][0]}")
    choices = [choice for choice in menu if all(allowed(choice, shape, target) for shape in shapes)]
    if pinned is not None and pinned not in choices:
        choices.append(pinned)
    if not choices:
        if target is None:  # an embedding under a menu of per-tensor formats only
            raise MenuError(f"no option of the menu fits {layers[0]} ({shapes[0][0]}x{shapes[0][1]}); add one it can "
                            "take, such as q8_0 or fp16")
        raise MenuError(f"no option of the menu fits {layers[0]} ({shapes[0][0]}x{shapes[0][1]}) for {target}; "
                        f"add one such as {TARGET_OPTIONS[target][0]}")
    return choices


def check_pins_match(pins: list[Pin], layers: list[str]) -> None:
    """A pin that matches no layer is a typo: say so rather than ignore it."""
    for pin in pins:
        if not any(pin.matches(layer) for layer in layers):
            raise MenuError(f"pin pattern {pin.pattern!r} matches no layer (layers look like {layers[0]}); fix the pattern")

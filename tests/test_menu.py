"""Options, pins and budgets: parsing and the errors users see."""

import math

import pytest

from mixbits.allocate import Budget, BudgetError, parse_size
from mixbits.errors import MixbitsError
from mixbits.menu import Choice, MenuError, parse_choice, parse_menu, parse_pin, pinned_choice
from mixbits.plan import KEEP


def test_choices_are_canonical_and_carry_their_solver():
    assert parse_choice("int3:g64:asym") == Choice("int3:g64:asym", "gptq")
    assert parse_choice("int3:g64:asym@rtn") == Choice("int3:g64:asym", "rtn")
    assert parse_choice("nvfp4", "rtn") == Choice("nvfp4", "rtn")
    assert parse_choice(" fp16@gptq ") == Choice(KEEP, "rtn")  # nothing to solve: one spelling
    assert str(parse_choice("int4:g64:asym")) == "int4:g64:asym@gptq"
    assert [str(c) for c in parse_menu("int2:g64:asym, int2:g64:asym@gptq,fp16")] == ["int2:g64:asym@gptq", "fp16"]
    default = [str(c) for c in parse_menu(None)]
    assert len(default) == 12 and default[-1] == "fp16" and "int3:ch:asym@gptq" in default and "lut3:ch@gptq" in default


@pytest.mark.parametrize("text, message", [
    ("int9:g64:asym", "1 to 8 bits"),
    ("int4:g64:asym@sgd", "unknown solver 'sgd'"),
    ("int4:g64:asym,,int3:g64:asym", "empty option"),
])
def test_bad_options(text, message):
    with pytest.raises(MixbitsError, match=message):
        parse_menu(text)


def test_pins_match_by_pattern_and_conflicts_are_named():
    pins = [parse_pin("*.v_proj=int8:ch:sym"), parse_pin("model.layers.0.*=fp16")]
    assert pinned_choice(["model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.v_proj"], pins) == Choice("int8:ch:sym", "gptq")
    assert pinned_choice(["model.layers.3.mlp.up_proj"], pins) is None
    assert pinned_choice(["model.layers.0.mlp.up_proj"], pins) == Choice(KEEP, "rtn")
    with pytest.raises(MenuError, match="pinned to different options"):
        pinned_choice(["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"], pins)
    with pytest.raises(MenuError, match="PATTERN=OPTION"):
        parse_pin("*.v_proj")


def test_budgets_in_bits_per_weight_and_bytes():
    weights, others = 1000, 100
    assert Budget(3.0).layer_bits(weights, others) == 3000
    assert Budget(3.0, scope="model").layer_bits(weights, others) == 3 * 1100 - 16 * 100
    assert Budget(bytes=500).layer_bits(weights, others) == 8 * 500 - 16 * 100
    assert Budget(bytes=500).layer_bits(weights, others, 10) == 8 * 500 - 16 * 100 - 32 * 10  # norms kept in float32
    assert Budget(3.0, scope="model").layer_bits(weights, others, 10) == math.floor(3 * 1110) - 16 * 100 - 32 * 10
    assert parse_size("60MB") == 60_000_000
    assert parse_size("1.5 KiB") == 1536
    assert parse_size("1e6") == 1_000_000
    with pytest.raises(BudgetError, match="write it like 60MB"):
        parse_size("sixty")
    with pytest.raises(BudgetError, match="either as bits per weight or"):
        Budget()

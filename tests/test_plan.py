"""Plans: JSON round trip, recomputed bits, and rejection of broken edits."""

import json

import pytest

from mixbits.formats import parse_format
from mixbits.plan import KEEP, LayerPlan, Plan, PlanError


def sample_plan():
    layers = [
        LayerPlan("l0.q", "l0.qkv", "int3:g64:asym", "gptq", (576, 576), 0.5),
        LayerPlan("l0.k", "l0.qkv", "int3:g64:asym", "gptq", (192, 576), 0.5),
        LayerPlan("l0.down", "l0.down", "nvfp4", "rtn", (576, 1536), 0.125),
        LayerPlan("l0.up", "l0.up", KEEP, "rtn", (1536, 576), 0.25),
    ]
    return Plan(layers, {"name": "m", "sha256": "ab"}, {"bits_per_weight": 4.0}, "proxy")


def test_round_trip_and_exact_bits(tmp_path):
    plan = sample_plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    expected = (parse_format("int3:g64:asym").bits(576, 576) + parse_format("int3:g64:asym").bits(192, 576)
                + parse_format("nvfp4").bits(576, 1536) + 16 * 1536 * 576)
    assert data["totals"]["bits"] == expected == plan.bits
    assert data["totals"]["damage"] == 0.875  # the q/k/v group's damage counted once
    loaded = Plan.load(path)
    assert loaded.as_dict() == plan.as_dict()
    assert not list(tmp_path.glob("*.tmp"))


def test_edited_bits_are_recomputed_not_trusted(tmp_path):
    data = sample_plan().as_dict()
    data["layers"][2]["option"] = "int8:ch:sym"
    data["layers"][2]["bits"] = 1  # stale after the edit
    plan = Plan.from_dict(data)
    assert plan.layers[2].bits == parse_format("int8:ch:sym").bits(576, 1536)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layers"][1].update(option="int4:g64:asym"), "tied in group l0.qkv"),
    (lambda d: d["layers"][1].update(solver="rtn"), "tied in group l0.qkv"),
    (lambda d: d["layers"][2].update(option="float4"), "layer l0.down: unknown format"),
    (lambda d: d["layers"][2].update(solver="sgd"), "unknown solver"),
    (lambda d: d["layers"][3].pop("shape"), r"the plan.layers\[3\] lacks 'shape'"),
    (lambda d: d["layers"][3].update(shape=[576]), r"the plan.layers\[3\].shape must have 2 items"),
    (lambda d: d["layers"][3].update(damage=float("nan")), "must be a finite non-negative number"),
    (lambda d: d["layers"][3].update(name=3), "must be a string"),
    (lambda d: d["layers"].append(dict(d["layers"][0])), "lists layer l0.q twice"),
    (lambda d: d.update(mixbits_plan=99), "version 99 is not supported"),
    (lambda d: d.update(layers=[]), "no layers"),
])
def test_broken_edits_are_rejected(edit, message):
    data = sample_plan().as_dict()
    edit(data)
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(data)


def test_unreadable_files(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="cannot read plan"):
        Plan.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(PlanError, match="not a mixbits plan"):
        Plan.load(tmp_path / "other.json")

"""Mixed precision on a tiny LLaMA: statistics, measured damage, plans from it, and applying a plan."""

import copy
import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mixbits
from mixbits.allocate import Budget, BudgetError
from mixbits.calibrate import calibration_stats
from mixbits.errors import MixbitsError
from mixbits.formats import parse_format
from mixbits.damage import KLMeter, proxy_damage
from mixbits.layer_stats import LayerStats, layer_statistics
from mixbits.measure import measure
from mixbits.sensitivity import GroupSensitivity, OptionDamage, Sensitivity
from mixbits.menu import Choice, parse_menu, parse_pin
from mixbits.mixes import allocated_plan, check_budget, heuristic_plan, uniform_plan
from mixbits.models.llama import LLAMA
from mixbits.plan import KEEP, Plan, PlanError
from mixbits.solvers import solve, solve_many

MENU = "int2:g16:asym@rtn,int4:g16:asym@rtn,int8:ch:sym@gptq"


def tiny_llama(layers=2):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def windows(count=4, length=24):
    return torch.randint(0, 64, (count, length), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def measured():
    model = tiny_llama()
    return model, measure(model, parse_menu(MENU), calibration=windows(), kl_windows=2, kl_len=16, fisher_windows=2,
                          pins=[parse_pin("*.0.mlp.down_proj=fp16")], progress=False)


def test_statistics_equal_a_direct_computation():
    model, x = tiny_llama(), windows()
    stats, groups = layer_statistics(model, x, fisher_windows=2, progress=False)
    attn, mlp = "model.layers.1.self_attn.", "model.layers.1.mlp."
    assert [attn + n for n in ("q_proj", "k_proj", "v_proj")] in groups
    assert [mlp + "gate_proj", mlp + "up_proj"] in groups and [mlp + "down_proj"] in groups
    assert len(groups) == 8
    direct = calibration_stats(model, x)
    for name in (attn + "k_proj", mlp + "down_proj"):
        assert torch.allclose(stats[name].hessian, direct[name].hessian, rtol=1e-5, atol=1e-7)
    # Fisher: mean squared gradient of the summed next-token loss w.r.t. each output channel, first 2 windows.
    layer = model.model.layers[1].mlp.down_proj
    grads = []
    def keep_gradient(module, args, out):
        out.register_hook(grads.append)  # returns nothing: a returned value would replace the output

    handle = layer.register_forward_hook(keep_gradient)
    try:
        for window in x[:2]:
            with torch.enable_grad():
                embeds = model.get_input_embeddings()(window[None]).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds).logits[0, :-1]
                torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").backward()
    finally:
        handle.remove()
    model.zero_grad()
    expected = sum(g.square().reshape(-1, g.shape[-1]).sum(0) for g in grads) / x[:2].numel()
    assert torch.allclose(stats[mlp + "down_proj"].fisher, expected, rtol=1e-4, atol=1e-10)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_proxy_is_the_fisher_weighted_output_error():
    torch.manual_seed(1)
    weight, approx = torch.randn(5, 7), torch.randn(5, 7)
    x = torch.randn(100, 7)
    stats = LayerStats(x.T @ x / 100, torch.rand(5), 100)
    delta_y = x @ (weight - approx).T  # [tokens, rows]
    proxy, error = proxy_damage(weight, approx, stats)
    assert proxy == pytest.approx(0.5 * float((delta_y.square().mean(0) * stats.fisher).sum()), rel=1e-4)
    assert error == pytest.approx(float(delta_y.square().mean(0).sum()), rel=1e-4)


def test_kl_meter_equals_a_full_forward():
    model, x = tiny_llama(), windows()[:2, :16]
    with torch.no_grad():
        reference = torch.log_softmax(model(x).logits, -1)
        meter = KLMeter(model, x)
        layer = model.model.layers[1].self_attn.o_proj
        layer.weight.mul_(1.5)
        changed = torch.log_softmax(model(x).logits, -1)
    expected = float((reference.exp() * (reference - changed)).sum(-1).mean())
    assert expected > 1e-4
    assert meter.measure(1) == pytest.approx(expected, rel=1e-4)


def test_measured_damage_falls_with_bits_and_bits_are_exact(measured):
    model, sensitivity = measured
    assert len(sensitivity.groups) == 8
    modules = dict(model.named_modules())
    int2, int4, int8 = parse_menu(MENU)
    for group in sensitivity.groups:
        expected_options = 4 if group.name == "model.layers.0.mlp.down_proj" else 3  # the pinned fp16 is measured too
        assert len(group.options) == expected_options
        for option in group.options:
            fmt = option.choice.format
            assert option.bits == sum(16 * w.numel() if fmt is None else fmt.bits(*w.shape)
                                      for w in (modules[name].weight for name in group.layers))
        kl = {o.choice: o.kl for o in group.options}
        assert kl[int8] < kl[int4] < kl[int2], group.name
    correlation = sensitivity.rank_correlation()
    assert correlation["proxy_within_groups"] > 0.9
    # The model was put back as it was.
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, tiny_llama().model.layers[0].mlp.down_proj.weight)


def test_sensitivity_round_trip(measured, tmp_path):
    _, sensitivity = measured
    sensitivity.save(tmp_path / "s.json")
    again = Sensitivity.load(tmp_path / "s.json")
    assert again.as_dict() == sensitivity.as_dict()
    again.check(None, parse_menu(MENU))
    with pytest.raises(MixbitsError, match="no measurement of int3:g16:asym@rtn"):
        again.check(None, parse_menu("int3:g16:asym@rtn"))


def test_missing_options_are_measured_alone_and_added_like_a_full_measurement(measured):
    model, sensitivity = measured
    menu = parse_menu(MENU + ",int3:g16:asym@rtn")
    assert sensitivity.missing(menu) == [Choice("int3:g16:asym", "rtn")]
    settings = dict(calibration=windows(), kl_windows=2, kl_len=16, fisher_windows=2, progress=False)
    extra = measure(model, sensitivity.missing(menu), **settings)
    extended = sensitivity.extended(extra)
    assert extended.missing(menu) == []
    full = measure(model, menu, pins=[parse_pin("*.0.mlp.down_proj=fp16")], **settings)
    for group, reference in zip(extended.groups, full.groups):
        got = {o.choice: (o.bits, o.kl) for o in group.options}
        want = {o.choice: (o.bits, o.kl) for o in reference.options}
        assert got.keys() == want.keys()
        for choice in want:
            assert got[choice][0] == want[choice][0]
            assert got[choice][1] == pytest.approx(want[choice][1], rel=1e-6, abs=1e-12)
    other = measure(model, sensitivity.missing(menu), **{**settings, "kl_windows": 1})
    with pytest.raises(MixbitsError, match="another model, calibration or KL windows"):
        sensitivity.extended(other)


def test_allocation_uses_only_the_options_of_its_menu(measured):
    _, sensitivity = measured
    menu = parse_menu("int4:g16:asym@rtn,int8:ch:sym@gptq")
    plan = allocated_plan(sensitivity, Budget(7.5), "kl", menu=menu)
    pinned = "model.layers.0.mlp.down_proj"
    assert {(l.option, l.solver) for l in plan.layers if l.name != pinned} <= {("int4:g16:asym", "rtn"), ("int8:ch:sym", "gptq")}
    everything = allocated_plan(sensitivity, Budget(7.5), "kl")
    assert plan.damage_total >= everything.damage_total
    with pytest.raises(MixbitsError, match="measured none of the options"):
        allocated_plan(sensitivity, Budget(7.5), "kl", menu=parse_menu("int3:g16:asym@rtn"))


def test_allocated_plan_is_the_brute_force_optimum(measured):
    _, sensitivity = measured
    for bpw in (3.2, 4.0, 5.5, 7.5):  # int2:g16:asym alone is 3.125 bits per weight
        budget = Budget(bpw)
        limit = budget.layer_bits(sensitivity.weights, sensitivity.other_parameters)
        plan = allocated_plan(sensitivity, budget, "kl")
        best = min(
            (sum(o.kl for o in combo), combo)
            for combo in itertools.product(*(g.options for g in sensitivity.groups))
            if sum(o.bits for o in combo) <= limit
        )
        assert plan.bits <= limit
        largest = max(o.kl for g in sensitivity.groups for o in g.options)
        assert plan.damage_total == pytest.approx(best[0], abs=1e-9 * largest)  # HiGHS's tolerance, scaled
        for group in sensitivity.groups:  # ties: one option per group
            assert len({(l.option, l.solver) for l in plan.layers if l.group == group.name}) == 1


def test_pins_and_infeasible_budgets(measured):
    model, sensitivity = measured
    pins = [parse_pin("*.0.mlp.down_proj=fp16")]
    plan = allocated_plan(sensitivity, Budget(5.0), "proxy", pins)
    assert next(l for l in plan.layers if l.name == "model.layers.0.mlp.down_proj").option == KEEP
    with pytest.raises(MixbitsError, match="did not measure"):
        allocated_plan(sensitivity, Budget(5.0), "kl", [parse_pin("*.o_proj=int3:g16:asym")])
    with pytest.raises(BudgetError, match="below the smallest achievable"):
        allocated_plan(sensitivity, Budget(3.1), "kl")
    with pytest.raises(BudgetError, match=r"below the smallest achievable \(3.1250 bits per weight"):
        check_budget(model, parse_menu(MENU), [], Budget(3.1))
    check_budget(model, parse_menu(MENU), [], Budget(3.125))


def synthetic_sensitivity(blocks=16):
    """Groups of a LLaMA-like model with options of 2, 3, 4 and 8 bits (damage irrelevant to the heuristic)."""
    shapes = {"self_attn.q_proj+k_proj+v_proj": [(64, 64), (16, 64), (16, 64)], "self_attn.o_proj": [(64, 64)],
              "mlp.gate_proj+up_proj": [(128, 64), (128, 64)], "mlp.down_proj": [(64, 128)]}
    layer_names = {"self_attn.q_proj+k_proj+v_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                   "self_attn.o_proj": ["self_attn.o_proj"], "mlp.gate_proj+up_proj": ["mlp.gate_proj", "mlp.up_proj"],
                   "mlp.down_proj": ["mlp.down_proj"]}
    menu = parse_menu("int2:g64:asym,int3:g64:asym,int4:g64:asym,int8:ch:sym")
    groups = []
    for block in range(blocks):
        for key, group_shapes in shapes.items():
            group = GroupSensitivity(f"b.{block}.{key}", [f"b.{block}.{n}" for n in layer_names[key]], group_shapes, block, [])
            group.options = [OptionDamage(c.option, c.solver, group.bits(c), 1.0, 1.0, None, 0.0) for c in menu]
            groups.append(group)
    return Sensitivity(groups), menu


def test_heuristic_mix_bumps_v_down_and_edge_blocks_within_budget():
    sensitivity, menu = synthetic_sensitivity()
    for bpw in (2.5, 3.0, 3.5, 4.5):
        plan = heuristic_plan(sensitivity, menu, Budget(bpw), bumped=LLAMA.bumped)
        assert plan.bits <= Budget(bpw).layer_bits(sensitivity.weights, 0)
        assert plan.bits_per_weight > bpw - 0.5  # it uses the budget
        bits = {l.name: parse_format(l.option).code_bits for l in plan.layers}
        middle = 8
        assert bits[f"b.{middle}.mlp.down_proj"] >= bits[f"b.{middle}.mlp.gate_proj"]
        assert bits[f"b.{middle}.self_attn.v_proj"] >= bits[f"b.{middle}.self_attn.o_proj"]
        assert bits["b.0.mlp.gate_proj"] >= bits[f"b.{middle}.mlp.gate_proj"]
        assert bits["b.15.self_attn.o_proj"] >= bits[f"b.{middle}.self_attn.o_proj"]
    plan = heuristic_plan(sensitivity, menu, Budget(3.0), bumped=LLAMA.bumped)
    bits = {l.name: parse_format(l.option).code_bits for l in plan.layers}
    assert bits["b.8.mlp.down_proj"] > bits["b.8.mlp.gate_proj"]  # the bump is real at a middle budget
    with pytest.raises(BudgetError):
        heuristic_plan(sensitivity, menu, Budget(2.0), bumped=LLAMA.bumped)


def test_quantize_applies_a_plan_layer_by_layer(measured):
    float_model, sensitivity = measured
    plan = allocated_plan(sensitivity, Budget(5.0), "kl", [parse_pin("*.0.mlp.down_proj=fp16")])
    assert len({l.option for l in plan.layers}) >= 3  # a real mix
    model = copy.deepcopy(float_model)
    report = mixbits.quantize(model, plan=plan, calibration=windows(), progress=False)
    assert report.bits == plan.bits and report.format == "plan"
    keep = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(keep, float_model.model.layers[0].mlp.down_proj.weight.half().float())
    # Round-to-nearest in a plan searches clipping on the output error, as when it was measured.
    rtn = uniform_plan(sensitivity, Choice("int4:g16:asym", "rtn"))
    model = copy.deepcopy(float_model)
    mixbits.quantize(model, plan=rtn, calibration=windows(), progress=False)
    # q/k/v (the first stage: its input is the float model's) are solved as one stacked matrix.
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    float_modules, modules = dict(float_model.named_modules()), dict(model.named_modules())
    originals = [float_modules[name].weight for name in names]
    hessian = calibration_stats(float_model, windows())[names[0]].hessian
    fmt = parse_format("int4:g16:asym")
    expected = [q.dequantize() for q in solve_many(originals, fmt, "rtn", hessian)]
    for name, weight in zip(names, expected):
        assert torch.equal(modules[name].weight, weight)
    one = solve(originals[2], fmt, "rtn", hessian).dequantize()
    assert torch.allclose(one, expected[2], atol=1e-6)  # stacking rows changes nothing but float summation order
    assert not torch.allclose(one, solve(originals[2], fmt, "rtn").dequantize(), atol=1e-6)  # and the clip search used H


def test_plans_for_another_model_are_refused(measured):
    float_model, sensitivity = measured
    plan = uniform_plan(sensitivity, Choice("int4:g16:asym", "rtn"))
    bigger = tiny_llama(layers=3)
    with pytest.raises(PlanError, match="has no entry for model.layers.2"):
        mixbits.quantize(bigger, plan=plan, calibration=windows(), progress=False)
    plan.layers[0].shape = (48, 40)
    with pytest.raises(PlanError, match="plan says 48x40"):
        mixbits.quantize(copy.deepcopy(float_model), plan=plan, calibration=windows(), progress=False)
    with pytest.raises(MixbitsError, match="do not combine with a plan"):
        mixbits.quantize(copy.deepcopy(float_model), plan=plan, awq=True, progress=False)


def test_plan_for_budget_measures_once_then_reuses_and_extends_its_file(tmp_path, monkeypatch):
    import mixbits.planning

    model, path = tiny_llama(), tmp_path / "sensitivity.json"
    settings = {"calibration": windows(), "kl_windows": 2, "kl_len": 16, "fisher_windows": 2, "progress": False}
    menu = parse_menu("int2:g16:asym@rtn,int4:g16:asym@rtn")
    plan, _ = mixbits.plan_for_budget(model, Budget(3.5), menu, sensitivity=path, **settings)
    direct = allocated_plan(measure(model, menu, **settings), Budget(3.5), "kl", menu=menu)
    assert [(l.name, l.option) for l in plan.layers] == [(l.name, l.option) for l in direct.layers]
    assert Sensitivity.load(path).missing(menu) == []

    asked = []
    real = mixbits.planning.measure
    monkeypatch.setattr(mixbits.planning, "measure", lambda model, options, **kw: asked.append(options) or real(model, options, **kw))
    again, _ = mixbits.plan_for_budget(model, Budget(3.5), menu, sensitivity=path, **settings)
    assert asked == [] and [l.option for l in again.layers] == [l.option for l in plan.layers]
    wider = parse_menu("int2:g16:asym@rtn,int3:g16:asym@rtn,int4:g16:asym@rtn")
    mixbits.plan_for_budget(model, Budget(3.5), wider, sensitivity=path, **settings)
    assert asked == [[Choice("int3:g16:asym", "rtn")]] and Sensitivity.load(path).missing(wider) == []

    # Other token windows of the same shape are other calibration: the file is refused, not reused.
    with pytest.raises(MixbitsError, match="measure again"):
        mixbits.plan_for_budget(model, Budget(3.5), menu, sensitivity=path, **{**settings, "calibration": (windows() + 1) % 64})
    # An impossible budget is refused before anything is measured.
    with pytest.raises(BudgetError):
        mixbits.plan_for_budget(model, Budget(1.0), menu, sensitivity=tmp_path / "other.json", **settings)
    assert len(asked) == 1 and not (tmp_path / "other.json").exists()


def _kl(reference_logits, logits):
    reference, changed = torch.log_softmax(reference_logits.double(), -1), torch.log_softmax(logits.double(), -1)
    return float((reference.exp() * (reference - changed)).sum(-1).mean())


def test_embedding_and_untied_head_damage_equal_full_forwards_of_the_changed_model():
    from mixbits.solvers import round_to_nearest

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model, x = LlamaForCausalLM(config).eval(), windows()
    menu = parse_menu("int4:g16:asym@gptq,int8:ch:sym@rtn,lut3:ch@rtn")
    sensitivity = measure(model, menu, calibration=x, kl_windows=2, kl_len=16, fisher_windows=2, outer=True,
                          progress=False)
    assert [g.name for g in sensitivity.outer] == ["model.embed_tokens", "lm_head"]
    embedding, head = sensitivity.outer
    assert (embedding.block, head.block) == (-1, 2)
    # The embedding takes every option it can look up, rounded to nearest; the head is a Linear like the others.
    assert [str(o.choice) for o in embedding.options] == ["int4:g16:asym@rtn", "int8:ch:sym@rtn", "lut3:ch@rtn"]
    assert [str(o.choice) for o in head.options] == [str(c) for c in menu]
    with torch.no_grad():
        kl_windows = x[:2, :16]
        reference = model(kl_windows).logits
        final = model(x, output_hidden_states=True).hidden_states[-1]  # the head's input, after the final norm
        hessian = (final.reshape(-1, 48).T @ final.reshape(-1, 48)).double() / final.shape[0] / final.shape[1]
        for group, module, solve_with in ((embedding, model.model.embed_tokens, None), (head, model.lm_head, hessian)):
            for option in group.options:
                changed = copy.deepcopy(model)
                target = dict(changed.named_modules())[group.name]
                fmt = parse_format(option.option)
                quantized = (round_to_nearest(module.weight, fmt) if solve_with is None
                             else solve(module.weight, fmt, option.solver, solve_with.float()))
                target.weight.copy_(quantized.dequantize())
                assert option.kl == pytest.approx(_kl(reference, changed(kl_windows).logits), rel=1e-3, abs=1e-9)
                assert option.bits == fmt.bits(*module.weight.shape)
    assert embedding.find(Choice("int8:ch:sym", "gptq")) is embedding.options[1]  # asked as the menu names it


def test_whole_model_budgets_allocate_the_embedding_with_its_tied_head(tmp_path):
    from mixbits.io.checkpoint import load_quantized, save_quantized
    from mixbits.menu import MenuError
    from mixbits.solvers import round_to_nearest

    model, x = tiny_llama(), windows()
    menu = parse_menu("int2:g16:asym@rtn,int4:g16:asym@rtn,int8:ch:sym@rtn")
    settings = {"calibration": x, "kl_windows": 2, "kl_len": 16, "fisher_windows": 2, "progress": False}
    sensitivity = measure(model, menu, outer=True, **settings)
    (embedding,) = sensitivity.outer  # the head is tied: it computes with the embedding's rows
    with torch.no_grad():
        reference = model(x[:2, :16]).logits
        for option in embedding.options:
            changed = copy.deepcopy(model)
            changed.model.embed_tokens.weight.copy_(round_to_nearest(model.model.embed_tokens.weight,
                                                                     parse_format(option.option)).dequantize())
            assert changed.lm_head.weight is changed.model.embed_tokens.weight
            assert option.kl == pytest.approx(_kl(reference, changed(x[:2, :16]).logits), rel=1e-3, abs=1e-9)
    sensitivity.save(tmp_path / "s.json")
    assert Sensitivity.load(tmp_path / "s.json").as_dict() == sensitivity.as_dict()

    everything = sum(p.numel() for p in model.parameters())
    for bpw in (3.5, 5.0, 7.0):
        budget = Budget(bpw, scope="model")
        limit = math.floor(bpw * everything) - 32 * (everything - sensitivity.weights - embedding.weights)  # norms
        plan = allocated_plan(sensitivity, budget, "kl")
        groups = sensitivity.groups + [embedding]
        best = min(sum(o.kl for o in combo) for combo in itertools.product(*(g.options for g in groups))
                   if sum(o.bits for o in combo) <= limit)
        assert plan.bits <= limit and "model.embed_tokens" in {l.name for l in plan.layers}
        largest = max(o.kl for g in groups for o in g.options)
        assert plan.damage_total == pytest.approx(best, abs=1e-9 * largest)
    # The heuristic mix holds the embedding at 16 bits, counted outside its ladder.
    mix = heuristic_plan(sensitivity, menu, Budget(5.0, scope="model"), bumped=LLAMA.bumped)
    assert "model.embed_tokens" not in {l.name for l in mix.layers}
    assert mix.bits <= math.floor(5.0 * everything) - 16 * embedding.weights - 32 * (
        everything - sensitivity.weights - embedding.weights)
    # A budget over the layers leaves the embedding out, in 16 bits, as before.
    assert "model.embed_tokens" not in {l.name for l in allocated_plan(sensitivity, Budget(5.0), "kl").layers}

    plan = allocated_plan(sensitivity, Budget(4.0, scope="model"), "kl", [parse_pin("model.embed_tokens=int4:g16:asym")])
    quantized = copy.deepcopy(model)
    report = mixbits.quantize(quantized, plan=plan, calibration=x, progress=False)
    assert [(l.name, l.option) for l in report.outer] == [("model.embed_tokens", "int4:g16:asym")]
    expected = round_to_nearest(model.model.embed_tokens.weight, parse_format("int4:g16:asym")).dequantize()
    assert torch.equal(quantized.model.embed_tokens.weight, expected)
    assert plan.bits == report.bits + report.outer[0].bits  # the plan's count is what was quantized
    save_quantized(quantized, report, tmp_path / "ckpt", plan=plan)
    with torch.no_grad():
        assert torch.allclose(load_quantized(tmp_path / "ckpt").model(x).logits, quantized(x).logits, atol=1e-5)
    edited = Plan.from_dict({**plan.as_dict(), "layers": [
        {**entry, "shape": [32, entry["shape"][1]]} if entry["name"] == "model.embed_tokens" else entry
        for entry in plan.as_dict()["layers"]]})
    with pytest.raises(PlanError, match="make the plan for this model"):
        mixbits.quantize(copy.deepcopy(model), plan=edited, calibration=x, progress=False)
    with pytest.raises(MixbitsError, match="drop the embedding format"):
        mixbits.quantize(copy.deepcopy(model), plan=plan, calibration=x, embedding_format="int8:ch:sym", progress=False)
    with pytest.raises(MenuError, match="--scope model"):
        check_budget(model, menu, [parse_pin("model.embed_tokens=int8:ch:sym")], Budget(4.0))

    # A file measured without them gains the embedding's measurements when a whole-model budget needs them.
    path = tmp_path / "layers-only.json"
    mixbits.sensitivity_for(model, menu, path=path, **settings)
    again, _ = mixbits.plan_for_budget(model, Budget(4.0, scope="model"), menu, sensitivity=path, **settings)
    assert [g.name for g in Sensitivity.load(path).outer] == ["model.embed_tokens"]
    assert again.as_dict()["layers"] == allocated_plan(sensitivity, Budget(4.0, scope="model"), "kl").as_dict()["layers"]

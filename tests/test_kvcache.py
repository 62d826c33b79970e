"""KV-cache options and the fake-quantized forward, against counted bits, brute-force masks and token-by-token decoding
through transformers' own cache and attention."""

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mixbits.errors import FormatError, TransformError
from mixbits.formats import parse_format
from mixbits.kvcache import KVQuant, parse_kv
from mixbits.kvcache.fake import fake_quantized_kv, uniform_kv
from mixbits.models.tiny import tiny_model


@pytest.mark.parametrize("text", ["int4:g64:asym", "int2:g32:asym:min=fp16/channel/residual128",
                                  "int3:ch:sym/pre-rope/rotate", "fp8_e4m3:ch"])
def test_option_strings_round_trip(text):
    assert str(KVQuant.parse(text)) == text
    assert KVQuant.parse(str(KVQuant.parse(text))) == KVQuant.parse(text)


@pytest.mark.parametrize("text", ["vq2x6:ch", "int4:tensor:asym", "int4:ch:asym/channel", "int4:g64:asym/sideways",
                                  "trellis2x4:ch", "lut4:g32", "nvfp4"])
def test_bad_options_say_what_to_do(text):
    with pytest.raises(FormatError):
        KVQuant.parse(text)


def test_no_option_is_the_model_precision():
    assert parse_kv(None) is None and parse_kv("none") is None
    assert parse_kv("int8:ch:sym") == KVQuant(parse_format("int8:ch:sym"))


def test_bits_per_token_counted_by_hand():
    kv_heads, head_dim = 3, 64
    # per token: each head's 64 values at 4 bits, one fp16 scale and a zero point (a byte, as stored) per 32
    assert KVQuant.parse("int4:g32:asym").bits_per_token(kv_heads, head_dim) == kv_heads * (64 * 4 + 2 * (16 + 8))
    # per channel: each channel's 16 tokens at 2 bits with one fp16 scale and fp16 minimum, shared by 16 tokens
    assert KVQuant.parse("int2:g16:asym:min=fp16/channel").bits_per_token(kv_heads, head_dim) == pytest.approx(
        kv_heads * head_dim * (16 * 2 + 32) / 16)
    option = KVQuant.parse("int4:g32:asym/channel/residual8")
    group = kv_heads * head_dim * (32 * 4 + 16 + 8)  # per channel: 32 tokens' codes, a scale and a zero point
    # at 100 tokens: 92 old enough, of which 64 fill whole groups; 36 wait in 16 bits
    assert option.cache_bits(100, kv_heads, head_dim) == 2 * group + 36 * kv_heads * head_dim * 16


@pytest.mark.parametrize("text", ["int4:ch:asym", "int4:ch:asym/residual3", "int4:g4:asym/channel",
                                  "int4:g4:asym/channel/residual2"])
def test_stored_mask_brute_force(text):
    option = KVQuant.parse(text)
    group = option.token_group
    queries, keys = 5, 12
    mask = option.stored_mask(queries, keys)
    for i in range(queries):
        t = keys - queries + i
        for s in range(keys):
            whole_group_old_enough = all(t - member >= option.residual for member in range(s - s % group, s - s % group + group))
            assert bool(mask[i, s]) == whole_group_old_enough, (t, s)


def test_per_channel_round_trip_quantizes_each_channel_over_its_token_group():
    torch.manual_seed(0)
    option = KVQuant.parse("int3:g4:asym/channel")
    cached = torch.randn(1, 2, 10, 8)
    out = option.round_trip(cached)
    fmt = parse_format("int3:g4:asym")
    for head in range(2):
        for start in (0, 4):
            block = cached[0, head, start:start + 4]  # [tokens, channels]
            expected = fmt.quantize(block.T.contiguous()).dequantize().T
            torch.testing.assert_close(out[0, head, start:start + 4], expected)
    torch.testing.assert_close(out[..., 8:, :], cached[..., 8:, :])  # a partial group waits unrounded


def test_rotation_is_undone_after_rounding():
    torch.manual_seed(0)
    cached = torch.randn(1, 2, 6, 16)
    fine = KVQuant.parse("int8:ch:sym/rotate").round_trip(cached)
    assert (fine - cached).abs().max() < 0.05  # 8 bits in the rotated basis, rotated back
    assert not torch.equal(fine, KVQuant.parse("int8:ch:sym").round_trip(cached))


class ReadAsStored(DynamicCache):
    """The oracle: transformers' own cache and attention, decoding one token at a time, handing attention the keys and
    values each step reads under an option (rounded, or 16-bit while waiting), pre-rope keys from k_proj's output."""

    def __init__(self, model, keys, values):
        super().__init__()
        self.keys_option, self.values_option = keys, values
        self.rotary = model.model.rotary_emb
        self.pre_rope = {}  # layer -> [b, heads, tokens, head_dim] keys as k_proj wrote them
        self.hooks = []
        heads, head_dim = model.config.num_key_value_heads, model.config.head_dim
        for index, layer in enumerate(model.model.layers):
            def capture(module, args, output, index=index):
                new = output.reshape(output.shape[0], -1, heads, head_dim).transpose(1, 2)
                old = self.pre_rope.get(index)
                self.pre_rope[index] = new if old is None else torch.cat([old, new], dim=2)
            self.hooks.append(layer.self_attn.k_proj.register_forward_hook(capture))

    def read(self, option, stored, t, rope=None):
        waiting = stored.to(torch.float16).float()  # tokens arrive as float16 and are quantized from there
        rounded = option.round_trip(waiting)
        if rope is not None:
            rounded, waiting = rope(rounded), rope(waiting)
        group = option.token_group
        out = waiting.clone()
        for s in range(stored.shape[2]):
            group_end = s - s % group + group - 1
            if group_end <= t - option.residual:
                out[:, :, s] = rounded[:, :, s]
        return out

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        t = keys.shape[2] - 1
        if self.keys_option is not None:
            if self.keys_option.pre_rope:
                cos, sin = self.rotary(keys, torch.arange(t + 1).unsqueeze(0))

                def rope(x):
                    return apply_rotary_pos_emb(x, x, cos, sin)[1]
                keys = self.read(self.keys_option, self.pre_rope[layer_idx], t, rope)
            else:
                keys = self.read(self.keys_option, keys, t)
        if self.values_option is not None:
            values = self.read(self.values_option, values, t)
        return keys, values


def decoded_logits(model, ids, keys, values):
    cache = ReadAsStored(model, keys, values)
    logits = []
    with torch.no_grad():
        for position in range(ids.shape[1]):
            out = model(input_ids=ids[:, position:position + 1], cache=cache, use_cache=True)
            logits.append(out.logits[0, -1])
    for hook in cache.hooks:
        hook.remove()
    return torch.stack(logits)


@pytest.mark.parametrize("family,keys,values", [
    ("llama", "int4:ch:asym", "int4:ch:asym"),
    ("llama", "int2:g8:asym/channel/residual3", "int2:g8:asym/residual5"),
    ("llama", "int3:g8:sym/pre-rope", None),
    ("llama", "int2:g4:asym:min=fp16/channel/pre-rope/rotate/residual2", "int3:ch:asym/rotate"),
    ("llama", None, "int2:g4:asym/channel"),
    ("gemma2", "int2:g8:asym/channel/residual3", "int2:g8:asym/residual5"),  # softcapped scores: the eager path
])
def test_parallel_forward_equals_token_by_token_decoding(family, keys, values):
    model = tiny_model(family)
    keys, values = parse_kv(keys), parse_kv(values)
    ids = torch.randint(0, 64, (1, 21), generator=torch.Generator().manual_seed(1))
    expected = decoded_logits(model, ids, keys, values)
    with torch.no_grad(), fake_quantized_kv(model, uniform_kv(model, keys, values)):
        got = model(input_ids=ids, use_cache=False).logits[0]
    plain = model(input_ids=ids, use_cache=False).logits[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # the options changed something


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3", "mistral"])
def test_unquantized_options_leave_the_forward_unchanged(family):
    model = tiny_model(family)
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
        with fake_quantized_kv(model, uniform_kv(model, None, None)):
            same = model(input_ids=ids, use_cache=False).logits
        after = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after, plain)  # the model's own attention is back


def test_values_refuse_pre_rope():
    model = tiny_model("llama")
    with pytest.raises(TransformError, match="give pre-rope to keys only"):
        with fake_quantized_kv(model, uniform_kv(model, None, parse_kv("int4:ch:asym/pre-rope"))):
            pass


def test_allocation_is_the_brute_force_optimum_and_meets_the_budget():
    import itertools

    from mixbits.kvcache.plan import CacheShape, KVBudget, allocate_kv

    shape = CacheShape(blocks=2, kv_heads=2, head_dim=16)
    names = ["int8:ch:sym", "int4:g16:asym", "int2:g8:asym/channel/residual4"]
    generator = torch.Generator().manual_seed(3)
    damage = {(b, kind): {name: float(torch.rand(1, generator=generator)) * (i + 1)
                          for i, name in enumerate(names)} for b in range(2) for kind in ("keys", "values")}
    for bits in (5.5, 8.0, 12.0):
        budget = KVBudget(context=100, bits_per_number=bits)
        plan = allocate_kv(damage, shape, budget)
        limit = budget.total_bits(shape)
        assert plan.cache_bits(shape) <= limit
        best = None
        for pick in itertools.product(["none"] + names, repeat=4):
            options = [parse_kv(p) for p in pick]
            size = sum(shape.bits(o, 100) for o in options)
            cost = sum(0.0 if p == "none" else damage[(i // 2, ("keys", "values")[i % 2])][p] for i, p in enumerate(pick))
            if size <= limit and (best is None or cost < best):
                best = cost
        assert plan.damage == pytest.approx(best)


def test_plan_file_holds_the_kv_cache_beside_the_weights(tmp_path):
    from mixbits.kvcache.plan import KVPlan, KVPlanError
    from mixbits.plan import Plan, PlanError

    kv = KVPlan([(parse_kv("int4:g64:asym/pre-rope"), None), (None, parse_kv("int2:g32:asym/channel"))], 4096)
    Plan([], {"name": "tiny"}, kv_cache=kv).save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.kv_cache.layers == kv.layers and loaded.kv_cache.context == 4096
    import json

    data = json.loads((tmp_path / "plan.json").read_text())
    data["kv_cache"]["layers"][1]["values"] = "int2:g32:asym/sideways"
    with pytest.raises(KVPlanError, match="sideways"):
        Plan.from_dict(data)
    data["kv_cache"]["layers"][1]["block"] = 5
    with pytest.raises(KVPlanError, match="in order"):
        Plan.from_dict(data)
    with pytest.raises(PlanError, match="no layers"):
        Plan([], {})


def test_measured_damage_is_the_kl_of_the_whole_forward(tmp_path):
    from mixbits.kvcache.damage import KVDamage, measure_kv_damage

    model = tiny_model("llama")
    windows = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(4))
    options = [parse_kv("int8:ch:sym"), parse_kv("int2:g16:asym/pre-rope")]
    measured = measure_kv_damage(model, windows, options, {"name": "tiny"}, {"windows": 2})
    assert "int2:g16:asym/pre-rope" not in measured.blocks[0]["values"]  # values have no rotary embedding
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=windows).logits.double(), -1)
        layers = [(None, None), (options[1], None)]
        with fake_quantized_kv(model, layers):
            changed = torch.log_softmax(model(input_ids=windows).logits.double(), -1)
    kl = float((reference.exp() * (reference - changed)).sum(-1).mean())
    assert measured.blocks[1]["keys"]["int2:g16:asym/pre-rope"] == pytest.approx(kl, rel=1e-3)
    for block in measured.blocks:
        assert block["keys"]["int8:ch:sym"] < block["keys"]["int2:g16:asym/pre-rope"]
    measured.save(tmp_path / "kv.json")
    assert KVDamage.load(tmp_path / "kv.json").table() == measured.table()


def test_kv_arguments_are_checked_before_a_model_loads(tmp_path, capsys):
    from test_cli import refused

    out = str(tmp_path / "plan.json")
    assert "unknown KV-cache field 'sideways'" in refused(capsys, "eval", "--kv", "int4:g64:asym/sideways")
    assert "cannot quantize a cache as it grows" in refused(capsys, "eval", "--kv-keys", "vq2x6:ch")
    assert "cannot quantize a cache" in refused(capsys, "kv-plan", "--bits", "3", "--options", "trellis2x4:ch",
                                                "--out", out)
    assert "write it like 60MB" in refused(capsys, "kv-plan", "--size", "forty", "--out", out)
    assert "context must be at least 1" in refused(capsys, "kv-plan", "--bits", "3", "--context", "0", "--out", out)
    assert "does not exist" in refused(capsys, "kv-plan", "--bits", "3", "--into", str(tmp_path / "none.json"),
                                       "--out", out)
    assert "positive number of bits" in refused(capsys, "kv-plan", "--bits", "nan", "--out", out)
    assert "does not exist" in refused(capsys, "generate", "-p", "x", "--kv-plan", str(tmp_path / "none.json"))
    assert "not both" in refused(capsys, "eval", "--kv-plan", out, "--kv", "int4:g32:asym")
    assert "--kv-keys only" in refused(capsys, "eval", "--kv-values", "int4:g32:asym/pre-rope")
    assert not list(tmp_path.iterdir())
    from mixbits.kvcache.plan import KVPlan
    from mixbits.plan import Plan

    Plan([], {}, kv_cache=KVPlan([(parse_kv("int4:g32:asym"), None)] * 30, 4096)).save(out)
    assert "only a KV cache" in refused(capsys, "quantize", "--plan", out)


def test_store_packs_and_reads_back_what_the_fake_forward_rounds():
    from mixbits.runtime.kv_store import KVStore

    torch.manual_seed(5)
    tokens = torch.randn(2, 37, 16)
    for text in ["int4:g8:asym", "int3:ch:sym/rotate", "int2:g8:asym:min=fp16/channel/residual5", "fp8_e4m3:ch"]:
        option = parse_kv(text)
        store = KVStore(option, 2, 16, capacity=40)
        for start, stop in ((0, 9), (9, 10), (10, 37)):  # a prompt, then steps
            store.append(tokens[:, start:stop])
        expected = option.round_trip(tokens.half().float())
        quantized = option.quantized_tokens(37)
        assert store.quantized == quantized
        torch.testing.assert_close(store.read()[:, :quantized], expected[:, :quantized], rtol=0, atol=0)
        torch.testing.assert_close(store.read()[:, quantized:], tokens[:, quantized:].half().float(), rtol=0, atol=0)
    # int4 per token, groups of 8: 4-bit codes, an fp16 scale and an 8-bit zero point per group, packed
    store = KVStore(parse_kv("int4:g8:asym"), 2, 16, capacity=40)
    assert store.codes.numel() == 2 * 40 * 16 * 4 // 8
    assert store.params["scale"].dtype == torch.float16 and store.params["zero"].dtype == torch.uint8


@pytest.mark.parametrize("keys,values", [
    ("int4:g8:asym", "int4:g8:asym"),
    ("int2:g8:asym/channel/residual3", "int2:g8:asym/residual5"),
    ("int2:g4:asym:min=fp16/channel/rotate/residual2", "int3:ch:asym/rotate"),
    (None, "int2:g4:asym/channel"),
    ("int8:ch:sym/pre-rope", None),
])
def test_decoder_packed_cache_gives_the_fake_quantized_logits(keys, values):
    from mixbits.runtime.decode import Decoder

    model = tiny_model("llama")
    kv = uniform_kv(model, parse_kv(keys), parse_kv(values))
    ids = torch.randint(0, 64, (23,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), fake_quantized_kv(model, kv):
        expected = model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0]
    decoder = Decoder(model)
    # pre-rope keys reach the store straight from k_proj, the fake forward recovers them by the inverse rotation:
    # float16 rounding may then differ in the last bit, and an int8 code by one step
    tolerance = 2e-3 if keys and "pre-rope" in keys else 1e-4
    torch.testing.assert_close(decoder.logits(ids, kv=kv, steps=True), expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(decoder.logits(ids, kv=kv), expected, rtol=1e-4, atol=1e-4)
    prompt = 9  # a prompt through the fake-quantized attention, then steps reading the stores
    new = decoder.generate(ids[:prompt], 10, kv=kv)
    with torch.no_grad(), fake_quantized_kv(model, kv):
        greedy = model.generate(ids[:prompt].unsqueeze(0), max_new_tokens=10, do_sample=False, pad_token_id=0)[0]
    assert torch.equal(new, greedy)


def test_pre_rope_storage_with_rope_on_read_equals_post_rope_storage():
    from mixbits.runtime.decode import Decoder

    model = tiny_model("llama")
    ids = torch.randint(0, 64, (30,), generator=torch.Generator().manual_seed(7))
    decoder = Decoder(model)
    plain = decoder.logits(ids, steps=True)
    never = "int2:ch:asym/residual64"  # nothing is ever old enough: every token waits in float16, unquantized
    post = decoder.logits(ids, kv=uniform_kv(model, parse_kv(never), None), steps=True)
    pre = decoder.logits(ids, kv=uniform_kv(model, parse_kv(never + "/pre-rope"), None), steps=True)
    torch.testing.assert_close(pre, post, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(post, plain, rtol=2e-3, atol=2e-3)
    assert not torch.equal(pre, post)  # the two really stored different tensors


@pytest.mark.parametrize("text", ["int4:g32:asym", "int4:ch:sym/rotate", "int8:ch:asym:min=fp16/residual3",
                                  "int3:g16:asym", "int2:g8:asym/channel", "int2:g16:asym:min=fp16/channel/rotate",
                                  "int5:g32:sym", "int1:g8:sym/residual2", "int4:g32:asym:scale=bf16:min=bf16",
                                  "int4:g32:sym:scale=fp32", "int4:g32:sym:scale=e8m0", "fp8_e4m3:ch"])
def test_store_scores_and_mix_equal_the_dequantized_products(text):
    from mixbits.runtime.kernels import native
    from mixbits.runtime.kv_store import KVStore

    option = parse_kv(text)
    store = KVStore(option, 2, 64, capacity=700)
    # integer codes with plain float parameters: the kernels; minifloats and coded scales: dequantized in PyTorch
    fast = text.startswith("int") and "e8m0" not in text
    if fast and native() is None:
        pytest.skip("the native kernels are not built here: scores and mix would be read() against itself")
    assert (store.kernel is not None) == fast
    torch.manual_seed(8)
    store.append(torch.randn(2, 600, 64))  # several of the kernels' 256-token work items
    store.append(torch.randn(2, 1, 64))
    assert store.quantized > 0
    values = store.read()  # in the original basis (a rotating option's values rotated back)
    query = torch.randn(2, 3, 64)
    torch.testing.assert_close(store.scores(query), query @ values.transpose(1, 2), rtol=1e-4, atol=1e-4)
    weights = torch.softmax(torch.randn(2, 3, 601), dim=-1)
    torch.testing.assert_close(store.mix(weights), weights @ values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("text", ["int4:g32:asym", "int3:g8:asym", "int2:g16:asym/rotate", "int8:ch:sym",
                                  "int4:g16:sym:scale=fp32", "int5:ch:asym", "int1:g8:sym"])
def test_native_encoding_stores_what_kvquant_encodes(text):
    from mixbits.runtime.kernels import native
    from mixbits.runtime.kv_store import KVStore

    if native() is None:
        pytest.skip("the native kernels are not built here")
    option = parse_kv(text)
    torch.manual_seed(10)
    tokens = torch.randn(3, 50, 64) * torch.logspace(-6, 3, 50).reshape(1, 50, 1)  # tiny to large scales
    tokens[:, 3] = 0  # all-zero groups: the smallest scale
    # every group spans [-7.5, 7.5] in halves: int4's scale is exactly 1, so codes and zero points round from ties
    halves = torch.arange(64) % 8 - 3.5
    halves[torch.arange(64) % 8 == 0], halves[torch.arange(64) % 8 == 7] = -7.5, 7.5
    tokens[:, 4] = halves
    tokens[:, 5] = -tokens[:, 5].abs()  # no positive value: the zero point at the top
    native_store, torch_store = KVStore(option, 3, 64, 60), KVStore(option, 3, 64, 60)
    assert native_store.native_encoding
    torch_store.native_encoding = False  # KVQuant.encode and packing.pack
    for start, stop in ((0, 20), (20, 21), (21, 50)):
        native_store.append(tokens[:, start:stop])
        torch_store.append(tokens[:, start:stop])
    assert torch.equal(native_store.codes, torch_store.codes)
    for name, value in torch_store.params.items():
        assert torch.equal(native_store.params[name], value), name


@pytest.mark.parametrize("keys,values", [("int4:g32:asym", "int4:ch:sym/rotate"), ("int8:ch:sym", "int4:g32:asym/residual4")])
def test_decoder_kernel_path_gives_the_fake_quantized_logits(keys, values):
    from mixbits.runtime.decode import Decoder

    model = tiny_model("llama", head_dim=64)  # heads of 64: the native kernels' path
    kv = uniform_kv(model, parse_kv(keys), parse_kv(values))
    ids = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), fake_quantized_kv(model, kv):
        expected = model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0]
    torch.testing.assert_close(Decoder(model).logits(ids, kv=kv, steps=True), expected, rtol=1e-4, atol=1e-4)


def test_quantize_refuses_a_plan_of_the_cache_alone(tmp_path):
    import mixbits
    from mixbits.kvcache.plan import KVPlan
    from mixbits.plan import Plan, PlanError

    model = tiny_model("llama")
    plan = Plan([], {}, kv_cache=KVPlan([(parse_kv("int4:ch:asym"), None)] * 2, 128))
    with pytest.raises(PlanError, match="only a KV cache"):
        mixbits.quantize(model, plan=plan, calibration=torch.randint(0, 64, (2, 16)))


@pytest.mark.model
def test_kv_plan_eval_and_generate_on_the_default_model(tmp_path, capsys):
    import json

    from mixbits.cli import main

    plan = tmp_path / "plan.json"
    assert main(["kv-plan", "--bits", "6", "--context", "256", "--options", "int8:ch:sym,int2:g32:asym",
                 "--calib-windows", "4", "--calib-window-len", "64", "--damage-file", str(tmp_path / "kv.json"),
                 "--out", str(plan)]) == 0
    kv = json.loads(plan.read_text())["kv_cache"]
    picked = [entry[kind] for entry in kv["layers"] for kind in ("keys", "values")]
    assert set(picked) <= {"none", "int8:ch:sym", "int2:g32:asym"} and len(set(picked)) > 1  # a real mix
    assert (tmp_path / "kv.json").exists()
    capsys.readouterr()
    assert main(["eval", "--kv-plan", str(plan), "--windows", "2", "--window-len", "128", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["kv_cache"][0]["keys"] in {"none", "int8:ch:sym", "int2:g32:asym"}
    assert all(d["kl"] > 0 for d in record["evaluation"]["domains"])  # against the float cache of the same model
    assert main(["generate", "--prompt", "The capital of France is", "-n", "8", "--kv", "int4:g32:asym"]) == 0
    assert "mixbits decoder" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["int4:g32:asym", "int3:ch:sym", "int2:g32:asym:min=fp16/channel",
                                  "fp8_e4m3:g32", "int8:g16:asym/rotate"])
def test_bits_counted_equal_bytes_stored(text):
    from mixbits.runtime.kv_store import KVStore

    option = parse_kv(text)
    store = KVStore(option, 3, 64, capacity=64)
    store.append(torch.randn(3, 64, 64))
    assert store.quantized == 64 and store.waiting.shape[1] == 0
    assert store.nbytes * 8 == option.cache_bits(64, 3, 64)


def test_pre_rope_keys_under_scaled_rotary_tables():
    """YaRN multiplies cos and sin by an attention scaling: undoing the rotation must divide it out."""
    model = tiny_model("llama", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                 "original_max_position_embeddings": 32})
    cos, _ = model.model.rotary_emb(torch.empty(1), torch.arange(4).unsqueeze(0))
    assert cos.abs().max() > 1.01  # the tables really carry a magnitude
    keys = parse_kv("int4:g8:asym/pre-rope")
    ids = torch.randint(0, 64, (1, 21), generator=torch.Generator().manual_seed(10))
    expected = decoded_logits(model, ids, keys, None)
    with torch.no_grad(), fake_quantized_kv(model, uniform_kv(model, keys, None)):
        got = model(input_ids=ids, use_cache=False).logits[0]
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)


def test_queries_in_chunks_give_the_same_forward(monkeypatch):
    import mixbits.kvcache.fake as fake

    model = tiny_model("gemma2")  # softcapping and a sliding window's mask too
    kv = uniform_kv(model, parse_kv("int2:g8:asym/channel/residual3"), parse_kv("int3:g8:asym/residual2"))
    ids = torch.randint(0, 64, (1, 80), generator=torch.Generator().manual_seed(11))
    with torch.no_grad(), fake_quantized_kv(model, kv):
        whole = model(input_ids=ids, use_cache=False).logits
        monkeypatch.setattr(fake, "QUERY_CHUNK", 7)
        chunked = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)

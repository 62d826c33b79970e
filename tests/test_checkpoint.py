"""Packed checkpoints: exact storage of every format, save -> load -> same outputs, damaged files refused."""

import json
import pickle

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mixbits
from mixbits.activations import parse_activation
from mixbits.formats import catalog, parse_format
from mixbits.formats.storage import restore, store, stored_bytes
from mixbits.io.checkpoint import CheckpointError, checkpoint_info, load_quantized, save_quantized
from mixbits.plan import KEEP, LayerPlan, Plan
from mixbits.solvers import gptq, round_to_nearest

SECOND_LEVEL = ["int4:g64:sym:scale=i8", "fp4_e2m1:g16:scale=e4m3", "int3:ch:asym", "int8:tensor:sym", "lut3:g64:table=bf16"]


@pytest.mark.parametrize("fmt", catalog(64) + [parse_format(s) for s in SECOND_LEVEL], ids=str)
def test_storage_is_exact_and_as_small_as_counted(fmt):
    torch.manual_seed(0)
    weight = torch.randn(24, 200)  # 200 columns: a partial last group of 64
    inputs = torch.randn(300, 200) * torch.rand(200)
    # GPTQ pins second-level scales while it fits groups one by one; storage must keep them exactly.
    solvers = (round_to_nearest(weight, fmt),) + ((gptq(weight, inputs.T @ inputs, fmt),) if fmt.has_second_level else ())
    for quantized in solvers:
        tensors = store(quantized)
        back = restore(parse_format(str(fmt)), quantized.shape, tensors)
        assert torch.equal(back.dequantize(), quantized.dequantize())
        # Every stored bit is counted by Format.bits; only each tensor's last byte may be partly unused.
        slack = stored_bytes(tensors) * 8 - fmt.bits(*quantized.shape)
        assert 0 <= slack < 8 * len(tensors), (slack, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()})


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


CALIBRATION = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
PROMPT = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))


def quantized_copy(fmt="int4:g32:asym", solver="rtn", **options):
    model = tiny_llama()
    report = mixbits.quantize(model, fmt, solver=solver, calibration=CALIBRATION, progress=False, **options)
    return model, report


def logits(model):
    with torch.no_grad():
        return model(PROMPT).logits


@pytest.mark.parametrize("fmt, head, solver", [
    ("int4:g32:asym", None, "gptq"), ("int3:g32:sym", "int8:ch:sym", "rtn"), ("nvfp4", "nvfp4", "gptq"),
    ("mxfp4", None, "rtn"), ("nf4:g32", None, "rtn"), ("lut3:g32", None, "rtn"), ("int8:ch:sym", None, "rtn"),
    ("binary:g32", None, "rtn"),
])
def test_saved_model_computes_what_the_fake_quantized_one_did(tmp_path, fmt, head, solver):
    model, report = quantized_copy(fmt, solver, head_format=head)
    saved = save_quantized(model, report, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt").model
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)
    assert torch.equal(loaded.generate(PROMPT[:1], max_new_tokens=6, do_sample=False),
                       model.generate(PROMPT[:1], max_new_tokens=6, do_sample=False))
    assert saved.quantized_bits == report.bits
    assert 0 <= saved.quantized_bytes * 8 - report.bits < 8 * 3 * len(report.layers)
    assert not any(isinstance(m, torch.nn.Linear) for m in loaded.model.layers.modules())  # all packed


@pytest.mark.parametrize("fmt, act", [("q4_0", "int8:g32"), ("int8:ch:sym", "int8:token"), ("nf4:g32", "int8:g32"),
                                      ("q4_0", "fp8_e4m3:ch"), ("mxfp4", "int8:g32"), ("lut4:g32", "int8:g32")])
def test_quantized_inputs_are_saved_and_computed_as_at_quantization(tmp_path, fmt, act):
    from mixbits.activations import fake_quantize, parse_activation
    from mixbits.runtime import IntLinear
    from mixbits.runtime.linear import TableLinear

    model, report = quantized_copy(fmt, activation=act)
    assert {layer.activation for layer in report.layers} == {act}
    # the fake-quantized model rounds each layer's input: check one layer against its own oracle
    q_proj, seen = model.model.layers[0].self_attn.q_proj, {}
    q_proj.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]), prepend=True)  # the raw input
    q_proj.register_forward_hook(lambda module, args, out: seen.update(y=out))
    logits(model)
    expected = torch.nn.functional.linear(fake_quantize(seen["x"], parse_activation(act)), q_proj.weight)
    assert torch.allclose(seen["y"], expected, atol=1e-6)
    save_quantized(model, report, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt").model
    # Float summation order differs (integer kernels, stacked rows), and an input a rounding step away from a
    # boundary can land on the other code, so logits agree to within a few codes' worth, not to 1e-5.
    expected = logits(model)
    assert torch.allclose(logits(loaded), expected, atol=0.02 * expected.abs().max().item())
    assert all(str(m.activation) == str(parse_activation(act)) for m in loaded.model.layers.modules()
               if hasattr(m, "codes"))
    integer = any(isinstance(m, (IntLinear, TableLinear)) for m in loaded.model.layers.modules())
    assert integer == act.startswith("int")  # the integer kernels where they apply


def test_static_input_scales_are_measured_on_the_calibration_text_and_saved(tmp_path):
    from mixbits.runtime import IntLinear

    model, report = quantized_copy("q4_0", activation="int8:static")
    # the oracle: the same weights with float inputs, and each layer's largest input over the calibration windows
    reference, _ = quantized_copy("q4_0")
    largest = {}
    for name, module in reference.named_modules():
        if name.endswith(("q_proj", "k_proj", "down_proj")):
            module.register_forward_pre_hook(
                lambda m, args, name=name: largest.__setitem__(name, max(largest.get(name, 0.0), args[0].abs().max().item())))
    with torch.no_grad():
        for window in CALIBRATION:
            reference(window[None])
    scales = {layer.name: parse_activation(layer.activation).value for layer in report.layers}
    for name, top in largest.items():
        assert scales[name] == float(torch.tensor(top / 127))
    assert scales["model.layers.1.self_attn.q_proj"] == scales["model.layers.1.self_attn.k_proj"]  # one input
    save_quantized(model, report, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt").model
    expected = logits(model)
    assert torch.allclose(logits(loaded), expected, atol=0.02 * expected.abs().max().item())
    stored = {name: str(m.activation) for name, m in loaded.named_modules() if hasattr(m, "codes")}
    assert all(stored[layer.name] == layer.activation for layer in report.layers)
    assert any(isinstance(m, IntLinear) for m in loaded.model.layers.modules())


@pytest.mark.parametrize("embedding", [None, "q8_0", "int4:g16:asym", "nf4:g32", "int8:ch:sym"])
def test_embedding_is_stored_in_16_bits_or_quantized_and_looked_up_from_codes(tmp_path, embedding):
    from safetensors.torch import load_file

    from mixbits.runtime import IntLinear, QuantizedEmbedding
    from mixbits.runtime.embedding import TiedEmbedding

    original = tiny_llama().model.embed_tokens.weight.detach().clone()
    model, report = quantized_copy(embedding_format=embedding)
    table = model.model.embed_tokens.weight.detach()
    if embedding is None:
        assert torch.equal(table, original.half().float())
    else:  # what plain rounding of the float table gives, row by row
        assert torch.equal(table, round_to_nearest(original, parse_format(embedding)).dequantize())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied: the head computes with the same values
    save_quantized(model, report, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt").model
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)
    embed = loaded.model.embed_tokens
    if embedding is None:
        assert isinstance(embed, torch.nn.Embedding) and torch.equal(embed.weight, table)
    elif isinstance(loaded.lm_head, IntLinear):  # rows read from the head's codes: the codes are held once
        assert isinstance(embed, TiedEmbedding) and embed.head is loaded.lm_head
        assert torch.allclose(embed(PROMPT), table[PROMPT], rtol=1e-6, atol=1e-7)
    else:
        assert isinstance(embed, QuantizedEmbedding) and not isinstance(loaded.lm_head, torch.nn.Linear)
        assert torch.equal(embed(PROMPT), table[PROMPT])
    # The two tensor files hold what the report counts: every stored bit, up to each tensor's last byte.
    stored = sum(t.numel() * t.element_size() for name in ("quantized.safetensors", "float.safetensors")
                 for t in load_file(str(tmp_path / "ckpt" / name)).values())
    tensors = len(load_file(str(tmp_path / "ckpt" / "quantized.safetensors"))) + len(
        load_file(str(tmp_path / "ckpt" / "float.safetensors")))
    assert 0 <= stored * 8 - report.model_bits < 8 * tensors


def test_quantizing_the_embedding_in_a_format_without_row_lookup_is_refused():
    with pytest.raises(mixbits.MixbitsError, match="row by row"):
        quantized_copy(embedding_format="int8:tensor:sym")


def test_mixed_plan_with_16_bit_layers_round_trips(tmp_path):
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    options = ["int2:g32:asym", "int4:g32:asym", KEEP, "nvfp4"]
    layers = [LayerPlan(name, name, options[i % 4], "rtn" if options[i % 4] == KEEP else "gptq",
                        tuple(dict(model.named_modules())[name].weight.shape))
              for i, name in enumerate(names)]
    plan = Plan(layers)
    report = mixbits.quantize(model, plan=plan, calibration=CALIBRATION, progress=False)
    save_quantized(model, report, tmp_path / "ckpt", plan=plan)
    loaded = load_quantized(tmp_path / "ckpt").model
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)
    info = checkpoint_info(tmp_path / "ckpt")
    assert [layer["option"] for layer in info["layers"]] == [layer.option for layer in layers]
    assert info["plan"]["layers"][2]["option"] == KEEP


def test_loading_never_unpickles(tmp_path, monkeypatch, quantized):
    model, report = quantized
    save_quantized(model, report, tmp_path / "ckpt")

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert torch.allclose(logits(load_quantized(tmp_path / "ckpt").model), logits(model), atol=1e-5)


@pytest.fixture(scope="module")
def quantized():
    return quantized_copy()


@pytest.fixture
def saved(tmp_path, quantized):
    save_quantized(*quantized, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda d: flip_byte(d / "quantized.safetensors", -5), "sha256"),
    (lambda d: (d / "float.safetensors").write_bytes((d / "float.safetensors").read_bytes()[:-100]), "truncated"),
    (lambda d: (d / "config.json").unlink(), "missing"),
    (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "not valid UTF-8 JSON"),
    (lambda d: (d / "manifest.json").write_text(json.dumps({**json.loads((d / "manifest.json").read_text()),
                                                             "mixbits_checkpoint": 99})), "version 99"),
])
def test_damaged_checkpoints_are_refused(saved, damage, message):
    damage(saved)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(saved)


def test_writing_is_atomic(tmp_path, monkeypatch, quantized):
    model, report = quantized
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(mixbits.MixbitsError, match="not a mixbits checkpoint"):
        save_quantized(model, report, other)
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]

    target = tmp_path / "ckpt"
    save_quantized(model, report, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    import mixbits.io.checkpoint as checkpoint_module

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "write_safetensors", crash)
    with pytest.raises(OSError):
        save_quantized(model, report, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "notes"]  # and no temporary is left


def test_a_plan_sets_each_layers_input_format(tmp_path):
    from mixbits.models.structure import quantizable_linears

    model = tiny_llama()
    layers = [LayerPlan(name, name, "q4_0", "rtn", tuple(linear.weight.shape),
                        activation="int8:token" if ".mlp." in name else None)
              for name, linear in quantizable_linears(model, False)]
    Plan(layers).save(tmp_path / "plan.json")  # through the file: the field is written and read back
    report = mixbits.quantize(model, plan=Plan.load(tmp_path / "plan.json"), activation="int8:g32", calibration=CALIBRATION, progress=False)
    for layer in report.layers:  # the plan's own format wins; the others take the command's
        assert layer.activation == ("int8:token" if ".mlp." in layer.name else "int8:g32")
        assert str(model.get_submodule(layer.name).activation) == str(parse_activation(layer.activation))
    with pytest.raises(mixbits.MixbitsError, match="activation"):
        Plan([LayerPlan(layers[0].name, layers[0].name, "q4_0", "rtn", layers[0].shape, activation="int8:tensor:sym")])


@pytest.mark.parametrize("where, value, message", [("activation", 8, "activation must be a string"),
                                                   ("activation", "int9:token", "activation"),
                                                   ("head_activation", "int8:nonsense", "head_activation"),
                                                   ("activation", "int8:static", "no scale"),
                                                   ("activation", "int8:static=0.1", "float32")])
def test_malformed_input_formats_in_a_checkpoint_are_one_line_errors(tmp_path, where, value, message):
    from mixbits.hashing import sha256_file

    model, report = quantized_copy("q4_0", activation="int8:g32", embedding_format="q8_0")
    save_quantized(model, report, tmp_path / "ckpt")
    info_path, manifest_path = tmp_path / "ckpt" / "mixbits.json", tmp_path / "ckpt" / "manifest.json"
    info = json.loads(info_path.read_text())
    (info["layers"][0] if where == "activation" else info["outer"][0])[where] = value
    info_path.write_text(json.dumps(info))  # a hand edit, with the manifest rewritten to match
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["mixbits.json"] = {"bytes": info_path.stat().st_size, "sha256": sha256_file(info_path)}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=message):
        load_quantized(tmp_path / "ckpt")

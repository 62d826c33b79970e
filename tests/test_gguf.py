"""GGUF export: GGML block types bit for bit, names and metadata llama.cpp needs, and what cannot be exported."""

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import mixbits
from mixbits.formats import parse_format
from mixbits.io.checkpoint import save_quantized
from mixbits.io.gguf import ExportError, export_gguf, ggml_type_name
from mixbits.menu import MenuError, group_choices, parse_menu, parse_pin
from mixbits.models.loader import default_gguf_path
from mixbits.plan import KEEP, LayerPlan, Plan

OPTIONS = ["q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "mxfp4", KEEP]
LLAMA_KEYS = ["general.architecture", "llama.context_length", "llama.embedding_length", "llama.block_count",
              "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
              "llama.rope.dimension_count", "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon",
              "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
              "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A two-block LLaMA whose linears take every GGML type in turn, saved and exported."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    layers = [LayerPlan(name, name, OPTIONS[i % len(OPTIONS)], "rtn", tuple(modules[name].weight.shape))
              for i, name in enumerate(names)]
    report = mixbits.quantize(model, plan=Plan(layers), calibration=torch.randint(0, 64, (4, 32)),
                              embedding_format="q8_0", progress=False)
    root = tmp_path_factory.mktemp("gguf")
    save_quantized(model, report, root / "ckpt")
    # The tiny model has no tokenizer of its own: borrow the default model's metadata.
    path = export_gguf(root / "ckpt", root / "model.gguf", tokenizer_gguf=default_gguf_path())
    return model, config, layers, path


def test_every_tensor_dequantizes_to_the_weights_mixbits_computed_with(exported):
    model, config, layers, path = exported
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    modules = dict(model.named_modules())
    types = set()
    for layer in layers:
        tensor = tensors[names.get_name(layer.name) + ".weight"]
        expected_type = "F16" if layer.option == KEEP else layer.option.upper()
        assert tensor.tensor_type.name == expected_type
        types.add(expected_type)
        weight = modules[layer.name].weight.detach()
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(layer.name[-6:])
        if heads:  # GGML's rotary row order
            rows = weight.shape[0]
            weight = weight.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(rows, -1)
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
        assert np.array_equal(values, weight.numpy()), layer.name
    assert types == {"Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "MXFP4", "F16"}
    assert {"token_embd.weight", "output_norm.weight", "blk.1.ffn_norm.weight", "blk.0.attn_norm.weight"} <= set(tensors)
    embedding = tensors["token_embd.weight"]  # written from its Q8_0 codes; the tied output is not written
    assert embedding.tensor_type.name == "Q8_0"
    values = gguf.quants.dequantize(embedding.data, embedding.tensor_type).reshape(config.vocab_size, -1)
    assert np.array_equal(values, model.model.embed_tokens.weight.detach().numpy())
    assert len(tensors) == 2 + 2 * 9  # embedding, final norm; per block 7 matrices and 2 norms (output tied)
    for key in LLAMA_KEYS:
        assert key in reader.fields, key
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2


def test_a_third_party_reader_runs_it_like_mixbits(exported):
    model, _, _, path = exported
    reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_options_without_a_ggml_type_name_the_nearest():
    with pytest.raises(ExportError, match="nearest is q4_1"):
        ggml_type_name("int4:g64:asym", (576, 576))
    with pytest.raises(ExportError, match="nearest is q4_k"):
        ggml_type_name("int4:g64:asym", (576, 1536))
    with pytest.raises(ExportError, match="nearest is mxfp4"):
        ggml_type_name("nvfp4", (576, 576))
    with pytest.raises(ExportError, match="whole 256-value super-blocks"):
        ggml_type_name("q4_k", (576, 576))
    assert ggml_type_name("int4:g32:sym", (576, 576)) == "q4_0"  # the same format under its plain name
    assert ggml_type_name(str(parse_format("q6_k")), (576, 1536)) == "q6_k"


def test_gguf_target_keeps_only_exportable_options():
    menu = parse_menu("q4_0,q4_k,q6_k,int3:g64:asym,fp16")
    narrow = group_choices(["a"], [(576, 576)], menu, [], "gguf")
    assert [c.option for c in narrow] == ["q4_0", "fp16"]
    wide = group_choices(["a"], [(576, 1536)], menu, [], "gguf")
    assert [c.option for c in wide] == ["q4_0", "q4_k", "q6_k", "fp16"]
    assert len(group_choices(["a"], [(576, 576)], menu, [], None)) == 5
    with pytest.raises(MenuError, match="cannot hold"):
        group_choices(["a"], [(576, 576)], menu, [parse_pin("a=int3:g64:asym")], "gguf")


# transformers reads every family GGUF export writes but gemma (v1) and mixtral (which it reads as a dense llama).
READABLE = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "qwen3_moe", "qwen2_moe"]


@pytest.fixture(scope="module")
def tiny_vocabulary(tmp_path_factory):
    """A GGUF holding only a 64-token tokenizer, the tiny models' vocabulary (the default one takes seconds to copy)."""
    from mixbits.models.tiny import tiny_vocabulary_gguf

    path = tmp_path_factory.mktemp("vocabulary") / "tokenizer.gguf"
    tiny_vocabulary_gguf(path)
    return path


def _exported_family(family, tmp_path, vocabulary, **settings):
    from mixbits.models.tiny import tiny_model

    model = tiny_model(family, **settings)
    report = mixbits.quantize(model, "q8_0", progress=False)
    save_quantized(model, report, tmp_path / "ckpt")
    return model, export_gguf(tmp_path / "ckpt", tmp_path / "model.gguf", tokenizer_gguf=vocabulary)


@pytest.mark.parametrize("family", READABLE)
def test_every_exportable_family_reads_back_in_transformers_as_the_quantized_model(family, tmp_path, tiny_vocabulary):
    """transformers' own GGUF reader (its name maps, its undoing of llama's row order and Gemma's 1 + w, its
    unstacking of experts) must rebuild the function mixbits computes with."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mistral's sliding window: llama.cpp attends over the whole context
        model, path = _exported_family(family, tmp_path, tiny_vocabulary)
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    allowed = {gguf.TENSOR_NAMES[kind] for kind in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]}
    for tensor in reader.tensors:  # every tensor is one llama.cpp's architecture knows
        assert tensor.name.rpartition(".")[0].replace("blk.0.", "blk.{bid}.").replace("blk.1.", "blk.{bid}.") in allowed
    fields = {key: field.contents() for key, field in reader.fields.items() if key.startswith(arch + ".")}
    config = model.config
    assert (fields[f"{arch}.block_count"], fields[f"{arch}.embedding_length"]) == (2, config.hidden_size)
    width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert fields[f"{arch}.attention.key_length"] == width
    assert fields[f"{arch}.attention.head_count_kv"] == config.num_key_value_heads
    if "moe" in family:
        assert (fields[f"{arch}.expert_count"], fields[f"{arch}.expert_used_count"]) == (4, 2)
        assert fields[f"{arch}.expert_feed_forward_length"] == config.moe_intermediate_size
    # transformers' reader does not take every setting back from a file (qwen3's head width, phi3's padding token,
    # gemma's query scalar, qwen2_moe's expert width): give it the model's config, so its tensors are what is checked.
    given = {"config": model.config} if family not in ("llama", "mistral", "qwen2") else {}
    reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                    **given).eval()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_exports_that_llama_cpp_would_compute_otherwise_are_refused(tmp_path, tiny_vocabulary):
    with pytest.raises(ExportError, match="query_pre_attn_scalar"):
        _exported_family("gemma2", tmp_path / "scale", tiny_vocabulary, query_pre_attn_scalar=256)
    with pytest.raises(ExportError, match="renormalises"):
        _exported_family("qwen3_moe", tmp_path / "routing", tiny_vocabulary, norm_topk_prob=False)
    from mixbits.models.tiny import tiny_model

    model = tiny_model("gemma")
    report = mixbits.quantize(model, "q8_0", head_format="q8_0", progress=False)
    save_quantized(model, report, tmp_path / "head")
    with pytest.raises(ExportError, match="quantize without it"):
        export_gguf(tmp_path / "head", tmp_path / "head.gguf", tokenizer_gguf=tiny_vocabulary)
    assert not (tmp_path / "head.gguf").exists()
    with pytest.warns(UserWarning, match="full attention"):
        _exported_family("mistral", tmp_path / "window", tiny_vocabulary)


def test_gemma_norms_are_written_as_one_plus_w_and_mixtral_experts_stacked(tmp_path, tiny_vocabulary):
    model, path = _exported_family("gemma", tmp_path / "gemma", tiny_vocabulary)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert "output.weight" not in tensors  # llama.cpp's gemma always computes the output with token_embd
    norm = model.model.layers[0].input_layernorm.weight.detach().numpy()
    assert np.array_equal(tensors["blk.0.attn_norm.weight"].data, norm + 1)

    model, path = _exported_family("mixtral", tmp_path / "mixtral", tiny_vocabulary)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    experts = model.model.layers[1].mlp.experts
    gate = gguf.quants.dequantize(tensors["blk.1.ffn_gate_exps.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    down = gguf.quants.dequantize(tensors["blk.1.ffn_down_exps.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    rows = experts.gate_up[0].weight.shape[0] // 2
    for e in range(experts.num_experts):
        assert np.array_equal(gate[e], experts.gate_up[e].weight.detach()[:rows].numpy())
        assert np.array_equal(down[e], experts.down[e].weight.detach().numpy())

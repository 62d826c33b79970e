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

"""compressed-tensors export: the compressed-tensors library reads the files back to mixbits' own weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mixbits.errors import ExportError
from mixbits.formats import parse_format
from mixbits.formats.storage import restore
from mixbits.io.checkpoint import QUANTIZED, layer_tensors, save_quantized
from mixbits.io.compressed_tensors import export_compressed_tensors

from test_checkpoint import quantized_copy


@pytest.mark.parametrize("fmt, act", [("int4:g32:sym", None), ("int4:g32:asym", None), ("int3:g64:asym", None),
                                      ("int8:ch:sym", None), ("int8:ch:sym", "int8:token"),
                                      ("int8:g32:asym", "int8:token"), ("int2:ch:asym:scale=bf16", None)])
def test_the_library_decompresses_the_export_to_mixbits_weights(tmp_path, fmt, act):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model, report = quantized_copy(fmt, activation=act)
    save_quantized(model, report, tmp_path / "ckpt")
    out = export_compressed_tensors(tmp_path / "ckpt", tmp_path / "ct")
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    tensors = load_file(str(out / "model.safetensors"))
    stored = load_file(str(tmp_path / "ckpt" / QUANTIZED))
    checked = 0
    for scheme in config.config_groups.values():
        assert scheme.format == ("int-quantized" if fmt.startswith("int8") and act else "pack-quantized")
        assert (scheme.input_activations is not None) == (act is not None)
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        for name in scheme.targets:
            state = {key[len(name) + 1:]: value for key, value in tensors.items() if key.startswith(name + ".")}
            layer = next(layer for layer in report.layers if layer.name == name)
            expected = restore(parse_format(fmt), layer.shape, layer_tensors(stored, name)).dequantize()
            assert torch.equal(expected, model.get_submodule(name).weight)  # the weights mixbits computes with
            weight = compressor.decompress(state, scheme)["weight"]  # in the scales' dtype, as vLLM would
            assert weight.dtype == state["weight_scale"].dtype and torch.equal(weight, expected.to(weight.dtype))
            exact = compressor.decompress({**state, "weight_scale": state["weight_scale"].float()}, scheme)["weight"]
            assert torch.equal(exact, expected)
            checked += 1
    assert checked == len(report.layers)
    assert torch.equal(tensors["model.embed_tokens.weight"].float(), model.model.embed_tokens.weight.half().float())


@pytest.mark.parametrize("fmt, act, message", [("q4_1", None, "integer codes with one"),
                                               ("int4:g32:sym", "int8:g32", "per-token int8")])
def test_what_compressed_tensors_cannot_hold_is_refused(tmp_path, fmt, act, message):
    model, report = quantized_copy(fmt, activation=act)
    save_quantized(model, report, tmp_path / "ckpt")
    with pytest.raises(ExportError, match=message):
        export_compressed_tensors(tmp_path / "ckpt", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()

"""Streaming: a model quantized block by block from its safetensors shards, never whole in memory, gives the
checkpoint the in-memory path gives, byte for byte, and resumes after an interruption."""

import importlib

import pytest
import torch

import mixbits
from checkpoint_contents import checkpoint_contents
from mixbits.io.checkpoint import load_quantized, save_quantized
from mixbits.models.loader import load_model
from mixbits.models.tiny import tiny_model
from mixbits.streaming import quantize_streamed

streaming_module = importlib.import_module("mixbits.streaming")
solve_block = streaming_module._quantize_block
CALIBRATION = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def sharded(request, tmp_path):
    """A four-block LLaMA saved in several safetensors shards."""
    path = tmp_path / "model"
    tiny_model("llama", num_hidden_layers=4, tie_word_embeddings=request.param).save_pretrained(
        path, max_shard_size="100KB")
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


@pytest.mark.parametrize("fmt, embedding, solver", [("int4:g32:asym", None, "gptq"), ("int3:g32:sym", "q8_0", "gptq"),
                                                    ("int3:g32:asym", None, "gptaq")])
def test_streamed_checkpoint_equals_the_in_memory_one(sharded, tmp_path, fmt, embedding, solver):
    loaded = load_model(sharded)
    report = mixbits.quantize(loaded, fmt, solver=solver, calibration=CALIBRATION, embedding_format=embedding,
                              progress=False)
    save_quantized(loaded, report, tmp_path / "memory")
    streamed, _ = quantize_streamed(sharded, tmp_path / "streamed", fmt, solver=solver, calibration=CALIBRATION,
                                    embedding_format=embedding, progress=False)
    assert streamed.bits == report.bits and streamed.model_bits == report.model_bits
    memory, stream = checkpoint_contents(tmp_path / "memory"), checkpoint_contents(tmp_path / "streamed")
    assert memory[0].keys() == stream[0].keys()
    for name in memory[0]:
        assert memory[0][name] == stream[0][name], f"{name} differs"
    assert memory[1] == stream[1]
    assert not (tmp_path / "streamed.partial").exists()
    tokens = CALIBRATION[:2, :12]
    with torch.no_grad():
        assert torch.allclose(load_quantized(tmp_path / "streamed").model(tokens).logits, loaded.model(tokens).logits,
                              atol=1e-4)


def test_an_interrupted_stream_resumes(sharded, tmp_path, monkeypatch):
    class Interrupted(Exception):
        pass

    solved = []

    def counting(index, *args):
        if len(solved) == 2:
            raise Interrupted
        solved.append(index)
        return solve_block(index, *args)

    monkeypatch.setattr(streaming_module, "_quantize_block", counting)
    with pytest.raises(Interrupted):
        quantize_streamed(sharded, tmp_path / "out", calibration=CALIBRATION, progress=False)
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial").exists()
    solved.clear()
    monkeypatch.setattr(streaming_module, "_quantize_block", lambda index, *a: solved.append(index) or solve_block(index, *a))
    quantize_streamed(sharded, tmp_path / "out", calibration=CALIBRATION, progress=False)
    assert solved == [2, 3]
    monkeypatch.setattr(streaming_module, "_quantize_block", solve_block)
    quantize_streamed(sharded, tmp_path / "whole", calibration=CALIBRATION, progress=False)
    assert checkpoint_contents(tmp_path / "out") == checkpoint_contents(tmp_path / "whole")


def test_a_shard_lacking_a_block_weight_is_refused(sharded, tmp_path):
    from safetensors.torch import load_file, save_file

    from mixbits.errors import ModelLoadError

    for shard in sharded.glob("*.safetensors"):
        tensors = load_file(shard)
        if "model.layers.2.mlp.down_proj.weight" in tensors:
            del tensors["model.layers.2.mlp.down_proj.weight"]
            save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="model.layers.2.mlp.down_proj.weight is in none"):
        quantize_streamed(sharded, tmp_path / "out", calibration=CALIBRATION, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_command_refuses_what_does_not_stream_in_one_line(sharded, tmp_path, capsys):
    from mixbits.cli import main

    for extra, message in ((["--awq", "--out", str(tmp_path / "a")], "--awq does not stream yet"),
                           ([], "give --out DIR"),
                           (["--bpw", "3", "--out", str(tmp_path / "b")], "--bpw/--size does not stream yet")):
        assert main(["quantize", "--model", str(sharded), "--stream", *extra]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and "\n" not in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

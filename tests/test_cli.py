"""Error paths of the command line: one line on stderr, exit status 2, nothing written."""

import subprocess
import sys

import pytest


def run(*args, env_cache=None, cwd=None):
    env = None
    if env_cache is not None:
        import os

        env = {**os.environ, "MIXBITS_CACHE": str(env_cache)}
    return subprocess.run([sys.executable, "-m", "mixbits", *args], capture_output=True, text=True, env=env, cwd=cwd)


def refused(capsys, *args) -> str:
    """main() in this process, as the command runs it: status 2, one line on stderr, nothing on stdout."""
    from mixbits.cli import main

    try:
        status = main(list(args))
    except SystemExit as exit:  # argparse's usage errors
        status = exit.code
    output = capsys.readouterr()
    assert status == 2, output.err
    assert output.out == "" and len(output.err.strip().splitlines()) == 1 and "Traceback" not in output.err
    return output.err


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("fmt, fragment", [
    ("int9:g64:asym", "1 to 8 bits"),
    ("int4:g0:asym", "group size must be 1 to 65536"),
    ("float4", "did you mean"),
])
def test_bad_format(fmt, fragment):
    assert_one_line_error(run("quantize", "--format", fmt), fragment)


def test_missing_model_path(tmp_path, capsys):
    assert "does not exist" in refused(capsys, "quantize", "--model", str(tmp_path / "missing"))
    assert "does not exist" in refused(capsys, "eval", "--model", str(tmp_path / "missing"))


def test_every_model_argument_is_checked_before_a_model_loads(tmp_path, capsys, monkeypatch):
    import mixbits.models

    def slow(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(mixbits.models, "load_model", slow)
    (tmp_path / "notes.txt").write_text("not a model")
    missing, text = str(tmp_path / "missing"), str(tmp_path / "notes.txt")
    assert "does not exist" in refused(capsys, "eval", "--reference", missing)
    assert "not a GGUF file" in refused(capsys, "eval", "--reference", text)
    assert "not a GGUF file" in refused(capsys, "quantize", "--model", text, "--no-eval")
    assert "does not exist" in refused(capsys, "plan", "--bpw", "3", "--out", str(tmp_path / "p.json"), "--model", missing)
    assert "does not exist" in refused(capsys, "generate", missing, "--prompt", "hello")
    assert "does not exist" in refused(capsys, "sweep", "--bpw", "3", "--out", str(tmp_path / "s"), "--model", missing)
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "s").exists()
    # A whole-model budget sets the embedding itself: a format for it too is refused before anything loads.
    assert "pin them instead" in refused(capsys, "quantize", "--size", "60MB", "--embedding-format", "q8_0", "--no-eval")


def test_corrupt_gguf_writes_nothing(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    cache = tmp_path / "cache"
    assert_one_line_error(run("quantize", "--model", str(bad), "--no-eval", env_cache=cache, cwd=tmp_path),
                          "is not a valid GGUF: the tensor count is 18446744073709551615")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"] or not any(cache.iterdir())


def test_missing_and_empty_text(tmp_path, capsys):
    assert "does not exist" in refused(capsys, "eval", "--text", str(tmp_path / "none.txt"))
    (tmp_path / "empty.txt").write_text("")
    assert "empty" in refused(capsys, "quantize", "--text", str(tmp_path / "empty.txt"))


def test_bad_window_count(capsys):
    assert "at least 1 window" in refused(capsys, "eval", "--windows", "0")


def test_usage_errors_are_one_line_too():
    assert_one_line_error(run("quantize", "--windows", "many"), "invalid int value")
    assert_one_line_error(run("frobnicate"), "invalid choice")


def test_debug_shows_the_traceback():
    result = run("quantize", "--format", "int9:g64:asym", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_help_everywhere(capsys):
    from mixbits.cli import main

    for command in ([], ["quantize"], ["eval"], ["plan"], ["sweep"], ["generate"], ["export"], ["formats"]):
        with pytest.raises(SystemExit) as exit:
            main([*command, "--help"])
        assert exit.value.code == 0 and "usage: mixbits" in capsys.readouterr().out
    result = run("--help")  # and the installed command
    assert result.returncode == 0 and "usage: mixbits" in result.stdout


def test_too_short_text_states_what_is_needed(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("Only a few words here.")
    message = refused(capsys, "eval", "--text", str(tmp_path / "short.txt"), "--windows", "2", "--window-len", "64")
    assert "need 256" in message and "give more text" in message


def test_formats_lists_exact_bits_as_json():
    import json

    result = run("formats", "--group", "32", "--shape", "1536x576", "--json")
    assert result.returncode == 0, result.stderr
    listing = {entry["format"]: entry for entry in json.loads(result.stdout)["formats"]}
    assert listing["mxfp4"]["bits"] == 1536 * 576 * 4 + 1536 * 18 * 8
    assert listing["int4:g32:asym"]["bits_per_weight"] == 4 + 20 / 32
    assert {"nvfp4", "nf4:g32", "lut4:g32", "ternary:g32", "fp8_e5m2:g32", "mxint8"} <= set(listing)


def test_formats_rejects_a_bad_shape():
    assert_one_line_error(run("formats", "--shape", "wide"), "--shape must look like")


def test_calibration_errors_state_what_is_needed(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("Only a few words here.")
    message = refused(capsys, "quantize", "--solver", "gptq", "--calib-text", str(tmp_path / "short.txt"),
                      "--calib-windows", "2", "--calib-window-len", "64", "--no-eval")
    assert "calibration windows" in message and "need at least 256" in message
    assert "at least 1 window" in refused(capsys, "quantize", "--solver", "gptq", "--calib-windows", "0", "--no-eval")
    assert "add rotate" in refused(capsys, "quantize", "--online-hadamard", "--no-eval")
    assert "invalid choice" in refused(capsys, "quantize", "--solver", "awq")


def test_plan_arguments_are_checked_before_loading(tmp_path, capsys):
    out = str(tmp_path / "p.json")
    assert "one of the arguments --bpw --size is required" in refused(capsys, "plan", "--out", out)
    assert "1 to 8 bits" in refused(capsys, "plan", "--bpw", "3", "--options", "int9:g64:asym", "--out", out)
    assert "write it like 60MB" in refused(capsys, "plan", "--size", "sixty", "--out", out)
    assert "PATTERN=OPTION" in refused(capsys, "plan", "--bpw", "3", "--pin", "*.v_proj", "--out", out)
    message = refused(capsys, "quantize", "--plan", str(tmp_path / "none.json"))
    assert "does not exist" in message and "mixbits plan" in message
    assert "either --plan or a budget" in refused(capsys, "quantize", "--plan", str(tmp_path / "none.json"), "--bpw", "3")
    assert "START:STOP:STEP" in refused(capsys, "sweep", "--bpw", "4:2:0.5", "--out", str(tmp_path / "s"))
    missing = str(tmp_path / "no-folder" / "sensitivity.json")
    assert "create it first" in refused(capsys, "plan", "--bpw", "3", "--out", out, "--sensitivity", missing)
    assert "--shrink and --asymmetry from 0 to 1" in refused(capsys, "plan", "--bpw", "3", "--out", out, "--shrink", "1.5")
    assert "--asymmetry from 0 to 1" in refused(capsys, "quantize", "--solver", "gptaq", "--asymmetry", "2")
    assert not (tmp_path / "no-folder").exists() and not (tmp_path / "p.json").exists()
    assert not list(tmp_path.iterdir())


@pytest.mark.model
def test_an_infeasible_budget_names_what_is_achievable(tmp_path, capsys):
    message = refused(capsys, "plan", "--bpw", "2.0", "--options", "int2:g64:asym,int4:g64:asym",
                      "--out", str(tmp_path / "p.json"))
    assert "below the smallest achievable (2.2812 bits per weight" in message and "largest useful is 4.3125" in message
    assert "matches no layer" in refused(capsys, "plan", "--bpw", "3", "--pin", "*.vproj=fp16",
                                         "--out", str(tmp_path / "p.json"))
    assert not list(tmp_path.iterdir())


@pytest.mark.model
def test_quantize_to_a_budget_writes_the_plan_it_applied(tmp_path):
    import json

    from mixbits.sensitivity import Sensitivity
    from mixbits.menu import parse_choice
    from mixbits.plan import Plan

    plan_path = tmp_path / "plan.json"
    result = run("quantize", "--bpw", "3.0", "--options", "int2:g64:asym@rtn,int4:g64:asym@rtn", "--damage", "proxy",
                 "--pin", "model.layers.0.mlp.down_proj=int4:g64:asym@rtn",
                 "--calib-windows", "4", "--calib-window-len", "128",
                 "--fisher-windows", "1", "--windows", "2", "--window-len", "128", "--json", "--no-clip-search",
                 "--save-plan", str(plan_path), "--sensitivity", str(tmp_path / "sensitivity.json"))
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    plan = Plan.load(plan_path)
    quantization = record["quantization"]
    assert quantization["bits"] == plan.bits <= int(3.0 * plan.weights)
    assert 2.9 < quantization["bits_per_weight"] <= 3.0
    assert set(quantization["options"]) == {"int2:g64:asym@rtn", "int4:g64:asym@rtn"}
    assert next(l for l in plan.layers if l.name == "model.layers.0.mlp.down_proj").option == "int4:g64:asym"
    assert record["plan"]["totals"]["bits"] == plan.bits and record["plan"]["damage"] == "proxy"
    assert Sensitivity.load(tmp_path / "sensitivity.json").kl_windows is None  # proxy only: no KL measured
    # Reusing those measurements under other calibration or GPTQ settings would allocate on the wrong damage.
    for other in (["--shrink", "0.5"], ["--calib-windows", "8"]):
        again = run("plan", "--bpw", "3.0", "--options", "int2:g64:asym@rtn,int4:g64:asym@rtn", "--damage", "proxy",
                    "--calib-windows", "4", "--calib-window-len", "128", *other, "--out", str(tmp_path / "p.json"),
                    "--sensitivity", str(tmp_path / "sensitivity.json"))
        assert again.returncode == 2 and "measure again" in again.stderr and not (tmp_path / "p.json").exists()
    # Measured without the clip search, the file is refused to a plan that would measure with it.
    clipped = run("plan", "--bpw", "3.0", "--options", "int2:g64:asym@rtn,int4:g64:asym@rtn", "--damage", "proxy",
                  "--calib-windows", "4", "--calib-window-len", "128", "--out", str(tmp_path / "p.json"),
                  "--sensitivity", str(tmp_path / "sensitivity.json"))
    assert clipped.returncode == 2 and "clip search" in clipped.stderr and not (tmp_path / "p.json").exists()
    # An option the file lacks is measured alone and added; the plan then chooses from the whole menu.
    wider = run("quantize", "--bpw", "3.0", "--options", "int2:g64:asym@rtn,int3:g64:asym@rtn,int4:g64:asym@rtn",
                "--damage", "proxy", "--pin", "model.layers.0.mlp.down_proj=int4:g64:asym@rtn",
                "--calib-windows", "4", "--calib-window-len", "128", "--fisher-windows", "1", "--no-clip-search",
                "--no-eval", "--save-plan", str(tmp_path / "p.json"), "--sensitivity", str(tmp_path / "sensitivity.json"))
    assert wider.returncode == 0, wider.stderr
    assert "measuring int3:g64:asym@rtn, missing from" in wider.stderr
    extended = Sensitivity.load(tmp_path / "sensitivity.json")
    assert all(g.find(parse_choice("int3:g64:asym@rtn")) is not None for g in extended.groups)
    assert "int3:g64:asym" in {layer.option for layer in Plan.load(tmp_path / "p.json").layers}


def test_checkpoint_commands_refuse_bad_input(tmp_path, tiny_llama_dir, capsys):
    """In this process (main() as the command runs it): one line on stderr, status 2, nothing written."""
    from mixbits.cli import main

    checkpoint = tmp_path / "ckpt"
    assert main(["quantize", "--model", str(tiny_llama_dir), "--format", "int4:g16:asym", "--no-eval", "--out", str(checkpoint)]) == 0
    assert "checkpoint:" in capsys.readouterr().out
    # A format without a GGML type: nothing written, the nearest type named.
    message = refused(capsys, "export", str(checkpoint), "--out", str(tmp_path / "m.gguf"))
    assert "no GGML type" in message and "nearest is q4_1" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tiny-llama"]
    assert "has no tokenizer" in refused(capsys, "generate", str(tiny_llama_dir), "--prompt", "hi")
    notes = tmp_path / "tiny-llama"  # an existing directory that is not a checkpoint
    assert "not a mixbits checkpoint" in refused(capsys, "quantize", "--model", str(tiny_llama_dir), "--no-eval", "--out", str(notes))
    data = bytearray((checkpoint / "quantized.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (checkpoint / "quantized.safetensors").write_bytes(bytes(data))
    assert "does not match its sha256" in refused(capsys, "eval", str(checkpoint))
    # And the installed command behaves the same.
    assert_one_line_error(run("generate", str(checkpoint), "--prompt", "hi"), "does not match its sha256")


@pytest.mark.model
def test_gguf_round_trip_on_the_default_model(tmp_path, capsys):
    """quantize --out, eval DIR, generate DIR, export: the CLI in this process (each command loads its input anew)."""
    import json

    import gguf
    import numpy as np

    from mixbits.cli import main

    checkpoint, path = tmp_path / "ckpt", tmp_path / "model.gguf"
    assert main(["quantize", "--format", "q4_0", "--head-format", "q8_0", "--embedding-format", "q8_0", "--target", "gguf",
                 "--no-eval", "--no-clip-search", "--out", str(checkpoint)]) == 0
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--text", "pydoc", "--windows", "2", "--window-len", "128", "--json"]) == 0
    domains = json.loads(capsys.readouterr().out)["evaluation"]["domains"]
    assert [d["name"] for d in domains] == ["pydoc"] and 10 < domains[0]["perplexity"] < 30  # fp32: about 13 here
    assert not domains[0]["in_calibration_mix"]  # round to nearest saw no text, so pydoc is not "seen"
    assert main(["generate", str(checkpoint), "--prompt", "The capital of France is", "-n", "12"]) == 0
    output = capsys.readouterr()
    assert output.out.startswith("The capital of France is") and "tokens/s" in output.err
    assert "mixbits decoder" in output.err
    assert main(["generate", str(checkpoint), "--prompt", "The capital of France is", "-n", "12", "--transformers"]) == 0
    reference = capsys.readouterr()
    assert "transformers generate" in reference.err and reference.out == output.out  # the same greedy tokens
    assert main(["export", str(checkpoint), "--out", str(path)]) == 0
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert len(types) == 1 + 1 + 1 + 30 * 9  # embedding, head, final norm, 30 blocks of 7 matrices and 2 norms
    assert types["output.weight"] == "Q8_0" and types["blk.29.ffn_down.weight"] == "Q4_0"
    # The embedding is written from its Q8_0 codes: llama.cpp reads the rows mixbits looks up.
    import torch

    import mixbits

    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert types["token_embd.weight"] == "Q8_0"
    expected = mixbits.load_model(checkpoint).model.model.embed_tokens(torch.arange(49152))
    assert np.array_equal(gguf.quants.dequantize(embedding.data, embedding.tensor_type).reshape(expected.shape),
                          expected.numpy())
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"  # copied from the source GGUF
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    capsys.readouterr()
    assert main(["quantize", "--format", "int4:g64:asym", "--target", "gguf", "--no-eval"]) == 2
    assert "no GGML type; the nearest is q4_1" in capsys.readouterr().err


def test_eval_counts_as_seen_only_what_a_checkpoint_was_calibrated_on(tmp_path, tiny_llama_dir):
    """The seen domains of `mixbits eval CHECKPOINT` come from the checkpoint's record, not from the defaults."""
    import torch

    import mixbits
    from mixbits.cli import _checkpoint_calibration
    from mixbits.io.checkpoint import save_quantized
    from mixbits.models import load_model

    loaded = load_model(str(tiny_llama_dir))
    report = mixbits.quantize(loaded, "int4:g16:asym")
    save_quantized(loaded, report, tmp_path / "rtn")
    assert _checkpoint_calibration(str(tmp_path / "rtn")) == {"calibrated_on": ()}  # no data: nothing seen
    loaded = load_model(str(tiny_llama_dir))
    windows = torch.randint(0, 64, (2, 16))
    report = mixbits.quantize(loaded, "int4:g16:asym", solver="gptq", calibration=windows)
    save_quantized(loaded, report, tmp_path / "ids")
    assert _checkpoint_calibration(str(tmp_path / "ids")) == {}  # unknown token ids: the default, the mix counts as seen
    assert _checkpoint_calibration(str(tiny_llama_dir)) == {}  # not a mixbits checkpoint


def test_damaged_plan_sensitivity_and_checkpoint_files_are_refused_in_one_line(tmp_path, capsys):
    """The commands that read a plan, a sensitivity file or a checkpoint stop at a damaged one: exit status 2, one
    line, nothing written."""
    import json

    from mixbits.fuzz import checkpoint_target
    from mixbits.models.tiny import tiny_model

    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"mixbits_plan": 1, "layers": [{"name": "model.layers.0.mlp.up_proj", "option": "q4_0",
                                                               "shape": [96, "64"]}]}))
    out = tmp_path / "out"
    checkpoint_target(tmp_path)
    capsys.readouterr()  # the setup's own progress bars
    message = refused(capsys, "quantize", "--model", str(model_dir), "--plan", str(plan), "--out", str(out), "--no-eval")
    assert "the plan.layers[0].shape[1] must be an integer" in message
    sensitivity = tmp_path / "sensitivity.json"
    sensitivity.write_bytes(b'{"mixbits_sensitivity": 1, "groups": [{"name": "\xff"}]}')
    message = refused(capsys, "plan", "--model", str(model_dir), "--bpw", "3", "--sensitivity", str(sensitivity),
                      "--out", str(tmp_path / "p.json"))
    assert "UnicodeDecodeError" in message
    import hashlib

    info = tmp_path / "checkpoint" / "mixbits.json"
    info.write_text(json.dumps({"mixbits_checkpoint": 3, "layers": "all", "tied": {}}))
    manifest = json.loads((tmp_path / "checkpoint" / "manifest.json").read_text())
    manifest["files"]["mixbits.json"] = {"bytes": info.stat().st_size,
                                         "sha256": hashlib.sha256(info.read_bytes()).hexdigest()}
    (tmp_path / "checkpoint" / "manifest.json").write_text(json.dumps(manifest))  # the edit gets past the hashes
    assert "mixbits.json.layers must be a list" in refused(capsys, "generate", "--model", str(tmp_path / "checkpoint"),
                                                           "--prompt", "x", "--max-new-tokens", "1")
    assert not out.exists() and not (tmp_path / "p.json").exists()

"""Resume: a quantization or a measurement interrupted after k steps, run again with the same settings, gives what an
uninterrupted run gives (checkpoints compared byte for byte), computing only the steps that were not finished."""

import importlib

import pytest
import torch

import mixbits
from checkpoint_contents import checkpoint_contents
from mixbits.io.checkpoint import save_quantized
from mixbits.models.structure import quantizable_linears
from mixbits.models.tiny import tiny_model
from mixbits.plan import KEEP, LayerPlan, Plan

# the modules, which the package's functions of the same names hide
quantize_module = importlib.import_module("mixbits.quantize")
measure_module = importlib.import_module("mixbits.measure")
damage_module = importlib.import_module("mixbits.damage")
solve_block = quantize_module._quantize_block  # before any test wraps it

BLOCKS = 4
CALIBRATION = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))


class Interrupted(Exception):
    """Stands for the Ctrl-C (or the machine going down) a run is cut short by."""  # of the run that wrote the checkpoint, not of the checkpoint


def model():
    return tiny_model("llama", num_hidden_layers=BLOCKS, tie_word_embeddings=True)


def mixed_plan(module) -> Plan:
    options = ["int4:g32:asym", "int3:g32:sym", KEEP, "q8_0", "nf4:g32"]
    layers = [LayerPlan(name, name, options[i % len(options)], "gptq", tuple(linear.weight.shape))
              for i, (name, linear) in enumerate(quantizable_linears(module))]
    return Plan(layers)


SETTINGS = {
    "gptq": {"format": "int4:g32:asym", "solver": "gptq"},
    "awq": {"format": "int3:g32:asym", "solver": "gptq", "awq": True},  # AWQ also rescales each block's norms
    "rotate": {"format": "int4:g32:sym", "solver": "gptq", "rotate": True},
    "plan": {"plan": mixed_plan},
}


def run(tmp_path, name, settings, resume=None, stop_after=None, monkeypatch=None):
    """Quantize a fresh model, optionally interrupted (Interrupted) once `stop_after` blocks are solved;
    save the checkpoint to tmp_path/name. Returns the number of blocks solved."""
    module = model()
    options = dict(settings)
    if callable(options.get("plan")):
        options["plan"] = options["plan"](module)
    solved = []

    def counting(index, *args):
        if stop_after is not None and len(solved) == stop_after:
            raise Interrupted
        solved.append(index)
        return solve_block(index, *args)

    monkeypatch.setattr(quantize_module, "_quantize_block", counting)
    report = mixbits.quantize(module, calibration=CALIBRATION, resume=resume, progress=False, **options)
    save_quantized(module, report, tmp_path / name)
    return solved


@pytest.mark.parametrize("kind", SETTINGS)
def test_an_interrupted_quantization_resumes_to_the_same_checkpoint(tmp_path, kind, monkeypatch):
    settings = SETTINGS[kind]
    assert run(tmp_path, "whole", settings, monkeypatch=monkeypatch) == list(range(BLOCKS))
    state = tmp_path / "state"
    with pytest.raises(Interrupted):
        run(tmp_path, "never", settings, resume=state, stop_after=2, monkeypatch=monkeypatch)
    assert not (tmp_path / "never").exists()
    assert run(tmp_path, "resumed", settings, resume=state, monkeypatch=monkeypatch) == [2, 3]  # 0, 1 were kept
    whole, resumed = checkpoint_contents(tmp_path / "whole"), checkpoint_contents(tmp_path / "resumed")
    assert whole[0].keys() == resumed[0].keys()
    for name in whole[0]:
        assert whole[0][name] == resumed[0][name], f"{name} differs"
    assert whole[1] == resumed[1]


def test_other_settings_do_not_reuse_kept_blocks(tmp_path, monkeypatch):
    state = tmp_path / "state"
    with pytest.raises(Interrupted):
        run(tmp_path, "never", SETTINGS["gptq"], resume=state, stop_after=2, monkeypatch=monkeypatch)
    other = {**SETTINGS["gptq"], "format": "int3:g32:asym"}
    assert run(tmp_path, "other", other, resume=state, monkeypatch=monkeypatch) == list(range(BLOCKS))


def test_a_damaged_kept_block_is_solved_again(tmp_path, monkeypatch):
    state = tmp_path / "state"
    with pytest.raises(Interrupted):
        run(tmp_path, "never", SETTINGS["gptq"], resume=state, stop_after=2, monkeypatch=monkeypatch)
    (kept,) = state.glob("*/block-0001.safetensors")
    kept.write_bytes(kept.read_bytes()[:-100])  # truncated
    assert run(tmp_path, "resumed", SETTINGS["gptq"], resume=state, monkeypatch=monkeypatch) == [1, 2, 3]
    run(tmp_path, "whole", SETTINGS["gptq"], monkeypatch=monkeypatch)
    assert checkpoint_contents(tmp_path / "whole") == checkpoint_contents(tmp_path / "resumed")


def test_an_interrupted_measurement_resumes_to_the_same_damages(tmp_path, monkeypatch):
    menu = mixbits.parse_menu(["int4:g32:asym", "int3:g32:sym", "int2:g32:asym@rtn"], "gptq")
    measure = measure_module.measure

    def measured(resume=None):
        return measure(model(), menu, calibration=CALIBRATION, kl_windows=2, kl_len=16, resume=resume, progress=False)

    def damages(sensitivity):
        return [(g.name, [(o.option, o.solver, o.bits, o.proxy, o.output_error, o.kl) for o in g.options])
                for g in sensitivity.groups]

    whole = measured()
    groups = len(whole.groups)
    state = tmp_path / "state"
    calls = []
    original = damage_module.solve_options
    solvers = len({choice.solver for choice in menu})  # a group solves its options once per solver

    def interrupting(*args, **kwargs):
        if len(calls) == 5 * solvers:  # five groups measured
            raise Interrupted
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(damage_module, "solve_options", interrupting)
    with pytest.raises(Interrupted):
        measured(state)
    calls.clear()
    monkeypatch.setattr(damage_module, "solve_options", lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed = measured(state)
    assert len(calls) == (groups - 5) * solvers
    assert damages(resumed) == damages(whole)

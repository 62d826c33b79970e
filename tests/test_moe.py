"""Mixture-of-experts: stacked experts become per-expert Linears, calibrated on their routed tokens, all quantized."""

import pytest
import torch

import mixbits
from mixbits.calibrate import calibration_stats
from mixbits.io.checkpoint import load_quantized, save_quantized
from mixbits.models.registry import adapter_for
from mixbits.models.moe import ExpertLinears
from mixbits.models.tiny import MOE_FAMILIES, tiny_model
from mixbits.plan import option_bits
from mixbits.runtime.decode import Decoder

IDS = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(5))
CALIBRATION = torch.randint(0, 64, (6, 24), generator=torch.Generator().manual_seed(6))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_split_experts_compute_what_the_stacked_ones_did(family):
    model = tiny_model(family)
    before = logits(model)
    adapter_for(model).prepare(model)
    assert all(isinstance(block.mlp.experts, ExpertLinears) for block in model.model.layers)
    assert torch.allclose(logits(model), before, atol=1e-6)


def routed_counts(model, windows):
    """Tokens the router sends to each expert of each block, from transformers' own forward (no mixbits code)."""
    counts = {}
    for index, block in enumerate(model.model.layers):
        def keep(module, args, output, index=index):
            _, _, chosen = output
            counts[index] = torch.bincount(chosen.reshape(-1), minlength=4)
        block.mlp.gate.register_forward_hook(keep)
    with torch.no_grad():
        model(windows)
    return counts


def test_each_expert_is_calibrated_on_the_tokens_routed_to_it():
    model = tiny_model("qwen3_moe")
    expected = routed_counts(tiny_model("qwen3_moe"), CALIBRATION)
    adapter_for(model).prepare(model)  # as load_model and quantize do
    stats = calibration_stats(model, CALIBRATION)
    for block in range(2):
        for expert in range(4):
            name = f"model.layers.{block}.mlp.experts.gate_up.{expert}"
            assert stats[name].tokens == expected[block][expert], name
        assert stats[f"model.layers.{block}.self_attn.q_proj"].tokens == 6 * 24


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_expert_is_quantized_counted_saved_and_run_from_codes(tmp_path, family):
    model = tiny_model(family)
    awq = family == "qwen2_moe"  # one scale through the norm for the router, every expert and the shared one
    report = mixbits.quantize(model, "int4:g16:asym", solver="gptq", awq=awq, calibration=CALIBRATION, progress=False)
    assert len(report.scaled) == (2 * 2 if awq else 0)  # per block: the attention's input and the MLP's
    names = [layer.name for layer in report.layers]
    experts = [n for n in names if ".experts." in n]
    assert len(experts) == 2 * 4 * 2  # blocks x experts x (gate_up, down)
    expected_bits = sum(option_bits("int4:g16:asym", *m.weight.shape) for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert report.bits == expected_bits
    save_quantized(model, report, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt").model
    assert torch.allclose(logits(loaded), logits(model), atol=1e-4, rtol=1e-4)
    assert not any(type(m) is torch.nn.Linear for n, m in loaded.named_modules() if ".experts." in n)
    ids = IDS
    for _ in range(8):  # greedy by transformers' forward of the loaded model, step by step
        ids = torch.cat([ids, logits(loaded, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(Decoder(loaded).generate(IDS[0], 8), ids[0])  # the fast decoder, experts from codes


def test_an_expert_the_router_never_chooses_is_rounded_and_named():
    model = tiny_model("qwen3_moe", num_experts_per_tok=1)
    with torch.no_grad():  # expert 1 and 3 lose to 0 or 2 whatever the token
        direction = torch.randn(64)
        for block in model.model.layers:
            block.mlp.gate.weight.copy_(torch.stack([100 * direction, 50 * direction, -100 * direction, 0 * direction]))
    with pytest.warns(UserWarning, match=r"rounded to nearest instead: model\.layers\.0\.mlp\.experts\.gate_up\.1"):
        report = mixbits.quantize(model, "int4:g16:asym", solver="gptq", calibration=CALIBRATION, progress=False)
    rounded = set(report.rounded_for_lack_of_tokens)
    assert rounded == {f"model.layers.{b}.mlp.experts.{p}.{e}" for b in (0, 1) for p in ("gate_up", "down") for e in (1, 3)}
    solvers = {layer.name: layer.solver for layer in report.layers}
    assert all(solvers[name] == "rtn" for name in rounded) and solvers["model.layers.0.mlp.experts.gate_up.0"] == "gptq"

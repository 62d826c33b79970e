"""Block-sequential calibration statistics against a direct computation."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mixbits.calibrate import SequentialCalibration, calibration_stats
from mixbits.models.structure import quantizable_linears


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def direct_inputs(model, windows):
    """Every Linear's input over a plain forward of all windows at once, as [tokens, C]."""
    seen = {}

    def keep(name):
        def hook(module, args):
            seen[name] = args[0].reshape(-1, args[0].shape[-1])
        return hook

    handles = [linear.register_forward_pre_hook(keep(name)) for name, linear in quantizable_linears(model)]
    with torch.no_grad():
        model(windows)
    for handle in handles:
        handle.remove()
    return seen


def windows(count=11, length=12):  # 11 windows: batches of 8 and 3
    return torch.randint(0, 64, (count, length), generator=torch.Generator().manual_seed(1))


def test_statistics_equal_a_direct_computation(tiny):
    batch = windows()
    stats = calibration_stats(tiny, batch)
    inputs = direct_inputs(tiny, batch)
    assert set(stats) == set(inputs) and len(stats) == 3 * 7
    for name, x in inputs.items():
        x = x.double()
        assert stats[name].tokens == 11 * 12
        assert torch.allclose(stats[name].hessian.double(), x.T @ x / len(x), rtol=1e-5, atol=1e-7), name
        assert torch.allclose(stats[name].abs_mean.double(), x.abs().mean(0), rtol=1e-5, atol=1e-7)
        assert torch.allclose(stats[name].abs_max.double(), x.abs().amax(0), rtol=1e-6)


def test_stages_follow_shared_inputs(tiny):
    block = next(iter(SequentialCalibration(tiny, windows())))
    assert [[name.rsplit(".", 1)[1] for name in stage.names] for stage in block.stages()] == [
        ["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_later_blocks_see_the_modified_earlier_blocks(tiny):
    """Inputs of block i+1 are the outputs of block i as changed by the caller (as after quantizing it)."""
    batch = windows()
    collected = {}
    for index, block in enumerate(SequentialCalibration(tiny, batch)):
        for stage in block.stages():
            stats = block.stats(stage.linears)
            for name, linear in zip(stage.names, stage.linears):
                collected[name] = stats[linear]
                with torch.no_grad():
                    linear.weight.mul_(0.5).add_(0.01)  # any change, made stage by stage
    # Stage by stage: each stage saw the earlier stages of its own block already changed.
    inputs = direct_inputs(tiny, batch)
    for name, x in inputs.items():
        x = x.double()
        assert torch.allclose(collected[name].hessian.double(), x.T @ x / len(x), rtol=1e-4, atol=1e-6), name


def block_inputs_of_a_direct_forward(model, windows):
    """Each block's hidden-state input over a plain forward of all windows at once."""
    from mixbits.models.structure import transformer_blocks

    seen = []
    _, blocks = transformer_blocks(model)
    handles = [b.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True) for b in blocks]
    with torch.no_grad():
        model(windows, use_cache=False)
    for handle in handles:
        handle.remove()
    return seen


def test_each_block_gets_its_own_mask_and_rotary():
    """Sliding-window and global layers alternate (Gemma 3) with windows four times the sliding window:
    block by block, every block's inputs equal transformers' own forward."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"] * 2)
    model = Gemma3ForCausalLM(config).eval()
    batch = windows(count=3, length=16)
    expected = block_inputs_of_a_direct_forward(model, batch)
    sequence = SequentialCalibration(model, batch)
    got = [block.inputs.clone() for block in sequence] + [sequence.outputs]
    for index, (a, b) in enumerate(zip(got[1:], expected[1:])):
        assert torch.allclose(a, b, atol=1e-5), f"inputs of block {index + 1}"

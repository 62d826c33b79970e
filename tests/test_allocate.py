"""The knapsack allocator against brute force."""

import itertools
import random

import pytest

from mixbits.allocate import BudgetError, Option, allocate, quiet_stdout


def brute_force(groups, budget):
    best = None
    for combo in itertools.product(*groups.values()):
        bits = sum(o.bits for o in combo)
        if bits <= budget:
            damage = sum(o.damage for o in combo)
            if best is None or damage < best:
                best = damage
    return best


def random_instance(rng, groups=5, options=4, scale=1):
    instance = {}
    for g in range(groups):
        sizes = sorted(rng.sample(range(1, 60), options))
        # Damage falls with bits, unevenly per group, as in real layers.
        weight = rng.uniform(0.1, 10)
        instance[f"g{g}"] = [Option(f"o{i}", s * scale, weight * 2.0 ** -s / 4 + rng.uniform(0, 1e-3)) for i, s in enumerate(sizes)]
    return instance


@pytest.mark.parametrize("seed", range(25))
def test_optimum_equals_brute_force(seed):
    rng = random.Random(seed)
    instance = random_instance(rng)
    smallest = sum(min(o.bits for o in v) for v in instance.values())
    largest = sum(max(o.bits for o in v) for v in instance.values())
    budget = rng.randint(smallest, largest)
    chosen = allocate(instance, budget)
    assert set(chosen) == set(instance)
    assert all(chosen[g] in instance[g] for g in instance)
    assert sum(o.bits for o in chosen.values()) <= budget
    assert sum(o.damage for o in chosen.values()) == pytest.approx(brute_force(instance, budget), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_budget_is_met_to_the_bit_at_model_scale(seed):
    """Bits in the hundreds of millions: the float solver's tolerance must not let the total overshoot."""
    rng = random.Random(100 + seed)
    instance = random_instance(rng, groups=6, options=3, scale=10_000_019)
    smallest = sum(min(o.bits for o in v) for v in instance.values())
    largest = sum(max(o.bits for o in v) for v in instance.values())
    budget = rng.randint(smallest, largest)
    chosen = allocate(instance, budget)
    assert sum(o.bits for o in chosen.values()) <= budget
    assert sum(o.damage for o in chosen.values()) == pytest.approx(brute_force(instance, budget), rel=1e-9, abs=1e-12)


def test_exact_budget_boundaries():
    instance = {"a": [Option("small", 2, 5.0), Option("big", 4, 1.0)], "b": [Option("small", 3, 7.0), Option("big", 6, 2.0)]}
    assert {g: o.name for g, o in allocate(instance, 5).items()} == {"a": "small", "b": "small"}
    assert {g: o.name for g, o in allocate(instance, 7).items()} == {"a": "big", "b": "small"}
    assert {g: o.name for g, o in allocate(instance, 8).items()} == {"a": "small", "b": "big"}
    assert {g: o.name for g, o in allocate(instance, 10).items()} == {"a": "big", "b": "big"}
    with pytest.raises(BudgetError, match=r"below the smallest achievable 5 bits \(largest useful: 10\)"):
        allocate(instance, 4)


def test_solver_output_on_descriptor_1_is_silenced_and_stdout_restored(capfd):
    """HiGHS prints from C to descriptor 1; inside quiet_stdout such writes vanish, and stdout works after."""
    import os

    print("before", flush=True)
    with quiet_stdout():
        os.write(1, b"from C\n")
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "before\nafter\n"

"""Sensitivity on Ray: two local workers measure what one process measures."""

import pytest
import torch

import mixbits
from mixbits.distributed import Cluster
from mixbits.errors import MixbitsError
from mixbits.models.tiny import tiny_model

CALIBRATION = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))


def measured(**options):
    menu = mixbits.parse_menu(["int4:g32:asym", "int3:g32:sym", "int2:g32:asym@rtn", "fp16"], "gptq")
    model = tiny_model("llama", num_hidden_layers=3, tie_word_embeddings=True)
    return mixbits.measure(model, menu, calibration=CALIBRATION, kl_windows=2, kl_len=16, outer=True, progress=False,
                           **options)


def test_two_ray_workers_measure_what_one_process_measures(tmp_path):
    local = measured()
    spread = measured(cluster=Cluster(workers=2), resume=tmp_path / "state")
    assert [g.name for g in spread.groups + spread.outer] == [g.name for g in local.groups + local.outer]
    for mine, theirs in zip(local.groups + local.outer, spread.groups + spread.outer):
        assert [(o.option, o.solver, o.bits) for o in mine.options] == [(o.option, o.solver, o.bits) for o in theirs.options]
        for a, b in zip(mine.options, theirs.options):
            # the workers' matrix products run on one thread each: float sums may differ in their last bits
            assert b.proxy == pytest.approx(a.proxy, rel=1e-5, abs=1e-12), mine.name
            assert b.output_error == pytest.approx(a.output_error, rel=1e-5, abs=1e-12), mine.name
            assert b.kl == pytest.approx(a.kl, rel=1e-4, abs=1e-9), mine.name
    assert len(list((tmp_path / "state").glob("*/group-*.safetensors"))) == len(local.groups) + len(local.outer)


def test_an_unreachable_cluster_is_one_line():
    with pytest.raises(MixbitsError, match="could not connect to Ray at 127.0.0.1:1"):
        measured(cluster=Cluster(address="127.0.0.1:1"))


def test_no_workers_is_refused():
    with pytest.raises(MixbitsError, match="at least 1"):
        Cluster(workers=0)

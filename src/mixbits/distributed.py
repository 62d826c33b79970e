"""Sensitivity measurement spread over Ray workers.

Measuring a group under each option needs only the float model, the
group's statistics and the KL windows, and changes nothing another group
sees, so the (group, options) jobs are independent. The driver takes the
statistics (one pass), then hands the groups to workers: Ray actors that
each hold the model and a KL meter of their own and take the next group as
they finish one. Each worker runs the same code as a local measurement
(`damage.GroupMeter`), so the results are the local ones; only the
threads each worker's matrix products use differ, which can change float
sums in their last bits.

    Cluster(workers=2)           # a Ray cluster started on this machine, two workers
    Cluster(address="ray://head:10001")  # an existing cluster; one worker per CPU it has

On a cluster of several machines, every node needs the same mixbits
installed (`pip install mixbits[ray]`), or pass `runtime_env`; the model
and the statistics travel through Ray's object store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .errors import MixbitsError


@dataclass
class Cluster:
    address: str | None = None  # None: start a local Ray cluster
    workers: int | None = None  # None: one per CPU of the cluster
    runtime_env: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise MixbitsError(f"--workers must be at least 1, got {self.workers}")


def _check_reachable(address: str) -> None:
    """Ray retries an address that does not answer for minutes; a host:port that refuses a connection is an error now."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise MixbitsError(f"could not connect to Ray at {address}: {error.strerror or error}; start the cluster "
                           "(ray start --head) or check the address") from None


class _Worker:
    """A Ray actor: the model and a KL meter, measuring one group per call."""

    def __init__(self, model: nn.Module, kl_windows, clip_search, gptq, outer: bool, threads: int):
        from .damage import GroupMeter

        torch.set_num_threads(threads)
        self.meter = GroupMeter(model, kl_windows, clip_search, gptq, outer)

    def measure(self, index, layers, block, choices, stats, kl_for=None):
        before = dict(self.meter.seconds)
        group = self.meter.measure(layers, block, choices, stats, kl_for)
        return index, group, {key: self.meter.seconds[key] - before.get(key, 0.0) for key in self.meter.seconds}


def measure_groups(model: nn.Module, jobs: list[tuple], kl_windows, clip_search, gptq, outer: bool, cluster: Cluster,
                   finished: Callable) -> dict[str, float]:
    """Measure `jobs` ((index, layers, block, choices, stats, kl_for) each: `GroupMeter.measure`'s arguments) on Ray
    workers, calling `finished(index, group)` as each group comes back; returns the seconds spent quantizing and
    measuring KL, summed over the workers."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise MixbitsError("measuring on Ray needs the ray package: pip install 'mixbits[ray]'") from None
    started = not ray.is_initialized()
    if started and cluster.address is not None:
        _check_reachable(cluster.address)
    if started:
        try:
            if cluster.address is None:
                ray.init(num_cpus=cluster.workers or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                         runtime_env=cluster.runtime_env or None)
            else:
                ray.init(address=cluster.address, log_to_driver=False, runtime_env=cluster.runtime_env or None)
        except Exception as error:  # noqa: BLE001 - Ray raises many types when it cannot connect or start
            where = "start a local Ray cluster" if cluster.address is None else f"connect to Ray at {cluster.address}"
            raise MixbitsError(f"could not {where}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
                               "; check the address and that the cluster runs the same Ray version") from None
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        workers = min(cluster.workers or cpus, len(jobs))
        threads = max(1, cpus // workers)
        actor = ray.remote(num_cpus=threads)(_Worker)
        shared = ray.put(model)
        pool = ActorPool([actor.remote(shared, kl_windows, clip_search, gptq, outer, threads) for _ in range(workers)])
        seconds = {"quantize": 0.0, "kl": 0.0}
        for index, group, spent in pool.map_unordered(lambda worker, job: worker.measure.remote(*job), jobs):
            finished(index, group)
            for key, value in spent.items():
                seconds[key] = seconds.get(key, 0.0) + value
        return seconds
    finally:
        if started:
            ray.shutdown()

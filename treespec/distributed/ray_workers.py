"""`--distributed-executor-backend ray`: the worker ranks as Ray actors in one placement group.

This process joins the Ray cluster that `ray.init()` finds (RAY_ADDRESS, or one started with `ray start --head` on
this node) or starts a local one, reserves one bundle of `threads` CPUs per worker rank (PACK: fill a node before
the next), and starts one actor per rank that runs worker.run_worker against rank 0's rendezvous on this node's
address. Every node needs treespec installed and the model at the same path.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from treespec.distributed.group import Rendezvous, first_line, timeout_s
from treespec.distributed.plan import ParallelPlan
from treespec.distributed.source import ModelSource
from treespec.errors import DistributedError
from treespec.extras import Extra, require


def _rank_main(rank: int, rendezvous: Rendezvous, source: ModelSource, plan: ParallelPlan, threads: int) -> None:
    import torch

    from treespec.distributed.worker import run_worker
    torch.set_num_threads(threads)
    run_worker(rank, rendezvous, source, plan)


@dataclass
class RayWorkers:
    """The worker actors, their running `run` calls and the placement group holding them."""
    actors: list[Any]
    runs: list[Any]  # ObjectRefs: one per rank, done when its worker loop ends
    group: Any

    def dead(self) -> list[str]:
        import ray
        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        out = []
        for rank, ref in enumerate(self.runs, 1):
            if ref in done:
                try:
                    ray.get(ref)
                    out.append(f"rank {rank} (exited)")
                except Exception as e:  # noqa: BLE001 - Ray wraps the actor's error or its death
                    out.append(f"rank {rank} ({first_line(e)})")
        return out

    def stop(self, timeout: float) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group
        ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout)
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.group)


def start_ray_workers(source: ModelSource, plan: ParallelPlan, threads: int) -> tuple[Rendezvous, RayWorkers]:
    require(Extra.DISTRIBUTED, "distributed_executor_backend 'ray'")
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)
    workers = plan.world_size - 1
    group = placement_group([{"CPU": threads}] * workers, strategy="PACK")
    wait = timeout_s()
    ready, _ = ray.wait([group.ready()], timeout=wait)
    if not ready:
        remove_placement_group(group)
        raise DistributedError(f"the Ray cluster could not place {workers} worker rank(s) of {threads} CPU(s) each "
                               f"within {wait:g} s (cluster resources: {ray.cluster_resources()})")
    host = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind(("", 0))
        rendezvous = Rendezvous(host, s.getsockname()[1], plan.world_size)
    rank_actor = ray.remote(num_cpus=threads)(_RankActor)
    actors = [rank_actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=i), name=None).remote() for i in range(workers)]
    runs = [a.run.remote(rank, rendezvous, source, plan, threads) for rank, a in enumerate(actors, 1)]
    return rendezvous, RayWorkers(actors, runs, group)


class _RankActor:
    """One worker rank inside a Ray actor process."""

    def run(self, rank: int, rendezvous: Rendezvous, source: ModelSource, plan: ParallelPlan, threads: int) -> None:
        _rank_main(rank, rendezvous, source, plan, threads)

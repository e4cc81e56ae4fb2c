"""Starting the ranks: spawned on this node (`mp`, the default), by torchrun (`external_launcher`) or by Ray (`ray`).

Each rank builds the full model from the same source and keeps its shard (plan.py); rank 0 gets the ParallelTarget
its engine drives. Failures at start (a rank that cannot join, times out or cannot load) are one DistributedError
line; the processes spawned here are ended with it.
"""
from __future__ import annotations

import atexit
import logging
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field

import torch

from treespec.config import EngineConfig, ExecutorBackend
from treespec.distributed.group import Rendezvous, check_loaded, first_line, join, leave
from treespec.distributed.plan import ParallelPlan, describe_weights
from treespec.distributed.source import ModelSource
from treespec.distributed.target import ParallelTarget, Workers
from treespec.distributed.worker import run_worker
from treespec.errors import DistributedError
from treespec.extras import Extra, require
from treespec.models.base import CausalLM

log = logging.getLogger(__name__)


@dataclass
class SpawnedWorkers:
    """Worker processes spawned on this node (each also exits when rank 0's process is gone)."""
    processes: list[subprocess.Popen] = field(default_factory=list)

    def dead(self) -> list[str]:
        return [f"rank {r} (exit code {p.poll()})" for r, p in enumerate(self.processes, 1) if p.poll() is not None]

    def stop(self, timeout: float) -> None:
        for p in self.processes:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait()


@dataclass
class ExternalWorkers:
    """Ranks started by someone else (torchrun): rank 0 cannot see or end them; they exit on its stop."""

    def dead(self) -> list[str]:
        return []

    def stop(self, timeout: float) -> None:
        pass


def launched_rank(config: EngineConfig) -> int:
    """This process's rank: 0 unless torchrun started it as a worker (checked before any model loads)."""
    if config.distributed_executor_backend is ExecutorBackend.RAY:
        require(Extra.DISTRIBUTED, "distributed_executor_backend 'ray'")
    if config.distributed_executor_backend is not ExecutorBackend.EXTERNAL_LAUNCHER:
        return 0
    rendezvous, rank = Rendezvous.from_env()
    if rendezvous.world_size != config.world_size:
        raise DistributedError(f"torchrun started {rendezvous.world_size} ranks; tensor_parallel_size x "
                               f"pipeline_parallel_size is {config.world_size}")
    return rank


def serve_as_worker(source: ModelSource, config: EngineConfig) -> None:
    """A torchrun rank > 0: build this rank's shard and serve rank 0's forwards until it stops."""
    rendezvous, rank = Rendezvous.from_env()
    run_worker(rank, rendezvous, source, ParallelPlan.from_config(config))


def start_parallel(source: ModelSource, config: EngineConfig, model: CausalLM,
                   plan: ParallelPlan | None = None) -> ParallelTarget:
    """Start the other ranks, join them, keep rank 0's shard of `model` (the full target, built here).
    plan: the split (default: the config's sizes; benchmarks vary its micro-batches)."""
    plan = plan or ParallelPlan.from_config(config)
    plan.check(model.config)
    backend = config.distributed_executor_backend
    if backend is ExecutorBackend.EXTERNAL_LAUNCHER:
        rendezvous, _ = Rendezvous.from_env()
        workers: Workers = ExternalWorkers()
    elif backend is ExecutorBackend.RAY:
        from treespec.distributed.ray_workers import start_ray_workers
        rendezvous, workers = start_ray_workers(source, plan, torch.get_num_threads())
    else:
        rendezvous = Rendezvous.local(plan.world_size)
        workers = _spawn(rendezvous, source, plan)
    try:
        control = join(rendezvous, 0)
    except DistributedError as e:
        workers.stop(0.0)
        dead = workers.dead()
        raise DistributedError(f"{e}" + (f" ({', '.join(dead)} exited)" if dead else "")) from None
    try:
        error, weights = None, ""
        try:
            shard = plan.shard(model, 0, source)
            weights = describe_weights(shard)
        except Exception as e:  # noqa: BLE001 - reported with the other ranks' load errors
            error = first_line(e)
        rank_weights = check_loaded(error, weights)
    except Exception as e:
        leave()
        workers.stop(0.0)
        raise DistributedError(first_line(e) if not isinstance(e, DistributedError) else str(e)) from None
    log.info("%s ranks: %s", plan.name, "; ".join(f"rank {r}: {w}" for r, w in enumerate(rank_weights)))
    target = ParallelTarget(shard, model, control, workers, plan.name, rank_weights)
    atexit.register(target.shutdown)
    return target


def _spawn(rendezvous: Rendezvous, source: ModelSource, plan: ParallelPlan) -> SpawnedWorkers:
    """`python -m treespec.distributed.worker` per rank, arguments pickled on stdin: a fresh interpreter that never
    re-imports the caller's main module (multiprocessing's spawn would, and fork would copy torch's thread pools)."""
    workers = SpawnedWorkers()
    for rank in range(1, plan.world_size):
        p = subprocess.Popen([sys.executable, "-m", "treespec.distributed.worker"], stdin=subprocess.PIPE)
        pickle.dump((rank, rendezvous, source, plan, torch.get_num_threads(), os.getpid()), p.stdin)
        p.stdin.close()
        workers.processes.append(p)
    return workers

"""Start or join the Ray cluster, deploy the K engine replicas, and take it all down again.

Without an address (--ray-address, else $RAY_ADDRESS) this process starts a local Ray cluster with this
machine's CPUs (address "local": never one that `ray start` left recorded in /tmp/ray) and stops it on exit: Ray's own processes (GCS, raylet, workers) are its children and leave
with it. On a cluster it joined, it deletes only its own application. Ray Serve runs no HTTP proxy of its own
(proxy_location "Disabled"): the endpoint is this process's app, and requests reach the replicas through a
deployment handle. Replicas are placed by Ray Serve's default SPREAD strategy, so they go to different nodes
where the cluster has several.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
import uuid
from dataclasses import dataclass

import ray
from ray import serve

from treespec.cli_args import load_kwargs, spec_from_args
from treespec.errors import ConfigError, EngineClosedError
from treespec.server.replicas.pool import ReplicaPool
from treespec.server.replicas.replica import EngineReplica, ReplicaArgs, SnapshotBoard
from treespec.tokenizer import Tokenizer

OBJECT_STORE_BYTES = 128 << 20  # a local cluster's object store: only requests, deltas and snapshots pass it
GRACEFUL_SHUTDOWN_S = 5.0       # replicas are idle by then: the pool drained (or aborted) every request first


@dataclass(frozen=True)
class Placement:
    """How many replicas, the ranks of each (tensor x pipeline parallel), the torch threads of each rank and the
    Ray CPUs each rank reserves (default: its threads; fewer oversubscribes the cores)."""
    num_replicas: int
    ranks: int
    threads: int
    cpus_per_rank: float

    @classmethod
    def fit(cls, num_replicas: int, ranks: int, threads: int | None, cpus_per_rank: float | None,
            cpus: int) -> "Placement":
        """--threads per rank, by default an even share of the cluster's CPUs; ConfigError if the K x ranks
        reservations exceed them (Ray would wait for CPUs that never come)."""
        threads = threads or max(1, cpus // (num_replicas * ranks))
        placement = cls(num_replicas, ranks, threads, cpus_per_rank or threads)
        need = num_replicas * ranks * placement.cpus_per_rank
        if need > cpus:
            raise ConfigError(f"--data-parallel-size {num_replicas} x {ranks} rank(s) x {placement.cpus_per_rank:g} "
                              f"CPUs each (--threads, --cpus-per-rank) needs {need:g} CPUs; the Ray cluster has {cpus}")
        return placement

    def deployment_options(self) -> dict:
        """Ray Serve options that reserve a replica's CPUs: with several ranks, one bundle per rank, all on one
        node (STRICT_PACK: the replica spawns its worker ranks as its own child processes); the replica's actor
        takes the first bundle."""
        options: dict = {"ray_actor_options": {"num_cpus": self.cpus_per_rank}}
        if self.ranks > 1:
            options.update(placement_group_bundles=[{"CPU": self.cpus_per_rank}] * self.ranks,
                           placement_group_strategy="STRICT_PACK")
        return options


def local_cpus() -> int:
    return len(os.sched_getaffinity(0))


class ReplicaCluster:
    """The replicas of one `treespec serve --data-parallel-size K`.

    One thread owns Ray: it calls start(), then run_until_stopped(), which tears everything down once stop() is
    called from any other thread. The same thread must do both: Ray starts its local GCS and raylet with a
    parent-death signal bound to the *thread* that called ray.init, so they die when that thread ends.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.address = args.ray_address or os.environ.get("RAY_ADDRESS") or None
        self.app_name = f"treespec-{uuid.uuid4().hex[:8]}"
        self.spec = spec_from_args(args)  # bad flags are usage errors here, before anything starts
        self._stop = threading.Event()
        self.ranks = args.tensor_parallel_size * args.pipeline_parallel_size
        if self.address is None:
            Placement.fit(args.data_parallel_size, self.ranks, args.threads, args.cpus_per_rank, local_cpus())

    def start(self) -> tuple[ReplicaPool, Tokenizer]:
        """Connect, deploy and wait until every replica has loaded the model (blocking; minutes for big models)."""
        if self.address is None:
            ray.init(address="local", num_cpus=local_cpus(), include_dashboard=False, log_to_driver=False,
                     object_store_memory=OBJECT_STORE_BYTES, logging_level=logging.ERROR)
        else:
            ray.init(address=self.address, log_to_driver=False, logging_level=logging.ERROR)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        a = self.args
        placement = Placement.fit(a.data_parallel_size, self.ranks, a.threads, a.cpus_per_rank,
                                  int(ray.cluster_resources().get("CPU", 0)))
        capacity = a.max_num_seqs + a.max_waiting
        replica_args = ReplicaArgs(a.model, self.spec, a.max_model_len, a.weight_quantization,
                                   placement.threads, a.max_num_seqs, a.max_num_batched_tokens, a.max_waiting,
                                   load_kwargs(a))
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
        board = ray.remote(num_cpus=0)(SnapshotBoard).remote()
        deployment = serve.deployment(
            EngineReplica, name="engine", num_replicas=placement.num_replicas, max_ongoing_requests=capacity,
            max_constructor_retry_count=1, graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
            **placement.deployment_options())
        handle = serve.run(deployment.bind(replica_args, board), name=self.app_name, route_prefix=None)
        if self._stop.is_set():
            raise EngineClosedError("stopped while the replicas started")
        info = handle.info.remote().result()
        pool = ReplicaPool(handle, board, info.max_model_len, placement.num_replicas, capacity)
        return pool, info.tokenizer

    def run_until_stopped(self) -> None:
        """Block until stop(), then delete the application (its replicas stop their engines) and disconnect, which
        also stops a local cluster this process started (Ray Serve's controller with it)."""
        self._stop.wait()
        if not ray.is_initialized():
            return
        try:
            serve.delete(self.app_name)
        finally:
            ray.shutdown()

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

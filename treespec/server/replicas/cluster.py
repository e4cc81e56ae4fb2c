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

from treespec.cli_args import spec_from_args
from treespec.errors import ConfigError, EngineClosedError
from treespec.server.replicas.pool import ReplicaPool
from treespec.server.replicas.replica import EngineReplica, ReplicaArgs, SnapshotBoard
from treespec.tokenizer import Tokenizer

OBJECT_STORE_BYTES = 128 << 20  # a local cluster's object store: only requests, deltas and snapshots pass it
GRACEFUL_SHUTDOWN_S = 5.0       # replicas are idle by then: the pool drained (or aborted) every request first


@dataclass(frozen=True)
class Placement:
    """How many replicas, and the CPUs (= torch threads) each one reserves."""
    num_replicas: int
    threads: int

    @classmethod
    def fit(cls, num_replicas: int, threads: int | None, cpus: int) -> "Placement":
        """--threads per replica, by default an even share of the cluster's CPUs; ConfigError if K x threads
        exceeds them (Ray would wait for CPUs that never come)."""
        placement = cls(num_replicas, threads or max(1, cpus // num_replicas))
        if num_replicas * placement.threads > cpus:
            raise ConfigError(f"--data-parallel-size {num_replicas} x {placement.threads} threads each needs "
                              f"{num_replicas * placement.threads} CPUs; the Ray cluster has {cpus}")
        return placement


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
        if self.address is None:
            Placement.fit(args.data_parallel_size, args.threads, local_cpus())

    def start(self) -> tuple[ReplicaPool, Tokenizer]:
        """Connect, deploy and wait until every replica has loaded the model (blocking; minutes for big models)."""
        if self.address is None:
            ray.init(address="local", num_cpus=local_cpus(), include_dashboard=False, log_to_driver=False,
                     object_store_memory=OBJECT_STORE_BYTES, logging_level=logging.ERROR)
        else:
            ray.init(address=self.address, log_to_driver=False, logging_level=logging.ERROR)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        a = self.args
        placement = Placement.fit(a.data_parallel_size, a.threads, int(ray.cluster_resources().get("CPU", 0)))
        capacity = a.max_num_seqs + a.max_waiting
        replica_args = ReplicaArgs(a.model, self.spec, a.max_model_len, a.weight_quantization,
                                   placement.threads, a.max_num_seqs, a.max_num_batched_tokens, a.max_waiting)
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
        board = ray.remote(num_cpus=0)(SnapshotBoard).remote()
        deployment = serve.deployment(
            EngineReplica, name="engine", num_replicas=placement.num_replicas,
            ray_actor_options={"num_cpus": placement.threads}, max_ongoing_requests=capacity,
            max_constructor_retry_count=1, graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S)
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

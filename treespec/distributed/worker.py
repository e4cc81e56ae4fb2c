"""A worker rank: build its shard, then run rank 0's forwards on its own KV caches until rank 0 says stop."""
from __future__ import annotations

import os
import pickle
import sys
import threading
import time

import torch
import torch.distributed as dist

from treespec.distributed.group import Rendezvous, check_loaded, first_line, join, leave
from treespec.distributed.plan import ParallelPlan, describe_weights
from treespec.distributed.source import ModelSource
from treespec.distributed.step import Shard, StepInputs, replay
from treespec.kv.cache import KVCache

_PARENT_POLL_S = 1.0


def run_worker(rank: int, rendezvous: Rendezvous, source: ModelSource, plan: ParallelPlan) -> None:
    control = join(rendezvous, rank)
    try:
        shard, error, weights = None, None, ""
        try:
            shard = plan.shard(source.build(), rank, source)
            weights = describe_weights(shard)
        except Exception as e:  # noqa: BLE001 - reported to rank 0, which raises it as one line
            error = first_line(e)
        check_loaded(error, weights)
        serve_steps(shard, control)
    finally:
        leave()


def serve_steps(shard: Shard, control: dist.ProcessGroup) -> None:
    """Replay rank 0's cache operations and run this rank's part of each forward; return on rank 0's stop (None)."""
    caches: dict[int, KVCache] = {}
    while True:
        box: list[StepInputs | None] = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        inputs = box[0]
        if inputs is None:
            return
        replay(inputs.ops, caches, lambda max_len: KVCache(*shard.cache_layout, max_len))
        with torch.inference_mode():
            shard.run(inputs, inputs.attention(caches))


def worker_process(rank: int, rendezvous: Rendezvous, source: ModelSource, plan: ParallelPlan, threads: int,
                   parent: int) -> None:
    """A spawned worker's life: one line on stderr and exit status 1 on any failure; exits if rank 0's process
    (pid `parent`) goes away, whatever this rank is blocked in."""
    torch.set_num_threads(threads)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="treespec-parent-watch").start()
    try:
        run_worker(rank, rendezvous, source, plan)
    except Exception as e:  # noqa: BLE001
        print(f"treespec: {plan.name} rank {rank}: {first_line(e)}", file=sys.stderr, flush=True)
        sys.exit(1)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)


if __name__ == "__main__":  # launch.py starts `python -m treespec.distributed.worker` with its arguments on stdin
    worker_process(*pickle.load(sys.stdin.buffer))

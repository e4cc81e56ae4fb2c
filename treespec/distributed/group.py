"""Joining the process group: rendezvous, timeouts, and failures as one line each.

Two gloo groups over the same ranks: the default group carries a forward's all-reduces and activations and times
out after TREESPEC_DIST_TIMEOUT seconds (a rank that hangs fails the step instead of wedging it; also the
rendezvous and model-load deadline); the control group carries rank 0's step inputs, which workers wait for between
requests for as long as the server idles.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from treespec.errors import DistributedError

TIMEOUT_ENV = "TREESPEC_DIST_TIMEOUT"
_DEFAULT_TIMEOUT_S = 300.0
_IDLE = timedelta(days=365)


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else _DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}: expected seconds, got {raw!r}") from None
    if not value > 0:
        raise DistributedError(f"{TIMEOUT_ENV}: must be > 0 seconds, got {raw!r}")
    return value


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks meet: rank 0 listens on host:port (a TCPStore)."""
    host: str
    port: int
    world_size: int

    @classmethod
    def local(cls, world_size: int) -> "Rendezvous":
        """A free loopback port for ranks spawned on this node."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return cls("127.0.0.1", s.getsockname()[1], world_size)

    @classmethod
    def from_env(cls) -> tuple["Rendezvous", int]:
        """torchrun's MASTER_ADDR / MASTER_PORT / WORLD_SIZE and this process's RANK."""
        try:
            env = {k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
            return cls(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"])), int(env["RANK"])
        except (KeyError, ValueError) as e:
            raise DistributedError(f"distributed_executor_backend 'external_launcher': start the ranks with torchrun "
                                   f"(MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK must be set; {e})") from None


def join(rendezvous: Rendezvous, rank: int) -> dist.ProcessGroup:
    """Join the default group (gloo) and make the control group; returns the control group."""
    t = timeout_s()
    try:
        dist.init_process_group("gloo", init_method=f"tcp://{rendezvous.host}:{rendezvous.port}", rank=rank,
                                world_size=rendezvous.world_size, timeout=timedelta(seconds=t))
        return dist.new_group(backend="gloo", timeout=_IDLE)
    except Exception as e:  # noqa: BLE001 - store and gloo errors have many types; each becomes one line
        leave()
        raise DistributedError(f"rank {rank} could not join the group at {rendezvous.host}:{rendezvous.port} "
                               f"({rendezvous.world_size} ranks, timeout {t:g} s, {TIMEOUT_ENV}): "
                               f"{first_line(e)}") from None


def check_loaded(error: str | None, weights: str = "") -> list[str]:
    """Every rank says whether it built its shard and how its weights run; DistributedError (the same on every
    rank) if any failed, else every rank's `weights`, by rank."""
    statuses: list[tuple[str | None, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(statuses, (error, weights))
    failed = [f"rank {r}: {e}" for r, (e, _) in enumerate(statuses) if e is not None]
    if failed:
        raise DistributedError("could not load the model shards: " + "; ".join(failed))
    return [w for _, w in statuses]


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"

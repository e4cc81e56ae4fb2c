"""`treespec serve`: load a model and serve the OpenAI-compatible API with uvicorn.

The HTTP listener starts before the model loads, so `/health` answers 503 until the engine is ready.
SIGTERM (or Ctrl+C) stops accepting connections, lets in-flight requests finish for up to --drain-timeout
seconds, ends the rest with finish_reason "abort" (streams still get [DONE]), stops the engine thread and exits
with status 0. With --data-parallel-size K > 1 the engines are K Ray Serve replicas (server/replicas/), stopped
with the Ray cluster this process started once the HTTP side has drained.
"""
from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

from treespec.api import LLM
from treespec.cli_args import API_KEY_ENV, load_kwargs, spec_from_args
from treespec.config import ExecutorBackend
from treespec.engine.async_engine import AsyncEngine
from treespec.errors import ConfigError
from treespec.server.app import DrainingServer, ServerSettings, attach_engine, create_app

if TYPE_CHECKING:
    from treespec.server.replicas.cluster import ReplicaCluster

FLUSH_S = 5.0  # after the drain, seconds responses get to send their last bytes before uvicorn cancels them
RAY_STOP_TIMEOUT_S = 30.0  # --data-parallel-size: seconds the replicas' teardown gets after the drain


def cmd_serve(args: argparse.Namespace) -> int:
    if args.distributed_executor_backend == ExecutorBackend.EXTERNAL_LAUNCHER.value and int(os.environ.get("RANK", 0)):
        _make_llm(args)  # a torchrun rank > 0 serves rank 0's forwards (no HTTP) and exits when rank 0 stops
        return 0
    settings = ServerSettings(model_name=args.served_model_name or args.model,
                              api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                              max_body_bytes=args.max_body_bytes, cors_origins=args.cors_origin or [],
                              drain_timeout=args.drain_timeout)
    if args.data_parallel_size == 1 and args.ray_address:
        raise ConfigError("--ray-address: only used with --data-parallel-size > 1")
    if args.data_parallel_size == 1 and args.cpus_per_rank is not None:
        raise ConfigError("--cpus-per-rank: only used with --data-parallel-size > 1")
    if args.data_parallel_size > 1 and args.distributed_executor_backend != ExecutorBackend.MP.value:
        raise ConfigError("--data-parallel-size: each replica spawns its own tensor/pipeline-parallel ranks on its "
                          "node (--distributed-executor-backend mp)")
    app = create_app(None, None, settings=settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.drain_timeout + FLUSH_S)
    server = DrainingServer(config)
    replicas = None
    if args.data_parallel_size > 1:
        from treespec.server.replicas.cluster import ReplicaCluster
        replicas = ReplicaCluster(args)
        load = threading.Thread(target=_run_replicas, args=(app, args, server, replicas), daemon=True,
                                name="treespec-ray")
    else:
        load = threading.Thread(target=_load_engine, args=(app, args, server), daemon=True, name="treespec-load")
    load.start()
    # uvicorn re-raises the signal it caught once it has drained; no-op handlers make that a clean exit (status 0
    # for Ctrl+C too, not KeyboardInterrupt's 130).
    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in stops}
    try:
        server.run()
    finally:
        if replicas is not None:  # the HTTP side has drained: now stop the replicas and Ray
            replicas.stop()
            # (a thread still starting them, or a Ray already killed under it, may never return: exiting then
            # still takes Ray's local processes down, by the parent-death signal they were started with)
            load.join(RAY_STOP_TIMEOUT_S)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if app.state.load_error is None else 1


def _load_engine(app: FastAPI, args: argparse.Namespace, server: uvicorn.Server) -> None:
    """Load the model off the event loop; attach the engine to the app (or record why it failed and stop)."""
    # Say what the (possibly minute-long) wait is: before /health turns 200 the load also measures the verify
    # cost once per model and machine (cached), so none of it lands on the first requests.
    print(f"treespec: loading {args.model} (a first start may also measure the verify cost, once); "
          f"/health answers 503 until it is ready", flush=True)
    t0 = time.monotonic()
    try:
        llm = _make_llm(args)
        attach_engine(app, AsyncEngine(llm.engine), llm.tokenizer)
        print(f"treespec: ready after {time.monotonic() - t0:.1f} s: serving on http://{args.host}:{args.port}",
              flush=True)
    except Exception as e:  # noqa: BLE001 - any load failure ends the server with one line, not a hung process
        app.state.load_error = f"{type(e).__name__}: {e}"
        print(f"treespec: error: could not load {args.model}: {e}", flush=True)
        server.should_exit = True


def _run_replicas(app: FastAPI, args: argparse.Namespace, server: uvicorn.Server,
                  replicas: ReplicaCluster) -> None:
    """_load_engine for --data-parallel-size K: start Ray and the K replicas, attach their pool, and hold them
    (this thread owns Ray, see ReplicaCluster) until the main thread calls replicas.stop()."""
    print(f"treespec: starting {args.data_parallel_size} replicas of {args.model} on Ray; /health answers 503 "
          f"until all are ready", flush=True)
    t0 = time.monotonic()
    try:
        pool, tokenizer = replicas.start()
        attach_engine(app, pool, tokenizer)
        print(f"treespec: ready after {time.monotonic() - t0:.1f} s: serving on http://{args.host}:{args.port}",
              flush=True)
    except Exception as e:  # noqa: BLE001 - as in _load_engine: one line, then the server stops
        if replicas.stopping:  # SIGTERM while starting: a stop, not a failure
            return
        message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        app.state.load_error = f"{type(e).__name__}: {message}"
        print(f"treespec: error: could not start the replicas of {args.model}: {message}", flush=True)
        server.should_exit = True
    finally:
        replicas.run_until_stopped()


def _make_llm(args: argparse.Namespace) -> LLM:
    return LLM(args.model, speculative_config=spec_from_args(args), max_model_len=args.max_model_len,
               weight_quantization=args.weight_quantization, num_threads=args.threads,
               max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
               max_waiting=args.max_waiting, **load_kwargs(args))

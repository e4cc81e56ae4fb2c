"""`treespec serve`: load a model and serve the OpenAI-compatible API with uvicorn.

The HTTP listener starts before the model loads, so `/health` answers 503 until the engine is ready.
SIGTERM (or Ctrl+C) stops accepting connections, lets in-flight requests finish for up to --drain-timeout
seconds, ends the rest with finish_reason "abort" (streams still get [DONE]), stops the engine thread and exits
with status 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import threading
import time

import uvicorn
from fastapi import FastAPI

from treespec.api import LLM
from treespec.cli_args import API_KEY_ENV, device_kwargs, spec_from_args
from treespec.engine.async_engine import AsyncEngine
from treespec.server.app import DrainingServer, ServerSettings, attach_engine, create_app

FLUSH_S = 5.0  # after the drain, seconds responses get to send their last bytes before uvicorn cancels them


def cmd_serve(args: argparse.Namespace) -> int:
    settings = ServerSettings(model_name=args.served_model_name or args.model,
                              api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                              max_body_bytes=args.max_body_bytes, cors_origins=args.cors_origin or [],
                              drain_timeout=args.drain_timeout)
    app = create_app(None, None, settings=settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.drain_timeout + FLUSH_S)
    server = DrainingServer(config)
    threading.Thread(target=_load_engine, args=(app, args, server), daemon=True, name="treespec-load").start()
    # uvicorn re-raises the signal it caught once it has drained; no-op handlers make that a clean exit (status 0
    # for Ctrl+C too, not KeyboardInterrupt's 130).
    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in stops}
    try:
        server.run()
    finally:
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
        llm = LLM(args.model, speculative_config=spec_from_args(args), max_model_len=args.max_model_len,
                  weight_quantization=args.weight_quantization, num_threads=args.threads,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  max_waiting=args.max_waiting, **device_kwargs(args))
        attach_engine(app, AsyncEngine(llm.engine), llm.tokenizer)
        print(f"treespec: ready after {time.monotonic() - t0:.1f} s: serving on http://{args.host}:{args.port}",
              flush=True)
    except Exception as e:  # noqa: BLE001 - any load failure ends the server with one line, not a hung process
        app.state.load_error = f"{type(e).__name__}: {e}"
        print(f"treespec: error: could not load {args.model}: {e}", flush=True)
        server.should_exit = True

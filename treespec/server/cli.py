"""`treespec serve`: load a model and serve the OpenAI-compatible API with uvicorn.

The HTTP listener starts before the model loads, so `/health` answers 503 until the engine is ready.
SIGTERM (or Ctrl+C) stops accepting connections, lets in-flight requests finish for up to --drain-timeout
seconds, stops the engine thread and exits with status 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import threading

import uvicorn
from fastapi import FastAPI

from treespec.api import LLM
from treespec.cli_args import API_KEY_ENV, spec_from_args
from treespec.engine.async_engine import AsyncEngine
from treespec.server.app import ServerSettings, attach_engine, create_app


def cmd_serve(args: argparse.Namespace) -> int:
    settings = ServerSettings(model_name=args.served_model_name or args.model,
                              api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                              max_body_bytes=args.max_body_bytes, cors_origins=args.cors_origin or [])
    app = create_app(None, None, settings=settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=max(args.drain_timeout, 0.1))
    server = uvicorn.Server(config)
    threading.Thread(target=_load_engine, args=(app, args, server), daemon=True, name="treespec-load").start()
    # uvicorn re-raises the signal it caught once it has drained; a no-op handler turns that into a clean exit.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if app.state.load_error is None else 1


def _load_engine(app: FastAPI, args: argparse.Namespace, server: uvicorn.Server) -> None:
    """Load the model off the event loop; attach the engine to the app (or record why it failed and stop)."""
    try:
        llm = LLM(args.model, speculative_config=spec_from_args(args), max_model_len=args.max_model_len,
                  weight_quantization=args.weight_quantization, num_threads=args.threads,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  max_waiting=args.max_waiting)
        attach_engine(app, AsyncEngine(llm.engine), llm.tokenizer)
    except Exception as e:  # noqa: BLE001 - any load failure ends the server with one line, not a hung process
        app.state.load_error = f"{type(e).__name__}: {e}"
        print(f"treespec: error: could not load {args.model}: {e}", flush=True)
        server.should_exit = True

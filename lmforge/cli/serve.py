"""`lmforge serve`: the OpenAI-compatible server (see lmforge.serve).

The server starts listening at once and loads the model in the background: /health answers 503
until the model is ready, then 200. SIGTERM or Ctrl-C drains: new requests get 503, requests in
flight may finish for up to --drain-timeout seconds, then the rest are aborted and the process exits 0.

With --tensor-parallel-size N the server starts N - 1 worker processes itself, or, run under
torchrun with N processes in all (on one machine or several), rank 0 serves and the other ranks
are its workers: they exit when it stops.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading

from lmforge.cli.common import QUANTIZATION_CHOICES, add_model_argument
from lmforge.errors import InputError
from lmforge.sources import DEFAULT_MODEL

EXAMPLES = """examples:
  lmforge serve                                   # SmolLM2-135M-Instruct on http://127.0.0.1:8000
  lmforge serve --port 9000 --api-key secret --max-queue 64
  lmforge serve --tensor-parallel-size 3          # the model split over 3 processes
  torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      -m lmforge.cli serve --tensor-parallel-size 2 --host 0.0.0.0   # split over 2 machines
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 20}'
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients pass as 'model' (default: the --model value)")
    parser.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $LMFORGE_API_KEY, "
                             "or no key)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="weights and activations; auto = bfloat16 where this machine multiplies it natively "
                             "(AMX, AVX512-BF16, GPUs), else float32 (default: auto)")
    parser.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default=None,
                        help="quantize the model's Linear layers at load time; gguf keeps a GGUF file's own "
                             "Q8_0/Q4_1/Q4_0 blocks (default: none)")
    parser.add_argument("--embedding-model", default="all-minilm-l6-v2",
                        help="encoder serving /v1/embeddings; 'none' turns the route off (default: all-minilm-l6-v2)")
    parser.add_argument("--rag-index", metavar="INDEX", default=None,
                        help="document index (from `lmforge rag index`) that chat requests can draw sources from "
                             "with extra_body={'context': {'rag': true}}")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoded together (default: 32)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512,
                        help="tokens per engine step (default: 512)")
    parser.add_argument("--kv-cache-tokens", type=int, default=None,
                        help="token slots in the paged KV cache (default: a share of free memory)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + answer per request (default: the model's context window)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="split the model over this many processes (one GPU each with CUDA, else CPU "
                             "processes sharing the cores) that run every step together (default: 1)")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="waiting requests beyond which new ones get HTTP 429 (default: unbounded)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds in-flight requests may finish after SIGTERM (default: 30)")
    parser.add_argument("--cors-origin", action="append", default=[],
                        help="allow browser requests from this origin (repeatable; default: none)")
    parser.set_defaults(handler=run)


def _draining_server_class(state):
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, except that SIGTERM/SIGINT start a drain — /health and new requests on open
        connections answer 503 — that ends with exit status 0 (uvicorn re-raises the signal once it has
        shut down, which a process manager reads as a crash)."""

        def handle_exit(self, sig, frame) -> None:
            state.draining = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return DrainingServer


def run(args: argparse.Namespace) -> int:
    from lmforge.distributed import (
        destroy_distributed,
        init_distributed,
        launched_world_size,
    )

    launched = launched_world_size()
    if launched > 1:
        if args.tensor_parallel_size != launched:
            raise InputError(f"torchrun started {launched} processes; pass --tensor-parallel-size {launched} so "
                             "that they serve one model together (rank 0 serves, the others are its workers).")
        if init_distributed().rank != 0:
            from lmforge.engine import run_tensor_parallel_worker

            run_tensor_parallel_worker()
            destroy_distributed()
            return 0
    try:
        return _serve(args)
    finally:
        if launched > 1:
            destroy_distributed()


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from fastapi.middleware.cors import CORSMiddleware

    from lmforge.context.rag import Retriever
    from lmforge.engine.async_engine import AsyncLLMEngine
    from lmforge.engine.config import EngineConfig
    from lmforge.serve.app import ServerState, create_app
    from lmforge.serve.embeddings import Embedder

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          kv_cache_tokens=args.kv_cache_tokens, max_model_len=args.max_model_len)
    state = ServerState(model_name=args.served_model_name or str(args.model or DEFAULT_MODEL),
                        api_key=args.api_key or None, max_queue=args.max_queue)
    failure: list[BaseException] = []

    def stop_serving(exc: BaseException) -> None:
        """The server cannot go on (a tensor-parallel worker died): stop, and exit with the error."""
        logging.error("%s", exc)
        failure.append(exc)
        server.should_exit = True

    def load() -> None:
        try:
            if args.embedding_model.lower() != "none":
                state.embedder = Embedder.from_pretrained(args.embedding_model)
            if args.rag_index is not None:
                state.retriever = Retriever.load(args.rag_index)
            state.engine = AsyncLLMEngine.from_pretrained(args.model, config, args.dtype, args.quantization,
                                                          args.tensor_parallel_size)
            if state.engine.engine.workers is not None:
                state.engine.engine.workers.watch(stop_serving)
            logging.info("model %s ready (%s%s): http://%s:%d/", state.model_name,
                         str(state.engine.engine.model.dtype).removeprefix("torch."),
                         f", {args.quantization}" if args.quantization else "", args.host, args.port)
        except BaseException as exc:  # reported below; the server cannot serve without a model
            failure.append(exc)
            server.should_exit = True

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load, name="lmforge-load", daemon=True).start()
        yield
        state.draining = True  # SIGTERM / Ctrl-C: uvicorn stops accepting and waits for in-flight requests
        if state.engine is not None:
            state.engine.shutdown()

    app = create_app(state)
    app.router.lifespan_context = lifespan

    if args.cors_origin:
        app.add_middleware(CORSMiddleware, allow_origins=args.cors_origin, allow_methods=["*"], allow_headers=["*"])
    server_class = _draining_server_class(state)
    server = server_class(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                         timeout_graceful_shutdown=args.drain_timeout))
    print(f"lmforge: serving {state.model_name} on http://{args.host}:{args.port}/ (loading the model...)",
          file=sys.stderr)
    server.run()
    if failure:
        raise failure[0]
    return 0

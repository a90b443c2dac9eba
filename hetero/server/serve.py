"""`hetero serve`: the server answers at once (/health: 503 "loading"), loads the model in a
thread with progress bars in the log, prints where it listens, and serves. SIGTERM (or Ctrl-C)
stops taking requests (/health: 503 "draining"), lets those in flight finish for up to
`--drain-timeout` seconds, then exits 0."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import threading

log = logging.getLogger("hetero.serve")


def add_parser(sub, model_args, placement_args) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible server (default: the demo model)")
    model_args(s, max_tokens=256, temperature=1.0)
    placement_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="the model's name in the API (default: its dir)")
    s.add_argument(
        "--api-key",
        default=os.environ.get("HETERO_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1 (default: $HETERO_API_KEY)",
    )
    s.add_argument("--max-queued-requests", type=int, default=256,
                   help="waiting requests beyond which new ones get 503 + Retry-After")  # fmt: skip
    s.add_argument("--max-num-seqs", type=int, default=64, help="requests in a batch")
    s.add_argument("--max-num-batched-tokens", type=int,
                   help="tokens a step: decode + prompt chunks")  # fmt: skip
    s.add_argument("--kv-cache-tokens", type=int, help="KV pool size (default: the memory plan)")
    s.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for requests in flight")  # fmt: skip
    s.add_argument("--no-reasoning-split", action="store_true",
                   help="keep a reasoning model's <think> text in `content`")  # fmt: skip
    s.add_argument("--deterministic", action="store_true",
                   help="greedy outputs independent of what runs beside them")  # fmt: skip
    s.add_argument("--hot-experts", type=int, default=0, metavar="N",
                   help="every N steps, swap cold GPU experts for hot CPU ones (layers with "
                        "gpu_format int4 = their CPU format; 0: off)")  # fmt: skip
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from hetero.server.app import create_app
    from hetero.server.state import ServerConfig, ServerState
    from hetero.session import UsageError, default_model_dir

    if args.max_queued_requests < 1 or args.port < 0:
        raise UsageError("--max-queued-requests must be >= 1 and --port >= 0")
    model_dir = args.model or str(default_model_dir())
    name = args.served_model_name or os.path.basename(os.path.normpath(model_dir))
    config = ServerConfig(
        model_name=name,
        api_key=args.api_key or None,
        max_queued_requests=args.max_queued_requests,
        max_body_bytes=int(args.max_body_mb * 2**20),
        reasoning=not args.no_reasoning_split,
    )
    state = ServerState(config)
    app = create_app(state)
    server = _Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                       timeout_graceful_shutdown=args.drain_timeout, lifespan="off"),
        state,
    )  # fmt: skip
    args.model = model_dir
    loader = threading.Thread(target=_load, args=(args, state, server), daemon=True)
    loader.start()
    try:
        server.run()
    finally:
        if state.loaded is not None:
            state.loaded.handle.close()
            if state.loaded.close:
                state.loaded.close()
    return 0


def _load(args: argparse.Namespace, state, server) -> None:
    from hetero.server.state import Loaded
    from hetero.session import load_session

    try:
        engine, close, tokenizer, _, cpu = load_session(
            args, progress=True, kv_tokens=args.kv_cache_tokens, max_num_seqs=args.max_num_seqs,
            deterministic=args.deterministic, max_num_batched_tokens=args.max_num_batched_tokens,
            hot_experts_every=args.hot_experts,
        )  # fmt: skip
    except Exception as e:  # the server stays up to say why (/health, every request)
        log.error("loading failed: %s", e)
        state.load_error = str(e)
        return
    from hetero.engine.handle import EngineHandle

    handle = EngineHandle(engine, cpu)
    # a request's prompt + output: the model's context, or the whole KV pool if that is smaller
    context = min(engine.max_model_len, engine.pool.capacity * engine.pool.page_size)
    state.loaded = Loaded(handle, tokenizer, context, close)
    host = args.host if ":" not in args.host else f"[{args.host}]"
    log.info(
        "serving %r at http://%s:%d/v1 (chat page: http://%s:%d/); KV cache %d tokens",
        state.config.model_name, host, server.port, host, server.port,
        engine.pool.capacity * engine.pool.page_size,
    )  # fmt: skip


class _Server:
    """uvicorn's server, marking the state as draining as soon as a shutdown signal arrives."""

    def __init__(self, config, state) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                state.draining = True
                super().handle_exit(sig, frame)

            @contextlib.contextmanager
            def capture_signals(self):
                # uvicorn re-raises a caught SIGTERM once drained (the process then dies of
                # it); a drained server has done what SIGTERM asks, so it exits 0 instead
                with super().capture_signals():
                    yield
                    self._captured_signals.clear()

        self.server = Server(config)
        self.config = config

    @property
    def port(self) -> int:
        servers = getattr(self.server, "servers", None) or []
        for s in servers:
            for sock in s.sockets:
                return sock.getsockname()[1]
        return self.config.port

    def run(self) -> None:
        self.server.run()

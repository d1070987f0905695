"""`megactx serve [MODEL]`: the OpenAI-compatible HTTP server (megactx/server)."""
from __future__ import annotations

import logging

from megactx.commands.flags import add_engine_flags, add_server_flags, engine_config, server_config

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_flags(s, positional_model=True)
    add_server_flags(s)
    s.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from megactx.engine.distributed import with_launcher_rank
    from megactx.engine.llm_engine import run_worker
    from megactx.server.app import create_app
    config = with_launcher_rank(engine_config(args))
    if config.parallel.rank > 0:  # a rank torchrun started on this or another machine: rank 0 serves
        run_worker(config)
        return 0
    server = server_config(args)
    app = create_app(config, server.served_model_name, server.api_key, server=server)
    logger.info("serving on http://%s:%d", server.host, server.port)
    http = uvicorn.Server(uvicorn.Config(app, host=server.host, port=server.port,
                                         log_level="info" if args.verbose else "warning"))
    # a model that cannot load ends the server (exit code 2) instead of answering 503 forever
    app.state.megactx.on_fatal = lambda: setattr(http, "should_exit", True)
    http.run()
    app.state.megactx.close()
    return 2 if app.state.megactx.load_error else 0

"""``retinalgpt api``: serve the HTTP API (FHIR R4, worklist, chat, review page, health, metrics)."""

from __future__ import annotations

import logging
import signal
from typing import Annotated

import typer

from worker.cli.common import ConfigOption, console, fail, one_line_errors, settings


@one_line_errors
def api(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="bind address (default: api.host)")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default: api.port)")] = None,
) -> None:
    """Run the HTTP API with uvicorn until SIGINT/SIGTERM (never loads the model: chat goes to the workers)."""
    import uvicorn

    from worker.api import create_app
    from worker.db.migrate import upgrade

    effective = settings(config)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger().setLevel(effective.log_level)
    upgrade(effective.database.url)
    if not effective.api.tokens:
        console.print("[yellow]warning:[/] no api.tokens configured: every request except metadata, health "
                      "and metrics is refused", highlight=False)
    bind_host, bind_port = host or effective.api.host, port or effective.api.port
    app = create_app(effective)
    # log_config=None: uvicorn logs through our root handler (URL passwords masked); its access log is off,
    # worker.api.app writes one without query strings (worker/logsetup.py).
    server = uvicorn.Server(uvicorn.Config(app, host=bind_host, port=bind_port, log_level=effective.log_level.lower(),
                                           proxy_headers=True, server_header=False, access_log=False,
                                           log_config=None))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the previous handler:
    # make that handler a no-op so a requested stop exits 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    console.print(f"API on http://{bind_host}:{bind_port} (review page /ui/, FHIR /fhir/r4)", highlight=False)
    server.run()
    if not server.started:
        fail(f"cannot listen on {bind_host}:{bind_port}")
    console.print("API stopped")


def register(app: typer.Typer) -> None:
    app.command("api")(api)

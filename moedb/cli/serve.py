"""``moedb serve``: the HTTP service (REST, OpenAI-compatible endpoints, dashboard) over the ``--db`` file.

One library call: :func:`moedb.server.create_app`, run by uvicorn. Needs the extra ``server``.
"""
from __future__ import annotations

import os
from typing import List, Optional

import typer

from ..errors import ConfigError
from .common import app, existing_db


@app.command()
def serve(ctx: typer.Context,
          host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
          port: int = typer.Option(8000, "--port", help="TCP port."),
          api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Name of the environment variable "
                                                    "holding the API key; then every request needs "
                                                    "`Authorization: Bearer <key>`."),
          cors_origin: List[str] = typer.Option(None, "--cors-origin", help="An origin browsers may call from "
                                                "(repeatable; CORS is off without it)."),
          readers: int = typer.Option(2, "--readers", help="Open connections serving reads at once."),
          max_body_mb: float = typer.Option(16.0, "--max-body-mb", help="Largest request body in MiB."),
          log_level: str = typer.Option("info", "--log-level", help="uvicorn's log level."),
          ) -> None:
    """Serve the database over HTTP: REST under /v1, OpenAI-compatible chat, a dashboard at /."""
    try:
        import uvicorn

        from ..server import create_app
    except ImportError as e:
        raise ConfigError(f"moedb serve needs the server extra ({e.name} is missing): "
                          "pip install 'moedb[server]'") from None
    key = None
    if api_key_env is not None:
        key = os.environ.get(api_key_env)
        if not key:
            raise ConfigError(f"--api-key-env: the environment variable {api_key_env!r} is not set or empty")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    if not max_body_mb > 0:
        raise ConfigError(f"--max-body-mb must be positive, got {max_body_mb}")
    path = existing_db(ctx.obj["db"])
    application = create_app(path, api_key=key, cors_origins=list(cors_origin or []), readers=readers,
                             max_body=int(max_body_mb * 1024 * 1024))
    typer.echo(f"moedb serve: {path} on http://{host}:{port} (dashboard at /, API under /v1"
               + (", API key required" if key else "") + ")", err=True)
    uvicorn.run(application, host=host, port=port, log_level=log_level)

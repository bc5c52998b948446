"""`clipsearch serve`: the HTTP API under uvicorn."""

from __future__ import annotations

from typing import Annotated

import typer

from retrieval.config import load_settings


def serve(
    host: Annotated[str | None, typer.Option(help="CLIPSEARCH_HOST: address to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="CLIPSEARCH_PORT: port to bind.")] = None,
    workers: Annotated[
        int, typer.Option("--workers", help="uvicorn worker processes (each loads the model).")
    ] = 1,
) -> None:
    """Run the HTTP API (uvicorn, factory api.app:create_app); settings come from CLIPSEARCH_*."""
    import uvicorn

    settings = load_settings(host=host, port=port)  # validates the environment before forking
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        log_level="info",
        timeout_graceful_shutdown=10,
    )

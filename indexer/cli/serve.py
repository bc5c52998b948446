"""`clipsearch serve`: the HTTP API under uvicorn."""

from __future__ import annotations

import errno
import os
import socket
from typing import Annotated

import typer

from indexer.cli.options import (
    DataDirOpt,
    DbOpt,
    DeviceOpt,
    IndexDirOpt,
    ModelOpt,
    PretrainedOpt,
    open_catalog,
    setting_help,
)
from indexer.cli.reading import index_model, require_data_dir, warn_if_empty
from retrieval.config import ENV_PREFIX, load_settings
from retrieval.errors import ConfigError
from retrieval.models.device import DEVICE_SETTING, check_device


def require_port_free(host: str, port: int, flag: str = "") -> None:
    """ConfigError naming the setting when nothing can listen on host:port (another server
    holds it, or the address is not this machine's), before any model is loaded."""
    setting = flag or "CLIPSEARCH_PORT"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigError("CLIPSEARCH_HOST", f"cannot resolve {host!r}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        # As uvicorn binds: a port whose old connections are in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    setting,
                    f"port {port} on {host} is in use by another process (another clipsearch "
                    "serve?); stop it, or choose another port with --port",
                ) from None
            raise ConfigError(
                setting, f"cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None


def serve(
    host: Annotated[
        str | None, typer.Option(help=setting_help("CLIPSEARCH_HOST", "address to bind"))
    ] = None,
    port: Annotated[
        int | None, typer.Option(help=setting_help("CLIPSEARCH_PORT", "port to bind"))
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", help="uvicorn worker processes (each loads the model).")
    ] = 1,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Run the HTTP API (uvicorn, factory api.app:create_app) on the index's model.

    Settings come from CLIPSEARCH_* and these flags. A busy port, a missing data dir and a model
    that is not the index's are refused before the model is loaded."""
    import uvicorn

    flags = {
        "data_dir": data_dir,
        "database_url": database_url,
        "index_dir": index_dir,
        "model": model,
        "pretrained": pretrained,
        "device": device,
    }
    # Validates the environment before forking, and checks what needs no model.
    settings = load_settings(host=host, port=port, **flags)
    require_port_free(settings.host, settings.port, "--port" if port is not None else "")
    require_data_dir(settings, from_flag=data_dir is not None)
    catalog = open_catalog(settings)
    try:
        warn_if_empty(catalog, settings.resolved_index_dir)
        index_model(settings, catalog)
    finally:
        catalog.dispose()
    check_device(settings.device, "--device" if device else DEVICE_SETTING)
    # The app reads its settings from the environment, in every worker process too.
    for name, value in flags.items():
        if value is not None:
            os.environ[ENV_PREFIX + name.upper()] = str(value)
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        log_level="info",
        timeout_graceful_shutdown=10,
        # Against slow and greedy clients (what each protects: api/server.py). The protocol
        # is named, not imported: the indexer package never imports the api package.
        http="api.server:HeaderTimeoutH11Protocol",
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_seconds,
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )

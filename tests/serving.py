"""Real `clipsearch` processes for end-to-end tests: a one-off command, or `serve` (start, wait
until ready, stop)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from retrieval.config import Settings

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    exit_code: int | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM (uvicorn's graceful shutdown); SIGKILL if it hangs. Returns the exit code."""
        if self.exit_code is not None:
            return self.exit_code
        self.proc.terminate()
        try:
            self.exit_code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.exit_code = self.proc.wait()
        return self.exit_code


def serve_env(settings: Mapping[str, str]) -> dict[str, str]:
    """The environment for the server: exactly `settings`, no CLIPSEARCH_* from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")}
    env.update(settings)
    return env


def run_cli(
    settings: Settings, *args: str, env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`clipsearch ARGS` in a fresh process, pointed at `settings`' catalog, data and model on
    the CPU; `env` adds or overrides variables (shard size, a crash point, ...)."""
    full_env = {
        **os.environ,
        "CLIPSEARCH_DATA_DIR": str(settings.data_dir),
        "CLIPSEARCH_DATABASE_URL": settings.resolved_database_url,
        "CLIPSEARCH_MODEL": settings.model,
        "CLIPSEARCH_PRETRAINED": settings.pretrained,
        "CLIPSEARCH_DEVICE": "cpu",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "indexer", *args],
        env=full_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_ready(
    server: ServeProcess, timeout_s: float = READY_TIMEOUT_S, route: str = "/ready"
) -> None:
    """Until `route` answers 200; RuntimeError with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(f"clipsearch serve exited early:\n{server.log()}")
            try:
                if client.get(route).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"clipsearch serve not ready after {timeout_s}s:\n{server.log()}"
                )
            time.sleep(0.3)


def wait_healthy(server: ServeProcess, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until the server answers /health (up, whether or not it has an index to serve)."""
    wait_ready(server, timeout_s, "/health")


def start_server(
    settings: Mapping[str, str], log_path: Path, args: Sequence[str] = ()
) -> ServeProcess:
    """`clipsearch serve ARGS` started (not yet ready) on a free local port with `settings`
    (CLIPSEARCH_* variables); several can start at once and load their models side by side."""
    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "indexer",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *args,
            ],
            cwd=REPO,
            env=serve_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return ServeProcess(proc, f"http://127.0.0.1:{port}", log_path)


@contextmanager
def running_server(
    settings: Mapping[str, str],
    log_path: Path,
    *,
    ready_timeout_s: float = READY_TIMEOUT_S,
    args: Sequence[str] = (),
) -> Iterator[ServeProcess]:
    """`clipsearch serve ARGS` on a free local port with `settings` (CLIPSEARCH_* variables)."""
    server = start_server(settings, log_path, args)
    try:
        wait_ready(server, ready_timeout_s)
        yield server
    finally:
        server.stop()

"""A Ray cluster on this machine for the benchmarks, and the processes a job runs in.

Used by bench/ray_overhead.py and bench/ray_faults.py. The cluster is started with
`ray start --head` in a temp dir of its own and stopped by killing its own processes (found by
that temp dir and their descendants), never by `ray stop`, which would stop every Ray cluster
of the user on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024**2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process now."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                # The command name may hold spaces and parentheses: the ppid follows the last ')'.
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(roots: list[int]) -> set[int]:
    """`roots` and every process below them."""
    tree = _children()
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(tree.get(pid, []))
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages divided among the processes that map them."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def auth_env() -> dict[str, str]:
    """Ray's token authentication with a token of our own: a cluster and its drivers agree on
    it whatever token file (~/.ray/auth_token) other Ray users on the machine write."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


class LocalRayCluster:
    """`ray start --head` on free ports in a temp dir of its own; `stop()` kills its processes.
    Drivers join it at `address` with `env` (its token) in their environment."""

    def __init__(self, num_cpus: int, env: dict[str, str]) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))  # short: socket paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        ray = Path(sys.executable).parent / "ray"
        env = {**os.environ, **env, "RAY_USAGE_STATS_ENABLED": "0"}
        try:
            self._start(ray, num_cpus, env)
        except BaseException:
            self.stop()
            raise

    def _start(self, ray: Path, num_cpus: int, env: dict[str, str]) -> None:
        subprocess.run(
            [
                str(ray),
                "start",
                "--head",
                f"--port={self.port}",
                f"--temp-dir={self.temp_dir}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                "--include-dashboard=false",
                f"--dashboard-port={free_port()}",
                "--disable-usage-stats",
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=180,
        )

    def roots(self) -> list[int]:
        """The cluster's own daemons (GCS, raylet, monitors): their command lines name the
        temp dir; agents and workers are their descendants."""
        marker = str(self.temp_dir)
        return [
            int(entry)
            for entry in os.listdir("/proc")
            if entry.isdigit() and marker in cmdline(int(entry))
        ]

    def pids(self) -> set[int]:
        return descendants(self.roots())

    def stop(self) -> None:
        raylets = {pid for pid in self.roots() if "/raylet " in cmdline(pid) + " "}
        for _ in range(3):
            # A worker the raylet was starting while we killed is reparented away: it still
            # names its raylet in its environment.
            pids = self.pids() | started_by(raylets)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def started_by(raylets: set[int]) -> set[int]:
    """Processes whose environment names one of `raylets` as their raylet (RAY_RAYLET_PID)."""
    wanted = {f"RAY_RAYLET_PID={pid}".encode() for pid in raylets}
    found = set()
    for entry in os.listdir("/proc") if wanted else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if wanted & set(handle.read().split(b"\0")):
                    found.add(int(entry))
        except OSError:
            continue
    return found


def worker_processes(pids: set[int]) -> dict[int, str]:
    """Among `pids`, Ray's worker processes that run clipsearch's work: Ray Data's decode tasks
    and encode actors (their `ray::` titles name the map_batches stage; idle workers, Ray's
    agents and Ray Data's own bookkeeping actors do not)."""
    found = {}
    for pid in pids:
        title = cmdline(pid)
        if title.startswith("ray::") and ("decode_batch" in title or "EncodeActor" in title):
            found[pid] = title
    return found


@dataclass
class MemoryPeak:
    """The peak, over samples, of the summed RSS and PSS of a changing set of processes."""

    rss: int = 0
    pss: int = 0
    driver_rss: int = 0
    processes: int = 0
    samples: int = 0


@dataclass
class MemorySampler:
    """Samples, every `interval` s in a thread, the processes under `roots()` (re-read each
    time: workers come and go)."""

    roots: Callable[[], list[int]]
    driver: int
    interval: float = 0.2
    peak: MemoryPeak = field(default_factory=MemoryPeak)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = descendants(self.roots())
            rss = sum(rss_bytes(pid) for pid in pids)
            peak = self.peak
            if rss > peak.rss:
                peak.rss = rss
                peak.processes = len(pids)
                peak.pss = max(peak.pss, sum(pss_bytes(pid) for pid in pids))
            peak.driver_rss = max(peak.driver_rss, rss_bytes(self.driver))
            peak.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

"""A real multi-node Ray cluster on this machine: a head and N worker nodes, each a `ray start --block` process of
its own (its own session, so it and everything it starts are stopped by its own process id), the Jobs API on
loopback, token authentication on. Nodes share no disk with the tests: data and outputs go through S3.

Never `ray stop`: other jobs may run Ray on the same machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil

from tests.s3server import free_port


def _free_block(size: int = 40, start: int = 21000, stop: int = 30000) -> int:
    """The first of ``size`` consecutive free ports (a node's worker ports), below the ephemeral range."""
    port = start + secrets.randbelow((stop - start) // size) * size
    for _ in range(50):
        if all(_port_free(p) for p in range(port, port + size)):
            return port
        port = start + secrets.randbelow((stop - start) // size) * size
    raise RuntimeError("no free block of worker ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    log: str

    def raylet_pid(self) -> int:
        for child in psutil.Process(self.process.pid).children(recursive=True):
            if child.name().startswith("raylet"):
                return child.pid
        raise RuntimeError(f"node {self.name}: no raylet process under pid {self.process.pid}")


@dataclass
class LocalRayCluster:
    env: dict  # the nodes' environment (S3 credentials, as a k8s Secret would give them)
    workers: int = 2
    cpus_per_worker: int = 1
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    nodes: list[Node] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)  # nodes this session killed (Ray marks them dead only later)

    def __post_init__(self):
        self.tmp = tempfile.mkdtemp(prefix="rkc", dir="/tmp")  # short: unix socket paths stay under 107 chars
        self.gcs_port, self.dashboard_port = free_port(), free_port()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def node_env(self) -> dict:
        env = {**os.environ, **self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
               "RAY_TRAIN_V2_ENABLED": "1", "RAY_USAGE_STATS_ENABLED": "0",
               # A dead node is noticed in about 3 s rather than 30 s.
               "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
               "RAY_health_check_timeout_ms": "1000",
               # Ray Train waits this long for a worker group before shrinking an elastic run onto what is left
               # (60 s by default, room for an autoscaler to bring a node back; nothing comes back here).
               "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
        env.pop("RAY_ADDRESS", None)
        # `python` on the nodes is this environment's, as it is the image's on a real cluster (jobs run `python -m`).
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        return env

    def _start(self, name: str, args: list[str]) -> Node:
        block = _free_block()
        cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--block", "--disable-usage-stats",
               "--node-ip-address", "127.0.0.1", "--min-worker-port", str(block),
               "--max-worker-port", str(block + 39), "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()), *args]
        log = os.path.join(self.tmp, f"{name}.log")
        with open(log, "w") as out:
            process = subprocess.Popen(cmd, env=self.node_env(), stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        node = Node(name, process, log)
        self.nodes.append(node)
        return node

    def start(self, timeout_s: float = 120.0) -> LocalRayCluster:
        self._start("head", ["--head", "--port", str(self.gcs_port), "--num-cpus", "0", "--temp-dir", self.tmp,
                             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(self.dashboard_port),
                             "--ray-client-server-port", str(free_port())])
        self._wait_for_jobs_api(timeout_s)
        for i in range(self.workers):  # one at a time: nodes starting together on one host race for its session
            self._start(f"worker{i}", ["--address", f"127.0.0.1:{self.gcs_port}",
                                       "--num-cpus", str(self.cpus_per_worker)])
            self.wait_for_nodes(i + 2, timeout_s)
        return self

    def _wait_for_jobs_api(self, timeout_s: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            request = urllib.request.Request(f"{self.address}/api/jobs/",
                                             headers={"Authorization": f"Bearer {self.token}"})
            try:
                with urllib.request.urlopen(request, timeout=5):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        raise RuntimeError(f"the head's Jobs API did not come up in {timeout_s} s; log: {self.nodes[0].log}")

    def alive_nodes(self) -> int:
        """Nodes the cluster counts as alive, from the Jobs API host's own view (the dashboard's node list)."""
        import json
        import urllib.request

        request = urllib.request.Request(f"{self.address}/nodes?view=summary",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            summary = json.loads(response.read())["data"]["summary"]
        return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")

    def wait_for_nodes(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if self.alive_nodes() >= count:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{count} Ray nodes not alive after {timeout_s} s; logs in {self.tmp}")

    def _check_alive(self) -> None:
        for node in self.nodes:
            if node.name in self.killed:
                continue  # lost on purpose
            if node.process.poll() is not None:
                with open(node.log) as f:
                    tail = f.read()[-1500:]
                raise RuntimeError(f"ray node {node.name} exited with {node.process.returncode}:\n{tail}\n"
                                   f"{self.diagnostics()}")

    def diagnostics(self) -> str:
        """The ends of the raylets' and the GCS's logs."""
        import glob

        parts = []
        for path in sorted(glob.glob(os.path.join(self.tmp, "session_latest", "logs", "*"))):
            if os.path.basename(path).startswith(("raylet", "gcs_server")) and path.endswith((".out", ".err")):
                with open(path, errors="replace") as f:
                    lines = f.readlines()
                fatal = [line for line in lines if " F " in line or "Check failed" in line]
                parts.append(f"== {os.path.basename(path)}\n{''.join(fatal[:5] + lines[-5:])[-1500:]}")
        return "\n".join(parts)

    def add_worker(self, timeout_s: float = 120.0) -> Node:
        """One more worker node (e.g. after a test killed one), started and alive before this returns."""
        node = self._start(f"worker{sum(n.name != 'head' for n in self.nodes)}",
                           ["--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", str(self.cpus_per_worker)])
        self.wait_for_nodes(len(self.alive_workers()) + 1, timeout_s)
        return node

    def alive_workers(self) -> list[Node]:
        """Worker nodes started and not killed by this session."""
        return [n for n in self.nodes if n.name != "head" and n.name not in self.killed]

    def kill_node(self, name: str) -> int:
        """Lose a node: its raylet killed by its process id (SIGKILL), as a machine going away."""
        node = next(n for n in self.nodes if n.name == name)
        pid = node.raylet_pid()
        os.kill(pid, signal.SIGKILL)
        self.killed.append(name)
        return pid

    def stop(self) -> None:
        """Every node by its own process id, then whatever is left of its process group."""
        for node in reversed(self.nodes):
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in reversed(self.nodes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.process.pid, signal.SIGKILL)  # the session we started it in: only its processes
        shutil.rmtree(self.tmp, ignore_errors=True)

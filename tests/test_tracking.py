"""MLflow tracking against a real MLflow tracking server on loopback (sqlite backend, artifacts in a folder),
started and stopped by the fixture by its own process id."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.s3server import free_ports

pytestmark = pytest.mark.integration
PASSWORD = "Trk-s3cr3t@pw"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_ports(1)[0]
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen([mlflow, "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                                   "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                                   "--port", str(port), "--workers", "1"],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(url, server, folder / "server.log")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the session it was started in: its own workers only
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)


def _wait_for_health(url: str, server: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after 180 s: {log.read_text()[-2000:]}")


def _client(url: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def _runs(url: str, out: str) -> list:
    client = _client(url)
    experiment = client.get_experiment_by_name("scalekd-tests")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`scalekd.out` = '{out}'")


def test_a_stage_logs_params_metrics_at_each_checkpoint_and_its_model_without_the_credentials(
        mlflow_server, tiny_cfg, tmp_path, monkeypatch, caplog):
    from scalekd.train.stage import StageRequest, run_stage

    authority = mlflow_server.replace("http://", f"http://tracker:{PASSWORD}@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", authority)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "scalekd-tests")
    out = str(tmp_path / "teacher")
    request = StageRequest("teacher", tiny_cfg.to_dict(), tiny_cfg.data.root, out)
    caplog.set_level(logging.DEBUG)
    run_stage(StageRequest(**{**request.to_dict(), "stop_at": 2}))  # stopped, then continued: one run
    run_stage(request)
    runs = _runs(mlflow_server, out)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["scalekd.stage"] == "teacher"
    assert run.data.params["train.teacher_iterations"] == str(tiny_cfg.train.teacher_iterations)
    history = _client(mlflow_server).get_metric_history(run.info.run_id, "loss/total")
    assert [m.step for m in history] == [2, 4]  # the tiny preset checkpoints every 2 of 4 iterations
    artifacts = {a.path for a in _client(mlflow_server).list_artifacts(run.info.run_id, "model")}
    assert artifacts == {"model/model.pt", "model/summary.json"}
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server  # the credentials left the URI, into memory
    assert PASSWORD not in caplog.text and PASSWORD not in str(run.data.params) + str(run.data.tags)
    for root, _, files in os.walk(out):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert PASSWORD.encode() not in f.read(), name


def test_the_evaluate_step_logs_each_model_s_metrics_and_the_report(mlflow_server, tmp_path, monkeypatch):
    from scalekd.tracking import log_evaluation

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "scalekd-tests")
    report = tmp_path / "report.md"
    report.write_text("| model | AP_S |\n")
    rows = [{"model": "plain", "AP_S": 20.5, "AP": 30.0, "model_uri": "s3://b/plain/model.pt"},
            {"model": "scalekd", "AP_S": 22.5, "AP": float("nan"), "model_uri": "s3://b/kd/model.pt"}]
    log_evaluation(str(tmp_path), "s3://b/data", rows, [str(report)])
    (run,) = _runs(mlflow_server, str(tmp_path))
    assert run.data.metrics == {"plain/AP_S": 20.5, "plain/AP": 30.0, "scalekd/AP_S": 22.5}  # NaN left out
    assert run.data.params["model.scalekd"] == "s3://b/kd/model.pt"
    assert [a.path for a in _client(mlflow_server).list_artifacts(run.info.run_id, "report")] == ["report/report.md"]


def test_a_tracking_server_that_fails_costs_the_stage_nothing_and_is_named_once(tiny_cfg, tmp_path, monkeypatch,
                                                                               caplog):
    from scalekd.train.stage import StageRequest, run_stage

    dead = f"http://tracker:{PASSWORD}@127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    caplog.set_level(logging.WARNING)
    summary = run_stage(StageRequest("teacher", tiny_cfg.to_dict(), tiny_cfg.data.root, str(tmp_path / "t")))
    assert summary["iterations"] == tiny_cfg.train.teacher_iterations
    warnings = [r.getMessage() for r in caplog.records if "MLflow" in r.getMessage()]
    assert len(warnings) == 1 and "127.0.0.1" in warnings[0] and PASSWORD not in caplog.text, warnings

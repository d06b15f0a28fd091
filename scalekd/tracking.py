"""Experiment tracking in MLflow, optional: with ``MLFLOW_TRACKING_URI`` set (and the client installed:
``pip install scalekd[mlflow]``), each training stage is one MLflow run (rank 0 only): its config as params, its
metrics at every checkpoint, its model and summary as artifacts; the evaluate step logs the comparison.

Tracking never costs a run: a tracking server that fails is reported once, naming the URI without credentials,
and that stage goes on untracked. Credentials in the URI (``https://user:password@host``) are split off once,
here, into MLflow's own ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (in memory), so no log line,
param or artifact carries them. A resumed stage continues its run (same output, same inputs key).
``MLFLOW_EXPERIMENT_NAME`` picks the experiment (default ``scalekd``). TensorBoard logs are written either way.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from scalekd import storage

log = logging.getLogger(__name__)
TRACKING_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_EXPERIMENT = "scalekd"
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value


def tracking_uri() -> str:
    """The tracking server's URI without credentials ('' when tracking is off); credentials in it move to MLflow's
    username/password variables, and the variable itself is rewritten to the clean URI."""
    uri = os.environ.get(TRACKING_ENV, "").strip()
    clean, credentials = storage.split_credentials(uri)
    if credentials is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = credentials
        os.environ[TRACKING_ENV] = clean
    return clean


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"distill.alpha": "0.01", ...}``: a nested config as MLflow params (strings, cut to MLflow's limit)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)[:_MAX_PARAM_CHARS]
    return out


class Tracker:
    """One MLflow run. Every call is guarded: the first failure is logged and turns tracking off for the run."""

    def __init__(self, client: Any, run_id: str, uri: str):
        self.client, self.run_id, self.uri = client, run_id, uri

    @classmethod
    def start(cls, run_name: str, tags: dict[str, str], params: dict[str, str]) -> Tracker | None:
        """A run on the configured server (resuming the unfinished one with the same tags), or None when tracking
        is off or the server fails."""
        uri = tracking_uri()
        if not uri:
            return None
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            log.warning("%s is set but MLflow is not installed (pip install scalekd[mlflow]); not tracking",
                        TRACKING_ENV)
            return None
        try:
            client = MlflowClient(tracking_uri=uri)
            run_id = _open_run(client, run_name, tags)
            tracker = cls(client, run_id, uri)
            tracker._call("log params", _log_params, params)
            return tracker
        except Exception as exc:  # any failure of the server or the client: the stage goes on untracked
            log.warning("MLflow at %s failed (%s); this run is not tracked", storage.redact(uri),
                        storage.redact(str(exc))[:300])
            return None

    def _call(self, what: str, fn, *args) -> None:
        if self.client is None:
            return
        try:
            fn(self.client, self.run_id, *args)
        except Exception as exc:  # tracking never stops training
            log.warning("MLflow at %s failed to %s (%s); tracking stops for this run", storage.redact(self.uri),
                        what, storage.redact(str(exc))[:300])
            self.client = None

    def log_metrics(self, values: dict, step: int) -> None:
        """The finite numbers of ``values`` at ``step`` (non-numbers and NaN/inf are left out)."""
        self._call("log metrics", _log_metrics, values, step)

    def log_artifact(self, uri: str, folder: str) -> None:
        """A file (local or ``s3://``) under ``folder`` of the run's artifacts."""
        self._call(f"log {uri}", _log_artifact, uri, folder)

    def finish(self, status: str = "FINISHED") -> None:
        self._call("end the run", lambda client, run_id: client.set_terminated(run_id, status=status))


def _open_run(client: Any, run_name: str, tags: dict[str, str]) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
    # The same stage (output and inputs key) continues its run: resumed after a failure, or run on to a later
    # stop (tune's rungs). A finished stage is reused before any run is opened.
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items() if "'" not in v)
    for run in client.search_runs([experiment_id], filter_string=query, max_results=1):
        client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    logged = client.get_run(run_id).data.params  # a resumed run has them already (params cannot change)
    todo = [Param(k, v) for k, v in params.items() if k not in logged]
    for start in range(0, len(todo), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=todo[start:start + 100])


def _log_metrics(client: Any, run_id: str, values: dict, step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(str(k), float(v), now, step) for k, v in values.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if metrics:
        client.log_batch(run_id, metrics=metrics)


def _log_artifact(client: Any, run_id: str, uri: str, folder: str) -> None:
    client.log_artifact(run_id, storage.cached_path(uri), folder)  # an S3 object through the local cache


def log_evaluation(workdir: str, data_root: str, rows: list[dict], files: list[str]) -> None:
    """The evaluate step's comparison as one MLflow run: each model's metrics as ``MODEL/METRIC``, and the report
    files as artifacts (nothing when tracking is off)."""
    tags = {"scalekd.stage": "evaluate", "scalekd.out": workdir}
    params = {"data": data_root, **{f"model.{row['model']}": str(row.get("model_uri", "")) for row in rows}}
    tracker = Tracker.start(f"evaluate {workdir}", tags, params)
    if tracker is None:
        return
    tracker.log_metrics({f"{row['model']}/{k}": v for row in rows for k, v in row.items()}, step=0)
    for uri in files:
        tracker.log_artifact(uri, "report")
    tracker.finish()

"""Run a stage under Ray Train: an in-process local Ray by default, or as a Ray job on an existing
cluster (KubeRay) when ``scaling.ray_address`` is set, following its logs until it ends."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import time

from scalekd import storage
from scalekd.config import Config
from scalekd.net import free_port
from scalekd.train import checkpoint as ckpt
from scalekd.train.keys import inputs_key
from scalekd.train.stage import StageHooks, StageRequest, TrainingError, completed_summary, run_stage

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster when inside a Ray job (RAY_ADDRESS), else start a private local Ray."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    # A short private temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp = os.environ.get("SCALEKD_RAY_TMP") or tempfile.mkdtemp(prefix="rk", dir="/tmp")
    # The dashboard serves Ray's State API, which Ray Train's PlacementGroupCleaner polls to free a dead
    # controller's resources (without it, that safety net fails with a warning every few seconds). On 127.0.0.1
    # and a free port, never 8265: another job's cluster on this machine may want it. About 3 s of start-up.
    # A free port can be taken by another process between our check and the dashboard's bind: then again, on another.
    for attempt in range(1, DASHBOARD_ATTEMPTS + 1):
        try:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=free_port(), _temp_dir=temp, log_to_driver=True, configure_logging=False)
            return
        except Exception as exc:
            taken = "address already in use" in str(exc) or "already occupied" in str(exc)  # Ray's two wordings
            if not taken or attempt == DASHBOARD_ATTEMPTS:
                raise
            ray.shutdown()
            log.info("the local Ray dashboard's port was taken before it bound (attempt %d); another port", attempt)


DASHBOARD_ATTEMPTS = 3


class RayTrainHooks(StageHooks):
    """Ray Train's view of a stage: every checkpoint is reported with ``ray.train.report(metrics, checkpoint)``
    (our atomic, weights-only file inside Ray's checkpoint directory, from rank 0; every rank reports, as Ray
    requires), so the run's ``Result`` carries metrics and its latest checkpoint, and a restored run (a worker
    or a node lost) resumes from ``ray.train.get_checkpoint()``."""

    FILE = "scalekd_checkpoint.pt"

    def restore(self) -> dict | None:
        import ray.train

        kept = ray.train.get_checkpoint()
        if kept is None:
            return None
        with kept.as_directory() as folder:
            path = os.path.join(folder, self.FILE)
            return ckpt.load(path) if os.path.exists(path) else None

    def checkpointed(self, iteration: int, metrics: dict, state: dict | None) -> None:
        import ray.train

        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="scalekd-ray-ckpt-") as folder:
            ckpt.save(state, os.path.join(folder, self.FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _worker_entry(config: dict) -> None:
    run_stage(StageRequest(**config), hooks=RayTrainHooks())


def run_with_ray_train(request: StageRequest, cfg: Config) -> dict:
    """Run the stage's worker loop on ``cfg.scaling.workers`` Ray Train workers; returns its summary."""
    init_ray()
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    s = cfg.scaling
    if not os.environ.get("RAY_ADDRESS"):
        _check_fits_this_machine(s)
    # Named from the output and the inputs, not a timestamp: a rerun of the same stage finds the same run (and its
    # checkpoints); other inputs at the same output get another.
    name = f"scalekd-{request.stage}-{hashlib.sha1((request.out + inputs_key(request)).encode()).hexdigest()[:12]}"
    storage_path, filesystem = ray_storage(request.out)
    # min_workers < workers: after a node is lost Ray restarts the group on what is left (elastic training).
    workers = s.workers if s.min_workers in (0, s.workers) else (s.min_workers, s.workers)
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config=request.to_dict(),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=s.gpu,  # type: ignore[arg-type]  # (min, max): elastic
                                     resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=s.max_failures)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        raise TrainingError(f"stage {request.stage} failed on Ray Train: {_root_message(exc)}") from None
    summary = json.loads(storage.read_text(storage.join(request.out, "summary.json")))
    ray_result = {"metrics": result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None,
                  "run": f"{storage_path}/{name}"}
    storage.write_json(storage.join(request.out, "ray_result.json"), ray_result)
    return {**summary, "ray": ray_result}


def _check_fits_this_machine(s) -> None:
    """A private local Ray has this machine's CPUs and GPUs and nothing will be added: a worker group that cannot
    fit would wait for resources forever, so it is refused (a cluster's autoscaler may add nodes: not checked)."""
    import ray

    fewest = s.min_workers or s.workers
    have = ray.cluster_resources()
    need = {"CPU": fewest * s.cpus_per_worker, "GPU": fewest if s.gpu else 0}
    short = [f"{need[r]:g} {r}s" for r in need if need[r] > have.get(r, 0)]
    if short:
        raise TrainingError(
            f"scaling.workers={s.workers} (at least {fewest}) x scaling.cpus_per_worker={s.cpus_per_worker}"
            f"{' with a GPU each' if s.gpu else ''} needs {' and '.join(short)}; this machine has "
            f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs. Use fewer workers (--workers), fewer CPUs "
            "per worker (--set scaling.cpus_per_worker=N), or a Ray cluster (--ray-address)")


def ray_storage(out: str) -> tuple[str, object | None]:
    """Where Ray Train keeps the run's checkpoints: beside an ``s3://`` output on the same endpoint (nodes share no
    disk on a real cluster), else the local cache; ``SCALEKD_RAY_STORAGE`` overrides either."""
    path = os.environ.get("SCALEKD_RAY_STORAGE") or (storage.join(out, "_ray") if storage.is_s3(out) else
                                                     os.path.join(storage.cache_dir(), "ray_results"))
    if storage.is_s3(path):
        return path[len("s3://"):], storage.arrow_filesystem()
    return path, None


def _root_message(exc: BaseException) -> str:
    failures = getattr(exc, "worker_failures", None)
    if failures:
        first = next(iter(failures.values()))
        return f"{type(first).__name__}: {first}"
    return f"{type(exc).__name__}: {exc}"


# Settings a submitted job needs on the cluster besides the installed package (the image): never credentials, which
# the cluster's nodes hold themselves (k8s: the scalekd-s3 Secret as env), so they never show in the job's record.
_JOB_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS", "SCALEKD_S3_CONNECT_TIMEOUT",
            "SCALEKD_S3_READ_TIMEOUT", "SCALEKD_S3_BUDGET_S", "SCALEKD_RAY_STORAGE", "MLFLOW_TRACKING_URI",
            "MLFLOW_EXPERIMENT_NAME")


def job_runtime_env() -> dict:
    """The job's ``runtime_env``: what it needs from here, by name. Credentials are not among them."""
    # Any URL among them goes without its user-info (MLflow's credentials, like S3's, are the cluster's own).
    env = {name: storage.split_credentials(os.environ[name])[0] for name in _JOB_ENV if os.environ.get(name)}
    env.update(RAY_TRAIN_V2_ENABLED="1", SCALEKD_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    return {"env_vars": env}


def _auth_env() -> None:
    """Token authentication for the client when a token is given (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token): Ray's SDK then sends it with every Jobs API call. The token itself is never logged."""
    from pathlib import Path

    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
        (Path.home() / ".ray" / "auth_token").exists()
    if has_token and os.environ.get("RAY_AUTH_MODE", "disabled") == "disabled":
        os.environ["RAY_AUTH_MODE"] = "token"
        from ray._raylet import Config  # type: ignore[attr-defined]  # compiled, without stubs

        Config.initialize("")  # Ray reads the mode into its config once; read it again


def job_client(address: str):
    """A Jobs API client for ``address``, with a named error when it cannot be reached or refuses us."""
    _auth_env()
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        client.list_jobs()  # the first authenticated call: a refused token shows here, not mid-run
        return client
    except Exception as exc:
        raise TrainingError(_job_api_error(address, exc)) from None


def _job_api_error(address: str, exc: Exception) -> str:
    text = str(exc)
    where = storage.redact(address)
    if "401" in text or "403" in text or "nauthori" in text or "uthenticat" in text:
        return (f"the Ray cluster at {where} refused the request: token authentication is on and no valid token "
                "was given; set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token")
    return (f"cannot reach the Ray Jobs API at {where} ({type(exc).__name__}); check --ray-address / "
            "scaling.ray_address (http://HEAD:8265) and that the head node's dashboard is up")


def submit_ray_job(request: StageRequest, address: str, poll_s: float = 2.0) -> dict:
    """Submit the stage as a Ray job to ``address`` (http://HEAD:8265), stream its logs to stderr and return the
    stage's summary; a failed job raises with its error message and the end of its logs."""
    payload = dict(request.to_dict())
    payload["config"] = {**payload["config"], "scaling": {**payload["config"]["scaling"], "ray_address": ""}}
    run_ray_job(address, "scalekd.train.ray_runner", payload, f"stage {request.stage}",
                {"scalekd_stage": request.stage, "out": request.out}, poll_s)
    return json.loads(storage.read_text(storage.join(request.out, "summary.json")))


def run_ray_job(address: str, module: str, payload: dict, what: str, metadata: dict, poll_s: float = 2.0) -> None:
    """``python -m module <payload as base64 JSON>`` as a Ray job on the cluster at ``address``: its logs streamed
    to stderr until it ends; a job that did not succeed raises with its message and the end of its log."""
    from ray.job_submission import JobStatus

    client = job_client(address)
    encoded = base64.b64encode(json.dumps(payload).encode()).decode()
    job_id = client.submit_job(entrypoint=f"python -m {module} {encoded}", runtime_env=job_runtime_env(),
                               metadata=metadata)
    log.info("submitted Ray job %s (%s) to %s", job_id, what, storage.redact(address))
    shown, logs = 0, ""
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        sys.stderr.write(logs[shown:])
        shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(poll_s)
    if status != JobStatus.SUCCEEDED:
        message = client.get_job_info(job_id).message or ""
        tail = "\n".join(logs.strip().splitlines()[-15:])
        raise TrainingError(f"Ray job {job_id} for {what} ended {status}: {message.strip()}\n"
                            f"last lines of its log:\n{tail}")


def launch(request: StageRequest, cfg: Config, use_ray: bool = True) -> dict:
    """The CLI's and components' entry: a job on a cluster, Ray Train locally, or a plain process. A stage that
    already finished at ``request.out`` with the same inputs is reused before any Ray starts."""
    done = completed_summary(request)
    if done is not None:
        log.info("%s: stage %s already complete with these inputs; reusing it", request.out, request.stage)
        return done
    from scalekd.outputs import held

    with held(request.out, f"stage {request.stage}"):  # one run per output folder
        if cfg.scaling.ray_address:
            return submit_ray_job(request, cfg.scaling.ray_address)
        if use_ray:
            # Ray Train workers run in their own working directory: relative local paths must be made
            # absolute here, where the user meant them (a cluster job gets its paths as given).
            return run_with_ray_train(_absolute_local_paths(request), cfg)
        return run_stage(request)


def _absolute_local_paths(request: StageRequest) -> StageRequest:
    return dataclasses.replace(request, data=storage.absolute(request.data), out=storage.absolute(request.out),
                               teacher=storage.absolute(request.teacher),
                               student_init=storage.absolute(request.student_init))


def main(argv: list[str]) -> int:
    """Entry point of a submitted Ray job: run the encoded stage request on this cluster."""
    from scalekd.config import config_from_dict

    request = StageRequest(**json.loads(base64.b64decode(argv[0])))
    run_with_ray_train(request, config_from_dict(request.config))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))

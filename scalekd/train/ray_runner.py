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
from scalekd.train.loop import StageRequest, TrainingError, run_stage

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
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=temp,
             log_to_driver=True, configure_logging=False)


def _worker_entry(config: dict) -> None:
    run_stage(StageRequest(**config))


def run_with_ray_train(request: StageRequest, cfg: Config) -> dict:
    """Run the stage's worker loop on ``cfg.scaling.workers`` Ray Train workers; returns its summary."""
    init_ray()
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    s = cfg.scaling
    # Named from the output URI, not a timestamp or Python's salted hash: a rerun finds the same run.
    name = f"scalekd-{request.stage}-{hashlib.sha1(request.out.encode()).hexdigest()[:10]}"
    storage_path = os.environ.get("SCALEKD_RAY_STORAGE") or os.path.join(storage.cache_dir(), "ray_results")
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config=request.to_dict(),
        scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=s.gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=s.max_failures)),
    )
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps the worker's error; surface its message
        raise TrainingError(f"stage {request.stage} failed on Ray Train: {_root_message(exc)}") from None
    return json.loads(storage.read_text(storage.join(request.out, "summary.json")))


def _root_message(exc: BaseException) -> str:
    failures = getattr(exc, "worker_failures", None)
    if failures:
        first = next(iter(failures.values()))
        return f"{type(first).__name__}: {first}"
    return f"{type(exc).__name__}: {exc}"


def submit_ray_job(request: StageRequest, address: str, poll_s: float = 2.0) -> dict:
    """Submit the stage as a Ray job to ``address`` (http://HEAD:8265) and stream its logs to stderr."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    payload = dict(request.to_dict())
    payload["config"] = {**payload["config"], "scaling": {**payload["config"]["scaling"], "ray_address": ""}}
    encoded = base64.b64encode(json.dumps(payload).encode()).decode()
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=f"python -m scalekd.train.ray_runner {encoded}",
                               metadata={"scalekd_stage": request.stage, "out": request.out})
    log.info("submitted Ray job %s to %s", job_id, address)
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        sys.stderr.write(logs[shown:])
        shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(poll_s)
    if status != JobStatus.SUCCEEDED:
        raise TrainingError(f"Ray job {job_id} for stage {request.stage} ended {status}; its logs are above")
    return json.loads(storage.read_text(storage.join(request.out, "summary.json")))


def launch(request: StageRequest, cfg: Config, use_ray: bool = True) -> dict:
    """The CLI's and components' entry: a job on a cluster, Ray Train locally, or a plain process."""
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

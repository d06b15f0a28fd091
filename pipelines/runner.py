"""Compile, run locally (kfp's SubprocessRunner), submit and schedule the pipelines; and the demo."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time

from pipelines import comparison, training, tuning

log = logging.getLogger(__name__)
COMPILED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compiled")
PIPELINES = {"training": training.build, "tune": tuning.build, "compare": comparison.build}


def compile_all(out: str = COMPILED_DIR) -> list[str]:
    """The cluster variants as YAML (committed; a test fails when they are stale)."""
    from kfp import compiler

    os.makedirs(out, exist_ok=True)
    paths = []
    for name, build in PIPELINES.items():
        path = os.path.join(out, f"{name}.yaml")
        compiler.Compiler().compile(build(cluster=True), path)
        paths.append(path)
    return paths


def _arguments(params: dict, preset: str) -> dict:
    from scalekd.config import ConfigError

    args = {"preset": preset, **params}
    for key, kind in [(k, int) for k in ("synth_images", "student_size", "teacher_iterations", "warmup_iterations",
                                         "distill_iterations", "workers", "trials", "rungs",
                                         "max_detections")] + [
            (k, float) for k in ("alpha", "beta", "gamma")]:
        if key in args:
            try:
                args[key] = kind(args[key])
            except (TypeError, ValueError):
                raise ConfigError(f"--param {key}", args[key], f"an {kind.__name__}" if kind is int
                                  else "a number") from None
    if "gpu" in args:
        args["gpu"] = str(args["gpu"]).lower() in ("1", "true", "yes")
    for key, kind in (("seeds", int), ("variants", str)):
        if isinstance(args.get(key), str):
            try:
                args[key] = [kind(v) for v in args[key].replace(",", " ").split()]
            except ValueError:
                raise ConfigError(f"--param {key}", args[key], "integers separated by commas") from None
    if "overrides" in args and isinstance(args["overrides"], str):
        args["overrides"] = [o for o in args["overrides"].split(";") if o]
    return args


def run_local(params: dict, preset: str = "demo", pipeline: str = "training", pipeline_root: str = "") -> dict:
    """Execute the real pipeline DAG with kfp's local SubprocessRunner (no cluster, no Docker). Without a
    ``ray_address`` its stages share one local Ray, started here once instead of once per component."""
    from kfp import local

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = pipeline_root or os.path.abspath(os.path.join(params.get("workdir", "runs/pipeline"), "kfp_local"))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root, raise_on_error=True)
    started = time.perf_counter()
    with _shared_local_ray(enabled=not params.get("ray_address")):
        PIPELINES[pipeline](cluster=False)(**_arguments(params, preset))
    return {"pipeline": pipeline, "pipeline_root": root, "wall_s": round(time.perf_counter() - started, 1)}


@contextlib.contextmanager
def _shared_local_ray(enabled: bool):
    """A local Ray for the components (subprocesses) to join through RAY_ADDRESS; stopped when the run ends."""
    if not enabled or os.environ.get("RAY_ADDRESS"):
        yield
        return
    import ray

    from scalekd.train.ray_runner import init_ray

    init_ray()
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    try:
        yield
    finally:
        del os.environ["RAY_ADDRESS"]
        ray.shutdown()


def _client(host: str):
    from kfp import Client

    return Client(host=host)


def submit(host: str, params: dict, experiment: str = "scalekd", preset: str = "demo",
           pipeline: str = "training") -> str:
    """Create one run on a Kubeflow Pipelines endpoint from the compiled cluster pipeline."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{pipeline}.yaml")
        from kfp import compiler

        compiler.Compiler().compile(PIPELINES[pipeline](cluster=True), path)
        result = _client(host).create_run_from_pipeline_package(
            path, arguments=_arguments(params, preset), run_name=f"scalekd-{pipeline}-{int(time.time())}",
            experiment_name=experiment, enable_caching=False)
    return result.run_id


def schedule(host: str, cron: str, params: dict, experiment: str = "scalekd", preset: str = "demo",
             pipeline: str = "training") -> str:
    """A recurring run (scheduled retraining). kfp cron has six fields, seconds first; one run at a time."""
    fields = cron.split()
    if len(fields) != 6:
        raise ValueError(f"--cron {cron!r}: Kubeflow Pipelines wants six fields, seconds first "
                         "(e.g. '0 0 3 * * *' for 03:00 daily)")
    client = _client(host)
    experiment_id = client.create_experiment(experiment).experiment_id
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{pipeline}.yaml")
        from kfp import compiler

        compiler.Compiler().compile(PIPELINES[pipeline](cluster=True), path)
        job = client.create_recurring_run(experiment_id, f"scalekd-{pipeline}-retrain", cron_expression=cron,
                                          max_concurrency=1, no_catchup=True, pipeline_package_path=path,
                                          params=_arguments(params, preset), enable_caching=False)
    return job.recurring_run_id


def demo(workdir: str = "runs/demo", preset: str = "demo") -> int:
    """The main job: the training pipeline on synthetic data, locally; then the results table."""
    from scalekd import storage

    workdir = os.path.abspath(workdir)
    print(f"scalekd demo: the training pipeline (kfp local runner, local Ray, preset '{preset}') in {workdir}",
          flush=True)
    result = run_local({"workdir": workdir}, preset=preset)
    metrics = json.loads(storage.read_text(os.path.join(workdir, "metrics.json")))["models"]
    cols = ("AP", "AP_S", "AP_M", "AP_L")
    header = f"{'model':<18}" + "".join(f"{c:>8}" for c in cols) + f"{'params(M)':>11}{'images/s':>10}"
    print("\n" + header)
    for row in metrics:
        values = "".join(f"{('-' if row[c] < 0 else f'{100 * row[c]:.1f}'):>8}" for c in cols)
        print(f"{row['model']:<18}{values}{row['params'] / 1e6:>11.2f}{row['images_per_s']:>10.1f}")
    print(f"\nreport with pictures: {os.path.join(workdir, 'report', 'report.md')}")
    print(f"exported student:     {os.path.join(workdir, 'export')}")
    print(f"wall time: {result['wall_s']:.0f} s")
    return 0

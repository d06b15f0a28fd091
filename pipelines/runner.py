"""Compile, run locally (kfp's SubprocessRunner), submit and schedule the pipelines; and the demo."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
import warnings

from pipelines import comparison, training, tuning

log = logging.getLogger(__name__)
COMPILED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compiled")
PIPELINES = {"training": training.build, "tune": tuning.build, "compare": comparison.build}


def compile_all(out: str = COMPILED_DIR) -> list[str]:
    """The cluster variants as YAML, each also as ``NAME-gpu.yaml`` (committed; a test fails when they are
    stale)."""
    from kfp import compiler

    os.makedirs(out, exist_ok=True)
    paths = []
    for name, build in PIPELINES.items():
        for gpu, suffix in ((False, ""), (True, "-gpu")):
            path = os.path.join(out, f"{name}{suffix}.yaml")
            compiler.Compiler().compile(build(cluster=True, gpu=gpu), path)
            paths.append(path)
    return paths


def gpu_pods(params: dict) -> bool:
    """Whether a cluster run compiles the GPU variant: ``gpu=true`` and no ``ray_address`` (with one, the pods only
    submit Ray jobs and the RayCluster's workers hold the GPUs)."""
    return str(params.get("gpu", "")).strip().lower() in ("true", "1", "yes") and not params.get("ray_address")


def _arguments(params: dict, preset: str, pipeline: str = "training", cluster: bool = False) -> dict:
    """The run's arguments, typed and checked here with the config's own rules before anything is sent, written
    or started: unknown parameters and presets, malformed numbers, a non-boolean gpu and overrides the config
    refuses all fail by name."""
    from scalekd import storage
    from scalekd.config import PRESETS, ConfigError
    from scalekd.params import parameter_names
    from scalekd.stages import config_from_params

    known = set(PIPELINES[pipeline](cluster=cluster, gpu=cluster and gpu_pods(params)).component_spec.inputs)
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"--param {unknown[0]}", params[unknown[0]], f"a parameter of the {pipeline} pipeline: "
                          f"{', '.join(sorted(known))}")
    if preset not in PRESETS:
        raise ConfigError("--preset", preset, f"one of {', '.join(PRESETS)}")
    args = {"preset": preset, **params}
    for key in ("synth_images", "trials", "rungs", "max_detections"):
        if key in args:
            args[key] = _number(key, args[key], int)
    for name in parameter_names():  # strings for kfp; typed and checked by config_from_params below
        if name in args:
            args[name] = "" if args[name] is None else str(args[name]).strip()
    for key, kind in (("seeds", int), ("variants", str)):
        if isinstance(args.get(key), str):
            try:
                args[key] = [kind(v) for v in args[key].replace(",", " ").split()]
            except ValueError:
                raise ConfigError(f"--param {key}", args[key], "integers separated by commas") from None
    if "overrides" in args and isinstance(args["overrides"], str):
        args["overrides"] = [o for o in args["overrides"].split(";") if o]
    for key in ("dataset_uri", "workdir"):
        if args.get(key):
            storage.is_s3(args[key])  # the one URI parser: refuses s4://, s3:/b, stray whitespace...
    config_from_params(preset, {k: v for k, v in args.items() if k in parameter_names()}, args.get("overrides", []))
    return args


def _number(key: str, value, kind: type):
    from scalekd.config import ConfigError

    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--param {key}", value, "an integer" if kind is int else "a number") from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"--param {key}", value, "a finite number >= 0")
    return number


# Kubeflow's cron: six fields, seconds first, each a number in range, '*', '?', a list, range or step of those,
# or a month or weekday name.
_CRON_RANGES = ((0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 6))
_CRON_NAMES = {"jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
               "sun", "mon", "tue", "wed", "thu", "fri", "sat"}


def check_cron(cron: str) -> None:
    from scalekd.config import ConfigError

    fields = cron.split()
    if len(fields) != 6:
        raise ConfigError("--cron", cron, "six fields, seconds first (e.g. '0 0 3 * * *' for 03:00 daily)")
    for field, (low, high) in zip(fields, _CRON_RANGES):
        for part in field.split(","):
            base, _, step = part.partition("/")
            values = [] if base in ("*", "?") else base.split("-")
            if step and not step.isdigit() or len(values) > 2 or not all(
                    v.lower() in _CRON_NAMES or (v.isdigit() and low <= int(v) <= high) for v in values):
                raise ConfigError("--cron", cron, f"'{field}' is not a cron field of {low}-{high}; six fields, "
                                  "seconds first (e.g. '0 0 3 * * *' for 03:00 daily)")


def run_local(params: dict, preset: str = "demo", pipeline: str = "training", pipeline_root: str = "") -> dict:
    """Execute the real pipeline DAG with kfp's local SubprocessRunner (no cluster, no Docker). Without a
    ``ray_address`` its stages share one local Ray, started here once instead of once per component."""
    from kfp import local

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = pipeline_root or os.path.abspath(os.path.join(params.get("workdir", "runs/pipeline"), "kfp_local"))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root, raise_on_error=True)
    started = time.perf_counter()
    with _shared_local_ray(enabled=not params.get("ray_address")), warnings.catch_warnings():
        # kfp's local runner warns, per task, that the components name an image it does not use and that display
        # names do nothing locally: running them in this environment, without a UI, is the point of the local run.
        warnings.filterwarnings("ignore", message="You may be attemp", category=RuntimeWarning, module="kfp.local")
        warnings.filterwarnings("ignore", message=r"Task '.*': settings \['display_name'\] have no effect",
                                category=UserWarning, module="kfp.local")
        PIPELINES[pipeline](cluster=False)(**_arguments(params, preset, pipeline))
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


class PipelineError(RuntimeError):
    """A Kubeflow Pipelines endpoint that cannot be reached, or that refused a request."""


@contextlib.contextmanager
def _endpoint(host: str):
    """Every call to a Kubeflow Pipelines API: a connection that fails (urllib3's errors after its retries) or an
    HTTP error answer becomes a PipelineError naming the endpoint (credentials redacted) and what it said."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    from scalekd.storage import redact

    try:
        yield
    except urllib3.exceptions.HTTPError as exc:
        reason = getattr(exc, "reason", None) or exc
        raise PipelineError(f"cannot reach the Kubeflow Pipelines API at {redact(host)}: {redact(str(reason))}; "
                            "check --host (the ml-pipeline service or your Kubeflow URL)") from None
    except TimeoutError as exc:  # kfp's Client: its health check answered with errors on every attempt
        raise PipelineError(f"the Kubeflow Pipelines API at {redact(host)} failed its health check ({exc}); check "
                            "--host and that your credentials may reach it") from None
    except ApiException as exc:
        raise PipelineError(f"the Kubeflow Pipelines API at {redact(host)} refused the request: HTTP {exc.status} "
                            f"{exc.reason}; {redact(str(exc.body or ''))[:300]}") from None


def _client(host: str):
    from kfp import Client

    return Client(host=host)


def submit(host: str, params: dict, experiment: str = "scalekd", preset: str = "demo",
           pipeline: str = "training") -> str:
    """Create one run on a Kubeflow Pipelines endpoint from the compiled cluster pipeline."""
    arguments = _arguments(params, preset, pipeline, cluster=True)  # checked before the endpoint is contacted
    with tempfile.TemporaryDirectory() as tmp, _endpoint(host):
        path = _compiled(pipeline, params, tmp)
        # enable_caching=None keeps each task's compiled choice (pipelines.tasks: cached only where content-addressed)
        result = _client(host).create_run_from_pipeline_package(
            path, arguments=arguments, run_name=f"scalekd-{pipeline}-{int(time.time())}",
            experiment_name=experiment, enable_caching=None)
    return result.run_id


def _compiled(pipeline: str, params: dict, folder: str) -> str:
    """The cluster pipeline compiled into ``folder``: the GPU variant where ``gpu_pods`` says so."""
    from kfp import compiler

    path = os.path.join(folder, f"{pipeline}.yaml")
    compiler.Compiler().compile(PIPELINES[pipeline](cluster=True, gpu=gpu_pods(params)), path)
    return path


def schedule(host: str, cron: str, params: dict, experiment: str = "scalekd", preset: str = "demo",
             pipeline: str = "training") -> str:
    """A recurring run (scheduled retraining). kfp cron has six fields, seconds first; one run at a time."""
    check_cron(cron)
    arguments = _arguments(params, preset, pipeline, cluster=True)
    with tempfile.TemporaryDirectory() as tmp, _endpoint(host):
        client = _client(host)
        experiment_id = client.create_experiment(experiment).experiment_id
        path = _compiled(pipeline, params, tmp)
        job = client.create_recurring_run(experiment_id, f"scalekd-{pipeline}-retrain", cron_expression=cron,
                                          max_concurrency=1, no_catchup=True, pipeline_package_path=path,
                                          params=arguments, enable_caching=None)
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

"""kfp: compile is reproducible and committed, the real DAG runs under kfp's local runner, and
submit/schedule send the right API calls to a recording HTTP server (no KFP cluster runs here)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import runner
from tests.kfp_fake import start

REPO = Path(__file__).resolve().parent.parent


def _spec(path) -> str:
    """The compiled YAML without kfp's header comment, whose dict defaults come in an order that varies between
    processes (the spec itself is sorted)."""
    return "\n".join(line for line in Path(path).read_text().splitlines() if not line.startswith("#"))


def test_compiled_yaml_is_committed_and_fresh(tmp_path):
    paths = runner.compile_all(str(tmp_path))
    for path in paths:
        committed = Path(runner.COMPILED_DIR) / Path(path).name
        assert committed.exists(), f"run `scalekd pipeline compile` and commit {committed}"
        assert _spec(committed) == _spec(path), f"{committed} is stale: run `scalekd pipeline compile` and commit it"
    again = runner.compile_all(str(tmp_path / "again"))
    assert [_spec(p) for p in again] == [_spec(p) for p in paths]


def test_components_run_in_the_project_image_without_installs():
    from components import IMAGE

    spec = yaml.safe_load_all((Path(runner.COMPILED_DIR) / "training.yaml").read_text())
    pipeline, platform = list(spec)
    executors = pipeline["deploymentSpec"]["executors"]
    assert len(executors) == 8  # distill runs twice: plain student (method none) and ScaleKD
    for name, ex in executors.items():
        container = ex["container"]
        assert container["image"] == IMAGE, name
        assert "pip install" not in " ".join(container["command"]), name
    tasks = pipeline["root"]["dag"]["tasks"]
    for name in ("train-teacher", "warmup-student", "distill", "distill-2"):
        assert tasks[name]["cachingOptions"] == {}, name  # caching off for training tasks
    secrets = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert all(e["secretAsEnv"][0]["secretName"] == "scalekd-s3" for e in secrets.values())
    assert {"dataset_uri", "alpha", "beta", "gamma", "ray_address", "workers", "gpu", "detector",
            "student_backbone", "teacher_backbone", "student_size"} <= set(
        pipeline["root"]["inputDefinitions"]["parameters"])


TRAINING_TASKS = {"training": ("train-teacher", "warmup-student", "distill", "distill-2"),
                  "tune": ("train-teacher", "warmup-student", "tune"), "compare": ("compare",)}


@pytest.mark.parametrize("name", sorted(TRAINING_TASKS))
@pytest.mark.parametrize("gpu", [False, True])
def test_the_compiled_pipeline_sizes_retries_caches_and_places_its_pods(name, gpu):
    """What a Kubeflow user looks for first, read from the committed YAML: requests and limits on every task (the
    training pods' from pipeline parameters), retries on training tasks, caching on only for the config, and in
    the GPU variant a GPU, the pool's node selector and toleration on the training tasks alone."""
    path = Path(runner.COMPILED_DIR) / f"{name}{'-gpu' if gpu else ''}.yaml"
    pipeline, platform = list(yaml.safe_load_all(path.read_text()))
    executors = pipeline["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    inputs = pipeline["root"]["inputDefinitions"]["parameters"]
    assert inputs["cpu_request"]["defaultValue"] == "2" and inputs["memory_limit"]["defaultValue"] == "16G"
    assert ("gpu_toleration" in inputs) == gpu and ("accelerator_type" in inputs) == gpu
    for task_name, task in pipeline["root"]["dag"]["tasks"].items():
        executor = task["componentRef"]["name"].replace("comp-", "exec-", 1)
        resources = executors[executor]["container"]["resources"]
        assert {"resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"} <= set(
            resources), task_name
        training = task_name in TRAINING_TASKS[name]
        assert ("retryPolicy" in task) == training, task_name
        assert task.get("cachingOptions", {}).get("enableCache", False) == (task_name in (
            "resolve-config", "evaluate", "export")), task_name
        if training:
            assert resources["resourceCpuRequest"] == "{{$.inputs.parameters['pipelinechannel--cpu_request']}}"
            assert task["retryPolicy"]["maxRetryCount"] == 2
        assert ("accelerator" in resources) == (gpu and training), task_name
        assert ("nodeSelector" in k8s[executor]) == (gpu and training), task_name
        assert ("tolerations" in k8s[executor]) == (gpu and training), task_name
        assert k8s[executor]["secretAsEnv"][0]["secretName"] == "scalekd-s3"  # never in the spec itself


@pytest.mark.parametrize("params, gpu", [({"gpu": "true"}, True), ({"gpu": "true", "ray_address": "http://h:8265"},
                                                                     False), ({}, False), ({"gpu": "false"}, False)])
def test_submit_picks_the_gpu_variant_only_for_gpu_pods_without_a_ray_cluster(params, gpu):
    assert runner.gpu_pods(params) is gpu


def test_training_pipeline_runs_locally_end_to_end(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "scalekd.cli", "pipeline", "run", "--local", "--preset", "tiny",
                           "--param", f"workdir={workdir}", "--param", "synth_images=12"],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, SCALEKD_NO_PROGRESS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    models = json.loads((workdir / "metrics.json").read_text())["models"]
    assert [m["model"] for m in models] == ["teacher", "plain student", "ScaleKD student"]
    assert models[1]["params"] == models[2]["params"] < models[0]["params"]
    for name in ("report.md", "ap_by_size.png", "pr_curves.png", "examples.png"):
        assert (workdir / "report" / name).stat().st_size > 100
    assert sorted(os.listdir(workdir / "export")) == ["manifest.json", "model.onnx", "model.torchscript.pt",
                                                      "model_card.json"]
    for stage in ("teacher", "warmup", "distill-none", "distill-scalekd"):
        assert (workdir / stage / "model.pt").exists()


def test_compare_pipeline_runs_locally_with_the_commands_parameters(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "scalekd.cli", "pipeline", "run", "--local", "--pipeline", "compare",
                           "--preset", "tiny", "--param", f"workdir={workdir}", "--param", "synth_images=12",
                           "--param", "seeds=0,1", "--param", "variants=plain", "--param", "max_detections=200"],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, SCALEKD_NO_PROGRESS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((workdir / "compare" / "report.json").read_text())
    # One variant keeps the test short (each stage starts Ray Train); tests/test_compare.py pairs several.
    assert list(doc["variants"]) == ["plain"] and doc["seeds"] == [0, 1]
    assert doc["max_detections"] == 200 and (workdir / "compare" / "report.md").stat().st_size > 100


def test_submit_and_schedule_call_the_kfp_api():
    server, recorder, url = start()
    try:
        assert runner.submit(url, {"dataset_uri": "s3://data/visdrone", "alpha": "0.02"}) == "run-1"
        method, path, body = recorder.calls[-1]
        assert (method, path) == ("POST", "/apis/v2beta1/runs")
        assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "scalekd-training"
        assert "kubernetes" in body["pipeline_spec"]["platform_spec"]["platforms"]
        params = body["runtime_config"]["parameters"]
        assert params["dataset_uri"] == "s3://data/visdrone" and params["alpha"] == "0.02"
        assert params["preset"] == "demo"
        recorder.calls.clear()
        assert runner.schedule(url, "0 0 3 * * *", {"dataset_uri": "s3://data/visdrone/latest"}) == "job-1"
        method, path, body = recorder.calls[-1]
        assert (method, path) == ("POST", "/apis/v2beta1/recurringruns")
        assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
        assert int(body["max_concurrency"]) == 1 and body["no_catchup"] is True
        with pytest.raises(ValueError, match="six fields"):
            runner.schedule(url, "0 3 * * *", {})
    finally:
        server.shutdown()


@pytest.mark.parametrize("value, expected", [("0", 0.0), ("", None), ("0.5", 0.5)])
def test_a_run_parameter_of_zero_is_zero_and_empty_keeps_the_preset(value, expected):
    """No sentinels: alpha=0 (the feature term off) reaches the config as 0; only an empty value means unset."""
    from scalekd.config import load_config
    from scalekd.stages import config_from_params

    args = runner._arguments({"alpha": value, "gpu": ""}, "tiny")
    cfg = config_from_params("tiny", {k: args[k] for k in ("alpha", "gpu")}, [])
    assert cfg.distill.alpha == (load_config(preset="tiny").distill.alpha if expected is None else expected)


@pytest.mark.parametrize("param, words", [("gpu=maybe", "--param gpu"), ("gpu=on", "--param gpu"),
                                          ("alpha=-0.1", "--param alpha"), ("workers=0", "--param workers"),
                                          ("student_size=12.5", "--param student_size")])
def test_a_run_parameter_out_of_range_is_refused_by_name(param, words):
    from scalekd.config import ConfigError

    name, _, value = param.partition("=")
    with pytest.raises(ConfigError, match=re.escape(words)):
        runner._arguments({name: value}, "tiny")


def test_a_run_parameter_added_to_the_list_appears_in_every_pipeline_and_check(monkeypatch):
    """The run parameters are listed once (scalekd.params); the pipelines, the runner's check and the config
    are built from that list."""
    from scalekd import params
    from scalekd.stages import config_from_params

    extended = (*params.RUN_PARAMETERS, params.RunParameter("lr", "train.lr", float))
    monkeypatch.setattr(params, "RUN_PARAMETERS", extended)
    for name, build in runner.PIPELINES.items():
        inputs = build(cluster=True).component_spec.inputs
        assert {p.name for p in extended} <= set(inputs), name
        assert all(inputs[p.name].type == "String" and inputs[p.name].default == "" for p in extended), name
    args = runner._arguments({"lr": "0.005"}, "tiny")
    assert config_from_params("tiny", {"lr": args["lr"]}, []).train.lr == 0.005


def test_latest_prefix_resolves_to_the_newest_dataset(tmp_path, synth_root):
    import shutil

    from scalekd.data.coco import DataError, resolve_root

    for day in ("2026-11-01", "2026-11-20", "2026-11-03"):
        shutil.copytree(synth_root, tmp_path / "drops" / day)
    assert resolve_root(str(tmp_path / "drops" / "latest")) == str(tmp_path / "drops" / "2026-11-20")
    assert resolve_root(str(tmp_path / "x")) == str(tmp_path / "x")
    with pytest.raises(DataError, match="no dataset"):
        resolve_root(str(tmp_path / "empty" / "latest"))


def test_dockerfile_installs_the_same_pins_as_the_venv():
    docker = (REPO / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert "pip install -r requirements.txt" in docker
    torch_pin = re.search(r"TORCH_VERSION=([\d.]+)", docker).group(1)
    assert f"torch=={torch_pin}+cpu" in makefile
    assert "requirements-dev.txt" in makefile and "-r requirements.txt" in (REPO / "requirements-dev.txt").read_text()
    assert "packages_to_install" not in "".join(p.read_text() for p in (REPO / "components").glob("*.py"))


@pytest.mark.parametrize("param, words", [
    ("workdir", "NAME=VALUE"), ("=x", "NAME=VALUE"), ("distill_iterations=ten", "--param distill_iterations"),
    ("alpha=high", "--param alpha"),
])
def test_malformed_pipeline_params_name_the_flag(param, words, capsys):
    from scalekd.cli import main

    assert main(["pipeline", "run", "--local", "--param", param]) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--param", "gpu=maybe"], "--param gpu"), (["--param", "gpu=2"], "--param gpu"),
    (["--param", "bogus=1"], "--param bogus"), (["--param", "alpha=nan"], "a finite number"),
    (["--param", "overrides=distill.alpah=0.1"], "distill.alpah"), (["--param", "dataset_uri=s4://b/x"], None),
    (["--preset", "huge"], "--preset"),
])
def test_submit_and_schedule_check_everything_locally_before_contacting_the_endpoint(argv, words, capsys):
    """The host is unreachable on purpose: a check that passed would fail on the connection instead."""
    from scalekd.cli import main

    for command in (["pipeline", "submit"], ["pipeline", "schedule", "--cron", "0 0 3 * * *"]):
        assert main([*command, "--host", "http://127.0.0.1:9", *argv]) == 2
        err = capsys.readouterr().err
        assert (words or "") in err and "127.0.0.1:9" not in err


@pytest.mark.parametrize("cron", ["99 99 99 banana * *", "0 0 3 * *", "0 61 3 * * *", "0 0 3 * 13 *", "0 0 3/x * * *"])
def test_a_cron_kubeflow_would_refuse_is_refused_here(cron, capsys):
    from scalekd.cli import main

    assert main(["pipeline", "schedule", "--host", "http://127.0.0.1:9", "--cron", cron]) == 2
    assert "--cron" in capsys.readouterr().err


@pytest.mark.parametrize("cron", ["0 0 3 * * *", "0 */15 * * * ?", "0 0 3 1-5 jan,jul mon-fri", "30 5 2 1 1 0"])
def test_ordinary_crons_pass(cron):
    runner.check_cron(cron)


def _refusing_server(status: int):
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "forbidden by policy"}')

        do_GET = do_POST = _answer

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("command", [["pipeline", "submit"], ["pipeline", "schedule", "--cron", "0 0 3 * * *"]])
def test_an_unreachable_or_refusing_kfp_endpoint_is_one_line_naming_it_without_credentials(command, capsys):
    from scalekd.cli import main

    assert main([*command, "--host", "http://admin:s3cret@127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Kubeflow Pipelines API at http://***@127.0.0.1:9" in err
    assert "s3cret" not in err and "Traceback" not in err and err.count("\n") == 1
    server = _refusing_server(403)
    host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert main([*command, "--host", host]) == 2
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert f"the Kubeflow Pipelines API at {host} failed its health check" in err and "Traceback" not in err

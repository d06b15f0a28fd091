"""The cluster path, for real: a head and two worker nodes (separate `ray start` processes), the Jobs API on
loopback with token authentication on, data and outputs on the SeaweedFS S3 server (nodes share no disk).

The node-loss tests (a distillation and a tune search that each lose a worker node) are the heaviest of the suite:
`pytest --skip-heavy-cluster` skips them locally; CI runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from scalekd import storage
from tests.raycluster import LocalRayCluster, free_port


# Under pytest-xdist (`make test`): one worker starts the three-node cluster and trains the S3 models once.
pytestmark = pytest.mark.xdist_group("cluster")


def _env(s3: dict, **extra) -> dict:
    env = {**os.environ, "SCALEKD_NO_PROGRESS": "1", "AWS_ENDPOINT_URL": s3["endpoint"],
           "AWS_ACCESS_KEY_ID": s3["key"], "AWS_SECRET_ACCESS_KEY": s3["secret"], "AWS_DEFAULT_REGION": "us-east-1"}
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(name, None)
    env["RAY_AUTH_MODE"] = "disabled"
    env.update(extra)
    return env


def _cli(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalekd.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def cluster(s3_server):
    node_env = {"AWS_ENDPOINT_URL": s3_server["endpoint"], "AWS_ACCESS_KEY_ID": s3_server["key"],
                "AWS_SECRET_ACCESS_KEY": s3_server["secret"], "AWS_DEFAULT_REGION": "us-east-1"}
    ray_cluster = LocalRayCluster(env=node_env, workers=2, cpus_per_worker=1)
    try:
        yield ray_cluster.start()
    finally:
        ray_cluster.stop()


@pytest.fixture(scope="module")
def s3_models(s3_server):
    """A tiny synthetic dataset, teacher and warm student in S3 (trained here without Ray: they are inputs)."""
    env = _env(s3_server)
    prefix = f"s3://{s3_server['bucket']}/cluster"
    steps = [["data", "synth", f"{prefix}/data", "--images", "16", "--size", "128"],
             ["train-teacher", "--preset", "tiny", "--data", f"{prefix}/data", "--out", f"{prefix}/teacher",
              "--no-ray"],
             ["warmup", "--preset", "tiny", "--data", f"{prefix}/data", "--out", f"{prefix}/warmup", "--no-ray"]]
    for args in steps:
        done = _cli(args, env)
        assert done.returncode == 0, done.stderr[-3000:]
    return {"data": f"{prefix}/data", "teacher": f"{prefix}/teacher/model.pt", "student": f"{prefix}/warmup/model.pt"}


def _distill_args(models: dict, out: str, address: str, *extra: str) -> list[str]:
    return ["distill", "--preset", "tiny", "--data", models["data"], "--out", out, "--teacher", models["teacher"],
            "--student", models["student"], "--ray-address", address, *extra]


def test_submission_without_the_token_is_refused(cluster, s3_server, s3_models):
    out = f"s3://{s3_server['bucket']}/cluster/refused"
    for env in (_env(s3_server), _env(s3_server, RAY_AUTH_TOKEN="0" * 64)):
        done = _cli(_distill_args(s3_models, out, cluster.address), env, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "token authentication is on" in done.stderr and cluster.address in done.stderr
        assert cluster.token not in done.stderr + done.stdout
    assert not storage_exists(s3_server, "cluster/refused/summary.json")


def test_unreachable_jobs_api_is_a_named_error(s3_server, s3_models):
    address = f"http://127.0.0.1:{free_port()}"
    done = _cli(_distill_args(s3_models, f"s3://{s3_server['bucket']}/cluster/nowhere", address),
                _env(s3_server, RAY_AUTH_TOKEN="x" * 64), timeout=120)
    assert done.returncode == 2
    assert f"cannot reach the Ray Jobs API at {address}" in done.stderr


@pytest.mark.heavy_cluster
def test_distill_across_two_nodes_survives_losing_one(cluster, s3_server, s3_models):
    """Two Ray Train workers, one per node, DDP over gloo, S3 to S3; a node's raylet is killed mid-run and the run
    goes on from the last checkpoint on the remaining node (elastic: min_workers 1)."""
    out = f"s3://{s3_server['bucket']}/cluster/distill"
    args = _distill_args(s3_models, out, cluster.address, "--workers", "2", "--set", "scaling.min_workers=1",
                         "--set", "scaling.cpus_per_worker=1", "--set", "train.distill_iterations=80",
                         "--set", "train.checkpoint_interval=20", "--set", "train.log_interval=5")
    started = time.monotonic()
    job = subprocess.Popen([sys.executable, "-m", "scalekd.cli", *args], env=_env(s3_server,
                           RAY_AUTH_TOKEN=cluster.token), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = _wait_for_checkpoint(s3_server, "cluster/distill/checkpoints/", job, timeout_s=300)
        killed_at, killed_wall = time.monotonic(), time.time()
        cluster.kill_node("worker1")
        output, _ = job.communicate(timeout=540)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-5000:]
    summary = json.loads(storage_read(s3_server, "cluster/distill/summary.json"))
    tiny_warmup = 2  # the tiny preset's assistant-only iterations come first
    assert summary["iterations"] == 80 + tiny_warmup
    assert summary["resumed_from"] >= first  # iterations continued from a checkpoint, not from 0
    assert summary["workers"] == 1  # the run went on with the node that was left
    ray_result = json.loads(storage_read(s3_server, "cluster/distill/ray_result.json"))
    assert ray_result["checkpoint"] and ray_result["metrics"]["iteration"] == 80 + tiny_warmup
    keys = list_keys(s3_server, "cluster/distill/")
    assert "cluster/distill/model.pt" in keys and not [k for k in keys if k.endswith(".tmp")]
    assert any("/_ray/" in k and k.endswith("scalekd_checkpoint.pt") for k in keys)  # Ray's own, on S3
    lines = [json.loads(line) for line in storage_read(s3_server, "cluster/distill/metrics.jsonl").splitlines()]
    assert lines[0]["iteration"] <= first < lines[-1]["iteration"]  # the log kept what came before the loss
    resumed = next(line for line in lines if line["time"] > killed_wall)
    figures = {"wall_s": round(time.monotonic() - started, 1), "after_loss_s": round(time.monotonic() - killed_at, 1),
               "first_checkpoint": first, "resumed_from": summary["resumed_from"],
               "first_log_after_loss_s": round(resumed["time"] - killed_wall, 1),
               "it_per_s_two_nodes": next(line["it_per_s"] for line in reversed(lines) if line["time"] < killed_wall),
               "it_per_s_after": lines[-1]["it_per_s"]}
    print("node-loss run:", json.dumps(figures))
    print("\n".join(line for line in output.splitlines() if "Controller" in line or "resuming" in line)[-4000:])


def test_a_pipeline_component_runs_its_stage_as_a_job_on_the_cluster(cluster, s3_server, s3_models, monkeypatch):
    """The kfp component -> Ray job path under kfp's local runner: the pipeline's own config, data and teacher
    components, the teacher submitted to the cluster. Every training component calls the same
    ``scalekd.stages.train``, so one stands for all (the whole pipeline runs end to end in test_pipeline, on the
    local Ray; the distill stage runs as a job across two nodes in the node-loss test). One job instead of the
    whole pipeline's four: the whole pipeline here was 224 s of the suite's 16 minutes."""
    from kfp import dsl, local

    from components.config import resolve_config
    from components.prepare_data import prepare_data
    from components.train_teacher import train_teacher

    for name, value in _env(s3_server, RAY_AUTH_TOKEN=cluster.token).items():
        if name.startswith(("AWS_", "RAY_", "SCALEKD_")):
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    workdir = f"s3://{s3_server['bucket']}/cluster/component"

    @dsl.pipeline(name="teacher-on-the-cluster")
    def teacher_on_the_cluster():
        config = resolve_config(preset="tiny", params={"ray_address": cluster.address},
                                overrides=[]).outputs["config"]
        data = prepare_data(config=config, dataset_uri=s3_models["data"], workdir=workdir, synth_images=0)
        train_teacher(config=config, dataset=data.outputs["dataset"], workdir=workdir).set_caching_options(False)

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(cluster.tmp) + "/kfp",
               raise_on_error=True)
    teacher_on_the_cluster()
    # The cluster's own record (its Jobs API over HTTP: no Ray client in this process, whose auth mode would stay).
    request = urllib.request.Request(f"{cluster.address}/api/jobs/",
                                     headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        jobs = json.loads(response.read())
    ours = [j for j in jobs if (j.get("metadata") or {}).get("out") == f"{workdir}/teacher"]
    assert [(j["metadata"]["scalekd_stage"], j["status"]) for j in ours] == [("teacher", "SUCCEEDED")]
    assert storage_exists(s3_server, "cluster/component/teacher/model.pt")
    assert storage_exists(s3_server, "cluster/component/teacher/ray_result.json")  # Ray Train ran it, on the cluster


def test_a_tune_search_runs_as_a_job_with_its_trials_on_the_worker_nodes(cluster, s3_server, s3_models):
    """`scalekd tune --ray-address`: S3 to S3 with token auth; each trial reserves one CPU and the head has none,
    so two trials at once must run on the two worker nodes, and each trial records the node it ran on."""
    out = f"s3://{s3_server['bucket']}/cluster/tune"
    done = _cli(["tune", "--preset", "tiny", "--data", s3_models["data"], "--teacher", s3_models["teacher"],
                 "--student", s3_models["student"], "--out", out, "--trials", "4", "--rungs", "1",
                 "--ray-address", cluster.address], _env(s3_server, RAY_AUTH_TOKEN=cluster.token), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(s3_server["client"].get_object(Bucket=s3_server["bucket"],
                                                        Key="cluster/tune/results.json")["Body"].read())
    nodes = [trial["node_id"] for trial in results["trials"]]
    # The node-loss test, when it ran first, leaves one worker; counted from what was killed, not from Ray's node
    # list, which may still show a killed node alive for a while after its raylet died.
    workers_alive = cluster.workers - len(cluster.killed)
    assert len(nodes) == 4 and all(nodes) and len(set(nodes)) == min(2, workers_alive), nodes
    assert storage_exists(s3_server, "cluster/tune/best.yaml")
    assert any(k.startswith("cluster/tune/experiment/") for k in list_keys(s3_server, "cluster/tune/experiment/"))


@pytest.mark.heavy_cluster
def test_a_tune_search_survives_losing_a_worker_node(cluster, s3_server, s3_models, tmp_path):
    """A worker node is lost while every worker runs a trial that has checkpointed: Tune restarts the lost trial
    (FailureConfig) on a node that is left, its stage resumes from its checkpoint in S3, and the search completes
    with every trial reporting every rung."""
    spare = cluster.add_worker()  # two workers alive, whatever the node-loss test before this one left
    prefix = "cluster/tune-node-loss"
    args = ["tune", "--preset", "tiny", "--data", s3_models["data"], "--teacher", s3_models["teacher"],
            "--student", s3_models["student"], "--out", f"s3://{s3_server['bucket']}/{prefix}", "--trials", "4",
            "--rungs", "2", "--set", "train.distill_iterations=40", "--ray-address", cluster.address]
    log = tmp_path / "tune.log"
    with open(log, "w") as out:  # a file, not a pipe: nobody reads the output until the search ends
        job = subprocess.Popen([sys.executable, "-m", "scalekd.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                               env=_env(s3_server, RAY_AUTH_TOKEN=cluster.token), text=True)
    try:
        _wait_for_trials_with_a_checkpoint(s3_server, f"{prefix}/trials/", len(cluster.alive_workers()), job, 300)
        cluster.kill_node(spare.name)  # every worker runs a trial (4 trials, 1 CPU each): the spare's is lost
        job.wait(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
    output = log.read_text()
    assert job.returncode == 0, output[-5000:]
    trials = json.loads(storage_read(s3_server, f"{prefix}/results.json"))["trials"]
    assert len(trials) == 4 and all(t["iteration"] == 40 for t in trials), trials
    restarted = [t for t in trials if t["attempts"] > 1]
    assert restarted, trials
    print("tune node loss:", json.dumps([{k: t[k] for k in ("attempts", "restored_after_rung", "node_id")}
                                         for t in trials]))


def _wait_for_trials_with_a_checkpoint(s3: dict, prefix: str, count: int, job: subprocess.Popen,
                                       timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if job.poll() is not None:
            raise AssertionError("the search ended before its trials checkpointed")
        trials = {key[len(prefix):].split("/", 1)[0] for key in list_keys(s3, prefix) if "/checkpoints/iter_" in key}
        if len(trials) >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"fewer than {count} trials under {prefix} checkpointed in {timeout_s} s")


def test_tune_refuses_flags_it_cannot_honour(s3_server, tmp_path):
    env = _env(s3_server)
    base = ["tune", "--preset", "tiny", "--teacher", "t.pt", "--student", "s.pt"]
    for extra, words in ((["--out", str(tmp_path / "o"), "--workers", "0"], "scaling.workers"),
                         (["--out", str(tmp_path / "o"), "--workers", "64"], "--workers"),  # more than this machine
                         (["--out", "s3:/bucket/o"], "not an S3 URI"),
                         (["--out", str(tmp_path / "o"), "--ray-address", "http://127.0.0.1:9"], "s3:// URI"),
                         (["--out", str(tmp_path / "o"), "--cpus-per-trial", "0"], "--cpus-per-trial")):
        done = _cli(base + extra, env, timeout=120)
        assert done.returncode == 2 and words in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def _wait_for_checkpoint(s3: dict, prefix: str, job: subprocess.Popen, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if job.poll() is not None:
            raise AssertionError(f"the job ended before its first checkpoint:\n{job.stdout.read()[-4000:]}")
        iterations = [int(k.rsplit("iter_", 1)[1][:7]) for k in list_keys(s3, prefix) if "iter_" in k]
        if iterations:
            return max(iterations)
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint under {prefix} after {timeout_s} s")


def list_keys(s3: dict, prefix: str) -> list[str]:
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def storage_read(s3: dict, key: str) -> str:
    return s3["client"].get_object(Bucket=s3["bucket"], Key=key)["Body"].read().decode()


def storage_exists(s3: dict, key: str) -> bool:
    return key in list_keys(s3, key)


def test_s3_down_during_a_checkpoint_write_is_retried_then_named_and_the_last_checkpoint_survives(
        s3, tiny_cfg, monkeypatch):
    from scalekd.train import checkpoint as ckpt
    from scalekd.train.stage import StageRequest, run_stage

    out = f"s3://{s3['bucket']}/cluster/s3-down"
    run_stage(StageRequest("teacher", tiny_cfg.to_dict(), tiny_cfg.data.root, out, stop_at=2))
    kept = ckpt.latest_checkpoint(out)
    assert kept and kept.endswith("iter_0000002.pt")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # the endpoint goes away
    monkeypatch.setenv("SCALEKD_S3_BUDGET_S", "3")
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint") as caught:
        ckpt.save({"iteration": 4}, ckpt.checkpoint_uri(out, 4))
    assert "iter_0000004.pt" in str(caught.value) and time.monotonic() - started < 30
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint"])  # back: the previous checkpoint is intact
    assert ckpt.latest_checkpoint(out) == kept and ckpt.load(kept)["iteration"] == 2


def test_a_job_names_what_it_needs_but_never_the_credentials(monkeypatch):
    from scalekd.train.ray_runner import job_runtime_env

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.internal:8333")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-NOT-IN-JOBS")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-not-in-jobs")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "token-not-in-jobs")
    env = job_runtime_env()["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == "http://s3.internal:8333" and env["RAY_TRAIN_V2_ENABLED"] == "1"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"} & set(env)
    assert "not-in-jobs" not in json.dumps(env)

"""The distill stage as a Ray job on a real multi-node cluster on this machine (a head + worker nodes, token auth,
data and outputs on a SeaweedFS S3 server): iterations/s with 1 node x 2 CPUs (one worker) against 2 nodes x 1 CPU
(two DDP workers), same preset, same data.

    python benchmarks/cluster.py [--preset demo] [--iterations 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import table, write_json  # noqa: E402
from tests.raycluster import LocalRayCluster  # noqa: E402
from tests.s3server import SeaweedS3  # noqa: E402

KEY, SECRET, BUCKET = "bench-key", "bench-secret-value", "bench"


def cli(args: list[str], env: dict) -> None:
    done = subprocess.run([sys.executable, "-m", "scalekd.cli", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"scalekd {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")


def inputs(preset: str, env: dict) -> dict:
    """Data, a briefly trained teacher and warm student in S3 (what they learned does not matter for speed)."""
    prefix = f"s3://{BUCKET}/cluster-bench"
    cli(["data", "synth", f"{prefix}/data", "--images", "64", "--size", "128"], env)
    short = ["--set", "train.teacher_iterations=2", "--set", "train.warmup_iterations=2", "--no-ray"]
    cli(["train-teacher", "--preset", preset, "--data", f"{prefix}/data", "--out", f"{prefix}/teacher", *short], env)
    cli(["warmup", "--preset", preset, "--data", f"{prefix}/data", "--out", f"{prefix}/warmup", *short], env)
    return {"data": f"{prefix}/data", "teacher": f"{prefix}/teacher/model.pt", "student": f"{prefix}/warmup/model.pt"}


def run(layout: str, nodes: int, cpus: int, preset: str, iterations: int, models: dict, s3_env: dict) -> dict:
    cluster = LocalRayCluster(env=s3_env, workers=nodes, cpus_per_worker=cpus).start()
    try:
        out = f"s3://{BUCKET}/cluster-bench/{layout}"
        env = {**os.environ, **s3_env, "RAY_AUTH_TOKEN": cluster.token, "RAY_AUTH_MODE": "disabled"}
        started = time.perf_counter()
        cli(["distill", "--preset", preset, "--data", models["data"], "--out", out, "--teacher", models["teacher"],
             "--student", models["student"], "--ray-address", cluster.address, "--workers", str(nodes),
             "--set", f"scaling.cpus_per_worker={cpus}", "--set", f"train.distill_iterations={iterations}",
             "--set", "distill.csa.warmup_iterations=0", "--set", "train.checkpoint_interval=50"], env)
        wall = time.perf_counter() - started
    finally:
        cluster.stop()
    import boto3

    s3 = boto3.session.Session().client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], aws_access_key_id=KEY,
                                        aws_secret_access_key=SECRET, region_name="us-east-1")
    summary = json.loads(s3.get_object(Bucket=BUCKET, Key=f"cluster-bench/{layout}/summary.json")["Body"].read())
    return {"layout": layout, "workers": summary["workers"], "it_per_s": summary["it_per_s"],
            "images_per_s": round(summary["it_per_s"] * summary["workers"] * 4, 2), "job_wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--iterations", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, SeaweedS3(Path(tmp) / "s3", KEY, SECRET, BUCKET) as endpoint:
        s3_env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                  "AWS_DEFAULT_REGION": "us-east-1", "SCALEKD_CACHE_DIR": os.path.join(tmp, "cache")}
        models = inputs(args.preset, {**os.environ, **s3_env})
        rows = [run("1 node x 2 CPUs", 1, 2, args.preset, args.iterations, models, s3_env),
                run("2 nodes x 1 CPU", 2, 1, args.preset, args.iterations, models, s3_env)]
    print(f"distill stage, preset {args.preset}, {args.iterations} iterations, batch 4 per worker, ScaleKD")
    print(table(rows, ["layout", "workers", "it_per_s", "images_per_s", "job_wall_s"]))
    print(write_json("cluster.json", {"preset": args.preset, "iterations": args.iterations, "rows": rows}))


if __name__ == "__main__":
    main()

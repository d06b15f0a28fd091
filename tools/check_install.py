"""Fail the install when it pulled a CUDA torch or nvidia-* wheels onto a CPU host, broke pins, or cannot start a
Ray head node with the Jobs API (what `--ray-address` submission and KubeRay's RayJob need)."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from scalekd.net import free_port

PINS = {"torch": "2.13.0", "torchvision": "0.28.0", "ray": "2.60.0", "kfp": "2.17.3"}


def main() -> int:
    problems = []
    nvidia = sorted(d.metadata["Name"] for d in md.distributions()
                    if d.metadata["Name"] and d.metadata["Name"].lower().startswith("nvidia-"))
    if nvidia:
        problems.append(f"nvidia wheels installed: {', '.join(nvidia)} (pin torch==2.13.0+cpu first)")
    for name, want in PINS.items():
        have = md.version(name)
        if have.split("+")[0] != want:
            problems.append(f"{name} is {have}, pinned {want}")
    import torch
    import torchvision.ops

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])
    torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
    problems += jobs_api_problems()
    if problems:
        print("install check failed:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"install check: torch {torch.__version__} (cuda={torch.version.cuda}), "
          f"torchvision {md.version('torchvision')}, no nvidia wheels, a Ray head with the Jobs API starts")
    return 0


def jobs_api_problems(timeout_s: float = 90.0) -> list[str]:
    """Start a Ray head (its own process group, loopback only), wait for the Jobs API to answer, stop it by its id."""
    tmp = tempfile.mkdtemp(prefix="rkchk", dir="/tmp")
    port = free_port()
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray, "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
           "--port", str(free_port()), "--num-cpus", "0", "--temp-dir", tmp, "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(port),
           "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
           "--ray-client-server-port", str(free_port())]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(os.path.join(tmp, "head.log"), "w") as log:
        head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and head.poll() is None:
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/", timeout=5) as response:
                if response.status == 200:
                    return []
            time.sleep(1)
        with open(os.path.join(tmp, "head.log")) as f:
            tail = f.read()[-1500:]
        return [f"a Ray head with the Jobs API did not start in {timeout_s:.0f} s (ray[default] missing?):\n{tail}"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            head.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Starting the private local Ray: a port taken between our check and the dashboard's bind is not a failure."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

# In a fresh process (no Ray yet): the first port handed to the dashboard is held by someone else.
SCRIPT = """
import socket
import ray
from scalekd.train import ray_runner

holder = socket.socket()
holder.bind(("127.0.0.1", 0))
holder.listen()
ports = iter([holder.getsockname()[1]])
real = ray_runner.free_port
ray_runner.free_port = lambda: next(ports, None) or real()
ray_runner.init_ray(num_cpus=1)
print("STARTED", ray.is_initialized())
ray.shutdown()
"""


def test_a_dashboard_port_taken_before_it_binds_is_retried_on_another():
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0 and "STARTED True" in done.stdout, done.stderr[-3000:]

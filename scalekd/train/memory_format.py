"""Which convolution weight layout trains faster on this machine: ``train.channels_last: auto`` measures it once.

channels_last (NHWC) weights made a ScaleKD iteration 14% faster on an AVX-512 Xeon and the reference teacher
step 9% slower on an AVX2-only EPYC: no fixed default suits both. ``auto`` times the machine yardstick (the
reference teacher step: RetinaNet ResNet-18, 256 px, FPN 64, batch 4) both ways and caches the answer per CPU
model, vector ISA (and oneDNN cap), torch version and thread count, so each machine pays the few seconds once.
On a GPU ``auto`` means channels_last (what cuDNN's tensor-core kernels want), without measuring.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import time

import torch

log = logging.getLogger(__name__)


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def isa() -> str:
    """The widest vector ISA the CPU offers (its flags) and the cap oneDNN was given, if any."""
    flags = _cpuinfo_field("flags").split()
    found = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE/other"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{found} (ONEDNN_MAX_CPU_ISA={cap})" if cap else found


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def yardstick_step_seconds(channels_last: bool, steps: int = 4) -> float:
    """Median seconds of one reference teacher training step after two warm-up steps."""
    # Its own random stream: the probe runs inside a stage (the first on a machine), whose seeded stream it must
    # leave as it found it, or that stage's data order and initial weights would depend on the cache.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _timed_steps(channels_last, steps)


def _timed_steps(channels_last: bool, steps: int) -> float:
    import numpy as np

    from scalekd.data.synth import render_scene
    from scalekd.geometry import DetectorSpec
    from scalekd.models.detectors import build_detector

    model = build_detector(DetectorSpec("retinanet", "resnet18", 4, 64, 256, 427, anchor_scale=2.0)).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    rng = np.random.RandomState(0)
    images, targets = [], []
    for _ in range(4):
        pixels, objects = render_scene(rng, 256)
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255)
        targets.append({"boxes": torch.tensor([b for _, b in objects], dtype=torch.float32),
                        "labels": torch.tensor([c + 1 for c, _ in objects])})
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i in range(steps + 2):
        started = time.perf_counter()
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def machine_key() -> str:
    return f"{cpu_model()} | {isa()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _cache_path() -> str:
    from scalekd import storage

    return os.path.join(storage.cache_dir(), "channels_last.json")


@contextlib.contextmanager
def _locked(path: str):
    """One measurement at a time per machine: Ray workers starting together would time each other."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def measured_choice() -> dict:
    """``{"channels_last": bool, "nchw_s": ..., "channels_last_s": ...}`` for this machine, measured once."""
    path, key = _cache_path(), machine_key()
    with _locked(path):
        cached = _read_cache(path)
        if key in cached:
            return cached[key]
        log.info("train.channels_last=auto: timing the yardstick step both ways once for %s", key)
        nchw, nhwc = yardstick_step_seconds(False), yardstick_step_seconds(True)
        cached[key] = {"channels_last": nhwc < nchw, "nchw_s": round(nchw, 3), "channels_last_s": round(nhwc, 3)}
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cached, f, indent=2)
        os.replace(tmp, path)
        log.info("train.channels_last=auto: %s (NCHW %.3f s, channels_last %.3f s per step), cached in %s",
                 cached[key]["channels_last"], nchw, nhwc, path)
        return cached[key]


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # absent or damaged: measure again and rewrite it


def use_channels_last(setting: bool | str, device: torch.device) -> bool:
    """The layout to train in: ``true``/``false`` as given; ``auto`` measured on CPU, channels_last on GPU."""
    if isinstance(setting, bool):
        return setting
    if device.type == "cuda":
        return True
    return bool(measured_choice()["channels_last"])

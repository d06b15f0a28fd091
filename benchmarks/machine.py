"""The machine yardstick: the reference teacher step (RetinaNet ResNet-18, 256 px, FPN 64, batch 4, 2 threads,
one forward + backward + SGD step on synthetic scenes), NCHW and channels_last, with the CPU's model and the
ISA oneDNN uses. Machines of the same size differ ~4x; every timing in the README is quoted beside this figure.
Run it with ``ONEDNN_MAX_CPU_ISA=AVX2`` to see the AVX2 path of a bigger CPU.

    python benchmarks/machine.py [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import table, write_json  # noqa: E402
from scalekd.data.synth import render_scene  # noqa: E402
from scalekd.models.detectors import DetectorSpec, build_detector  # noqa: E402

SPEC = DetectorSpec("retinanet", "resnet18", 4, 64, 256, 427, anchor_scale=2.0)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def isa() -> str:
    """The widest vector ISA the CPU offers (its flags) and the cap oneDNN was given, if any."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    found = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE/other"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{found} (ONEDNN_MAX_CPU_ISA={cap})" if cap else found


def step_seconds(channels_last: bool, steps: int) -> float:
    """Median seconds of one teacher training step after two warm-up steps."""
    import numpy as np

    torch.manual_seed(0)
    model = build_detector(SPEC).train()
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default="machine.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = [{"layout": name, "s_per_step": round(step_seconds(last, args.steps), 3)}
            for name, last in (("NCHW", False), ("channels_last", True))]
    info = {"cpu": cpu_model(), "isa": isa(), "cores": os.cpu_count(), "threads": 2}
    print(f"{info['cpu']}, {info['isa']}, {info['cores']} cores, 2 threads")
    print(table(rows, ["layout", "s_per_step"]))
    print(f"wrote {write_json(args.out, {**info, 'rows': rows, 'yardstick_s': rows[0]['s_per_step']})}")


if __name__ == "__main__":
    main()

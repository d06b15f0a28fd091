"""Fail the install when it pulled a CUDA torch or nvidia-* wheels onto a CPU host, or broke pins."""

from __future__ import annotations

import importlib.metadata as md
import sys

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
    if problems:
        print("install check failed:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"install check: torch {torch.__version__} (cuda={torch.version.cuda}), "
          f"torchvision {md.version('torchvision')}, no nvidia wheels")
    return 0


if __name__ == "__main__":
    sys.exit(main())

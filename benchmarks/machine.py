"""The machine yardstick: the reference teacher step (RetinaNet ResNet-18, 256 px, FPN 64, batch 4, 2 threads,
one forward + backward + SGD step on synthetic scenes), NCHW and channels_last, with the CPU's model and the
ISA oneDNN uses. Machines of the same size differ ~4x; every timing in docs/results.md is quoted beside this figure.
Run it with ``ONEDNN_MAX_CPU_ISA=AVX2`` to see the AVX2 path of a bigger CPU.

    python benchmarks/machine.py [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.common import table, write_json
from scalekd.train.memory_format import cpu_model, isa, yardstick_step_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default="machine.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = [{"layout": name, "s_per_step": round(yardstick_step_seconds(last, args.steps), 3)}
            for name, last in (("NCHW", False), ("channels_last", True))]
    info = {"cpu": cpu_model(), "isa": isa(), "cores": os.cpu_count(), "threads": 2}
    print(f"{info['cpu']}, {info['isa']}, {info['cores']} cores, 2 threads")
    print(table(rows, ["layout", "s_per_step"]))
    print(f"wrote {write_json(args.out, {**info, 'rows': rows, 'yardstick_s': min(r['s_per_step'] for r in rows)})}")


if __name__ == "__main__":
    main()

"""The golden trace: every method's per-iteration losses on the ``tiny`` preset, fixed seed, CPU, one thread.

A refactor that moves the distiller, the loop or the geometry must reproduce it: the same teacher, warm student and
distillation losses at every iteration, and the same stage-reuse keys (a finished stage stays reusable). Recorded
with ``python -m tests.golden --write``; ``tests/test_golden.py`` compares against ``tests/data/golden_trace.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import tempfile

import torch

# Each method and the recipes a result depends on, as distill overrides on the tiny preset (detector: model overrides).
TRACED: dict[str, dict] = {
    "none": {"distill": {"method": "none"}},
    "fitnet": {"distill": {"method": "fitnet"}},
    "od": {"distill": {"method": "od"}},
    "pkd": {"distill": {"method": "pkd"}},
    "crosskd": {"distill": {"method": "crosskd"}},
    "scalekd": {},
    "scalekd_no_teacher": {"distill": {"csa": {"keys_from": "student"}}},
    "scalekd_paper": {"distill": "paper"},
    "scalekd_anchored": {"distill": {"csa": {"teacher_anchor": 1.0}}},
    "scalekd_fcos": {"model": {"detector": "fcos"}},
    "scalekd_faster_rcnn": {"model": {"detector": "faster_rcnn"}},
}
TRACE_FILE = os.path.join(os.path.dirname(__file__), "data", "golden_trace.json")
DROPPED = ("time", "images_per_s", "it_per_s")  # wall-clock figures, not the method's numbers


def _numbers(metrics_path: str) -> list[dict]:
    with open(metrics_path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in line.items() if k not in DROPPED and isinstance(v, (int, float))} for line in lines]


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _config(data_root: str, name: str) -> dict:
    from scalekd.config import load_config, paper_recipe, replace

    cfg = load_config(preset="tiny", overrides=[f"data.root={data_root}"])
    overrides = dict(TRACED[name])
    if overrides.get("model"):
        cfg = replace(cfg, model=overrides["model"])
    if overrides.get("distill") == "paper":
        cfg = replace(cfg, distill={"recipe": "paper", **paper_recipe(cfg.model.student_min_level)})
    elif overrides.get("distill"):
        cfg = replace(cfg, distill=overrides["distill"])
    return cfg.to_dict()


def _stage(request) -> tuple[list[dict], str]:
    """The stage's logged numbers, and its reuse key as if it started from no model files (their bytes hold the
    config they ran, whose ``data.root`` here is a temporary folder)."""
    from scalekd.train.keys import inputs_key
    from scalekd.train.stage import run_stage

    run_stage(request)
    return (_numbers(os.path.join(request.out, "metrics.jsonl")),
            inputs_key(dataclasses.replace(request, teacher="", student_init="")))


def trace(names: tuple[str, ...] = tuple(TRACED)) -> dict:
    """Teacher and warm student once per detector, then each traced method's distillation from them."""
    from scalekd.data.synth import generate
    from scalekd.train.stage import StageRequest

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="scalekd-golden-") as tmp, _one_thread():
        data = os.path.join(tmp, "data")
        generate(data, images=12, seed=0, size=128)
        pairs: dict[str, tuple[str, str]] = {}
        for name in names:
            config = _config(data, name)
            detector = config["model"]["detector"]
            if detector not in pairs:
                base = os.path.join(tmp, detector)
                for stage in ("teacher", "warmup"):
                    request = StageRequest(stage, config, data, os.path.join(base, stage))
                    out[f"{detector}/{stage}"] = dict(zip(("losses", "key"), _stage(request)))
                pairs[detector] = tuple(os.path.join(base, s, "model.pt") for s in ("teacher", "warmup"))
            teacher, warm = pairs[detector]
            request = StageRequest("distill", config, data, os.path.join(tmp, name), teacher=teacher,
                                   student_init=warm)
            out[name] = dict(zip(("losses", "key"), _stage(request)))
    return out


def numerics_probe() -> list[float]:
    """A few torch kernels the trace runs (conv, norms, linear, their gradients) on seeded data, one thread: the same
    numbers to the last bit only where this machine's kernels are the recording machine's. The CPU's name and ISA
    do not decide that (oneDNN picks kernels per microarchitecture), this does."""
    from torch import nn

    with _one_thread():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1),
                            nn.GroupNorm(8, 32), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16 * 16, 10))
        out = net(torch.randn(4, 3, 32, 32))
        out.square().mean().backward()
        return [float(out.detach().sum()), *(float(p.grad.double().norm()) for p in net.parameters())]


def differences(recorded: dict, now: dict, rtol: float) -> list[str]:
    """Where ``now`` departs from ``recorded``: a missing entry, another stage key, or a number beyond ``rtol``."""
    found = []
    for name, rec in recorded.items():
        got = now.get(name)
        if got is None:
            found.append(f"{name}: not traced")
            continue
        if got["key"] != rec["key"]:
            found.append(f"{name}: stage key {got['key']} != {rec['key']}")
        if len(got["losses"]) != len(rec["losses"]):
            found.append(f"{name}: {len(got['losses'])} logged iterations != {len(rec['losses'])}")
        for i, (a, b) in enumerate(zip(got["losses"], rec["losses"])):
            if set(a) != set(b):
                found.append(f"{name} line {i}: terms {sorted(set(a) ^ set(b))} differ")
            for term in set(a) & set(b):
                if abs(a[term] - b[term]) > rtol * max(abs(b[term]), 1e-3):
                    found.append(f"{name} line {i} {term}: {a[term]!r} != {b[term]!r}")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", action="store_true", help=f"record the trace to {TRACE_FILE}")
    args = ap.parse_args()
    from benchmarks.common import numerics

    now = trace()
    if args.write:
        with open(TRACE_FILE, "w") as f:
            json.dump({"numerics": {**numerics(), "threads": 1}, "probe": numerics_probe(), "trace": now}, f,
                      indent=1, sort_keys=True)
        print(f"wrote {TRACE_FILE}")
        return
    with open(TRACE_FILE) as f:
        recorded = json.load(f)["trace"]
    found = differences(recorded, now, 1e-6)
    print("\n".join(found) or "the golden trace holds")


if __name__ == "__main__":
    main()

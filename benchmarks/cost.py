"""What distillation costs per iteration: plain student step, teacher forward at 2x, the full ScaleKD
iteration split into its parts, a FitNet iteration; shared vs separate SDF; student parameters and
inference speed, distilled vs plain (they must be equal).

    python benchmarks/cost.py [--student-size 256] [--iterations 10] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import PhaseClock, table, write_json  # noqa: E402
from scalekd.config import load_config, replace  # noqa: E402
from scalekd.data.synth import ensure_synthetic  # noqa: E402
from scalekd.data.coco import dataset_from_root  # noqa: E402
from scalekd.data.transforms import DualResolutionCollate  # noqa: E402
from scalekd.distill.distiller import Distiller, Optimizers  # noqa: E402
from scalekd.distill.sdf import ScaleDecoupledFeatures  # noqa: E402
from scalekd.models.detectors import build_detector, count_parameters  # noqa: E402
from scalekd.train.loop import detection_step, student_spec, teacher_spec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--student-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--detector", default="retinanet")
    ap.add_argument("--student", default="mobilenet_v2")
    ap.add_argument("--teacher", default="resnet18")
    ap.add_argument("--fpn", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="cost.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    data = ensure_synthetic(os.path.join("runs", "bench", f"synth{2 * args.student_size}"), 40, seed=0,
                            size=2 * args.student_size)
    cfg = load_config(overrides=[f"data.root={data}", f"data.student_size={args.student_size}",
                                 f"model.detector={args.detector}", f"model.student_backbone={args.student}",
                                 f"model.teacher_backbone={args.teacher}", f"model.fpn_channels={args.fpn}",
                                 "model.anchor_scale=2.0"])
    ds = dataset_from_root(data, "train")
    collate = DualResolutionCollate(cfg.data.student_size, 2.0, cfg.data.max_size_ratio)
    batches = [collate([ds[i * args.batch + j] for j in range(args.batch)]).to(device)
               for i in range(args.iterations + args.warmup)]

    def build(method_cfg):
        torch.manual_seed(0)
        student = build_detector(student_spec(method_cfg, ds.num_classes))
        teacher = build_detector(teacher_spec(method_cfg, ds.num_classes))
        d = Distiller(student, teacher if method_cfg.distill.method != "none" else None, method_cfg).to(device).train()
        opt = Optimizers(torch.optim.SGD(d.student_parameters(), lr=0.005, momentum=0.9),
                         torch.optim.Adam(d.assistant_parameters(), lr=3e-4) if d.csa is not None else None)
        return d, opt

    def time_steps(step) -> tuple[float, dict]:
        clock = PhaseClock(device)
        times = []
        for i, batch in enumerate(batches):
            if i == args.warmup:
                clock.totals.clear()
            start = time.perf_counter()
            step(batch, clock)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        phases = {k: 1000 * v / args.iterations for k, v in clock.totals.items()}
        return 1000 * statistics.median(times), phases

    rows, results = [], {}
    plain, plain_opt = build(replace(cfg, distill={"method": "none"}))
    ms, _ = time_steps(lambda b, c: detection_step(plain.student, b.student_images, b.student_targets, plain_opt, None))
    results["plain_student_step_ms"] = ms
    rows.append({"what": "plain student step", "ms/iter": f"{ms:.1f}"})

    teacher = build_detector(teacher_spec(cfg, ds.num_classes)).to(device).eval()
    from scalekd.models.parts import DetectorParts

    parts = DetectorParts(teacher)

    def teacher_forward(batch, clock):
        with torch.no_grad():
            parts.teacher_features(batch.teacher_images)

    ms, _ = time_steps(teacher_forward)
    results["teacher_forward_2x_ms"] = ms
    rows.append({"what": f"teacher forward at 2x ({cfg.teacher_size}px)", "ms/iter": f"{ms:.1f}"})

    for name, overrides in (("scalekd", {}), ("fitnet", {"method": "fitnet"}),
                            ("scalekd (reuse assistant outputs)", {"csa": {"recompute": False}}),
                            ("scalekd (assistant's own head)", {"csa": {"head": "own"}})):
        d, opt = build(replace(cfg, distill=overrides))
        ms, phases = time_steps(lambda b, c, d=d, opt=opt: d.train_step(b, opt, phase=c))
        results[f"{name}_iteration_ms"] = ms
        results[f"{name}_phases_ms"] = phases
        rows.append({"what": f"{name} iteration", "ms/iter": f"{ms:.1f}",
                     "phases": ", ".join(f"{k} {v:.0f}" for k, v in phases.items())})
        if name == "scalekd":
            extra = phases.get("csa", 0) + phases.get("sdf", 0) + phases.get("losses", 0)
            base = results["teacher_forward_2x_ms"] + results["plain_student_step_ms"]
            results["overhead_sdf_csa_losses_pct"] = 100 * (ms - base) / base
            results["sdf_csa_losses_forward_ms"] = extra
            results["distilled_student_params"] = count_parameters(d.student)
            results["sdf_params"] = count_parameters(d.sdf)
            results["csa_params"] = count_parameters(d.csa)
    results["plain_student_params"] = count_parameters(plain.student)

    c5s = {"mobilenet_v2": 1280, "resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
    for sharing in (True, False):
        sdf = ScaleDecoupledFeatures(c5s[args.student], c5s[args.teacher], 128, (1, 2, 3), sharing)
        results[f"sdf_params_{'shared' if sharing else 'separate'}"] = count_parameters(sdf)

    plain.student.eval()
    image = batches[0].student_images[0]
    with torch.no_grad():
        for _ in range(3):
            plain.student([image])
        start = time.perf_counter()
        for _ in range(10):
            plain.student([image])
    results["student_images_per_s"] = 10 / (time.perf_counter() - start)

    print(table(rows, ["what", "ms/iter", "phases"]))
    print(f"\nScaleKD overhead over teacher forward + student step: {results['overhead_sdf_csa_losses_pct']:.1f}% "
          "(target <= 25%)")
    print(f"student params plain {results['plain_student_params']:,} vs distilled "
          f"{results['distilled_student_params']:,}; SDF {results['sdf_params']:,} (shared) / "
          f"{results['sdf_params_separate']:,} (separate), CSA {results['csa_params']:,}")
    print(f"student inference: {results['student_images_per_s']:.1f} images/s at batch 1")
    path = write_json(args.out, {"args": vars(args), **results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

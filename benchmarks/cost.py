"""What distillation costs per iteration: plain student step, teacher forward at 2x, the full ScaleKD
iteration split into its parts, a FitNet iteration, each with its peak memory; shared vs separate SDF;
student parameters and inference speed, distilled vs plain (they must be equal).

    python benchmarks/cost.py [--student-size 256] [--iterations 12] [--device cpu|cuda] [--nchw]
    python benchmarks/cost.py --teacher resnet50 --student resnet18 --out cost_r50_r18.json
    python benchmarks/cost.py --preset bench --batch 4 --out cost_bench.json   # the presets' FCOS P2-P6 recipe

Without ``--preset`` it measures the recipe of its first tables (RetinaNet, P3-P7 student, anchor_scale 2, FPN 256,
256 px student), so that their commands still reproduce; with one, the preset's models and sizes, and only the model
flags given override them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import PeakMemory, PhaseClock, table, write_json
from scalekd.config import Config, load_config, replace
from scalekd.data.synth import ensure_synthetic
from scalekd.data.coco import dataset_from_root
from scalekd.data.transforms import DualResolutionCollate
from scalekd.distill.distiller import Distiller, Optimizers
from scalekd.distill.sdf import ScaleDecoupledFeatures
from scalekd.models.detectors import build_detector, count_parameters
from scalekd.models.parts import DetectorParts
from scalekd.geometry import student_spec, teacher_spec
from scalekd.train.loop import detection_step
from scalekd.distill.methods import method_class


# C5's channels per backbone: what SDF reads from the student and the teacher.
C5_CHANNELS = {"mobilenet_v2": 1280, "resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}

# The distillation iterations timed after the plain step and the teacher's forward: key, row name, overrides by
# config section.
# "scalekd" is the default recipe: it adds CrossKD's cross-head terms where they can be formed
# (distill.cross_head_weight=auto: a one-stage detector with scale-aligned pairing), so the two rows after it
# split what those terms cost from what ScaleKD's own parts cost.
METHODS = (("scalekd", "ScaleKD (the default recipe)", {}),
           ("scalekd_no_cross_head", "ScaleKD without cross-head terms",
            {"distill": {"cross_head_weight": 0.0}}),
           ("crosskd", "CrossKD alone", {"distill": {"method": "crosskd"}}),
           ("scalekd_recompute", "ScaleKD, assistant outputs recomputed after its step",
            {"experimental": {"csa_recompute": True}}),
           # The default assistant has its own head (a copy of the teacher's); the paper's shares the student's.
           ("scalekd_shared_head", "ScaleKD, assistant sharing the student's head",
            {"distill": {"csa": {"head": "shared"}}}),
           ("fitnet", "FitNet", {"distill": {"method": "fitnet"}}))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", help="measure this preset's recipe (e.g. bench); the model flags override it only "
                                     "where given")
    ap.add_argument("--student-size", type=int)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--detector")
    ap.add_argument("--student")
    ap.add_argument("--teacher")
    ap.add_argument("--fpn", type=int)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nchw", action="store_true", help="contiguous NCHW weights instead of training's default "
                                                          "channels_last (train.channels_last=false)")
    ap.add_argument("--out", default="cost.json")
    return ap


# Without --preset: the recipe of the first cost tables (docs/results.md), kept so they reproduce.
FIRST_TABLES = {"student_size": 256, "detector": "retinanet", "student": "mobilenet_v2", "teacher": "resnet18",
                "fpn": 256}


def cost_config(args) -> Config:
    """The measured config: the preset's (or the first tables' recipe), the model flags given on top of it."""
    given = {k: getattr(args, k) for k in FIRST_TABLES if getattr(args, k) is not None}
    flags = given if args.preset else {**FIRST_TABLES, **given}
    paths = {"student_size": "data.student_size", "detector": "model.detector", "student": "model.student_backbone",
             "teacher": "model.teacher_backbone", "fpn": "model.fpn_channels"}
    overrides = [f"{paths[k]}={v}" for k, v in flags.items()] + [f"train.channels_last={not args.nchw}"]
    if not args.preset:
        overrides.append("model.anchor_scale=2.0")
    return load_config(preset=args.preset, overrides=overrides)


class CostBench:
    """What every measurement shares: the config, the same pre-collated batches, and the table and results
    they add to."""

    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        cfg = cost_config(args)
        student_size = cfg.data.student_size
        data = ensure_synthetic(os.path.join("runs", "bench", f"synth{2 * student_size}"), 40, seed=0,
                                size=2 * student_size)
        self.cfg = replace(cfg, data={"root": data})
        self.ds = dataset_from_root(data, "train")
        collate = DualResolutionCollate(self.cfg.data.student_size, 2.0, self.cfg.data.max_size_ratio)
        # The 40-image set has 32 training images: larger batches or more iterations wrap around it (the first
        # tables' 14 batches of 2 never did, so they reproduce).
        self.batches = [collate([self.ds[(i * args.batch + j) % len(self.ds)] for j in range(args.batch)])
                        .to(self.device) for i in range(args.iterations + args.warmup)]
        self.rows: list[dict] = []
        self.results: dict = {}

    def channels_last(self, module: torch.nn.Module) -> None:
        if self.cfg.train.channels_last is True:
            module.to(memory_format=torch.channels_last)

    def build(self, method_cfg) -> tuple[Distiller, Optimizers]:
        """The distiller of ``method_cfg`` from seed 0, in train mode, with training's optimisers."""
        torch.manual_seed(0)
        student = build_detector(student_spec(method_cfg, self.ds.num_classes))
        teacher = build_detector(teacher_spec(method_cfg, self.ds.num_classes))
        with_teacher = method_class(method_cfg.distill.method).needs_teacher()
        d = Distiller(student, teacher if with_teacher else None, method_cfg).to(self.device).train()
        self.channels_last(d)
        opt = Optimizers(torch.optim.SGD(d.student_parameters(), lr=0.005, momentum=0.9),
                         torch.optim.Adam(d.assistant_param_groups(), lr=3e-4) if d.assistant_trains else None)
        return d, opt

    def time_steps(self, step) -> tuple[float, dict, float]:
        """Median ms per iteration, mean ms per phase, peak MB above the models' own memory."""
        clock = PhaseClock(self.device)
        times = []
        with PeakMemory(self.device) as memory:
            for i, batch in enumerate(self.batches):
                if i == self.args.warmup:
                    clock.totals.clear()
                start = time.perf_counter()
                step(batch, clock)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= self.args.warmup:
                    times.append(time.perf_counter() - start)
        phases = {k: 1000 * v / self.args.iterations for k, v in clock.totals.items()}
        return 1000 * statistics.median(times), phases, memory.peak_mb

    def record(self, key: str, what: str, ms: float, peak_mb: float, phases: dict | None = None) -> None:
        self.results[f"{key}_ms"], self.results[f"{key}_peak_mb"] = ms, peak_mb
        row = {"what": what, "ms/iter": f"{ms:.1f}", "peak MB": f"{peak_mb:.0f}"}
        if phases:
            self.results[f"{key}_phases_ms"] = phases
            row["phases (ms)"] = ", ".join(f"{k} {v:.0f}" for k, v in phases.items())
        self.rows.append(row)


def measure_baseline(bench: CostBench) -> tuple[Distiller, DetectorParts]:
    """The plain student's step and the teacher's forward at 2x: what an iteration costs without distillation.
    Returns the plain distiller and the teacher's parts for the measurements after."""
    plain, plain_opt = bench.build(replace(bench.cfg, distill={"method": "none"}))
    ms, _, peak = bench.time_steps(lambda b, c: detection_step(plain.student_parts, b.student_images,
                                                               b.student_targets, plain_opt, None))
    bench.record("plain_student_step", "plain student step", ms, peak)
    teacher = build_detector(teacher_spec(bench.cfg, bench.ds.num_classes)).to(bench.device).eval()
    bench.channels_last(teacher)
    parts = DetectorParts(teacher)

    def teacher_forward(batch, clock):
        with torch.no_grad():
            parts.teacher_features(batch.teacher_images)

    ms, _, peak = bench.time_steps(teacher_forward)
    bench.record("teacher_forward_2x", f"teacher forward at 2x ({bench.cfg.teacher_size}px)", ms, peak)
    bench.results["plain_student_params"] = count_parameters(plain.student)
    return plain, parts


def measure_methods(bench: CostBench) -> None:
    """Each distillation iteration, its phases, and its overhead over the teacher's forward + the plain step."""
    results = bench.results
    base = results["teacher_forward_2x_ms"] + results["plain_student_step_ms"]
    for key, what, overrides in METHODS:
        d, opt = bench.build(replace(bench.cfg, **overrides))
        ms, phases, peak = bench.time_steps(lambda b, c, d=d, opt=opt: d.train_step(b, opt, phase=c))
        bench.record(key, f"{what} iteration", ms, peak, phases)
        results[f"{key}_overhead_pct"] = 100 * (ms - base) / base
        # A second estimate from the iteration's own phases, timed in the same iterations, so a noisy
        # neighbour on a shared machine hits both sides alike; it counts the backward through SDF and the
        # output losses as part of the student's step, so it reads a little low.
        core = sum(phases.get(k, 0.0) for k in ("teacher", "student_forward", "student_backward_step"))
        results[f"{key}_overhead_same_iteration_pct"] = 100 * (sum(phases.values()) - core) / core
        if key == "scalekd":
            results["sdf_csa_losses_forward_ms"] = sum(phases.get(k, 0.0) for k in ("sdf", "csa_attention", "losses"))
            results["assistant_head_pass_ms"] = (phases.get("assistant_head", 0.0)
                                                 + phases.get("assistant_backward_step", 0.0))
            results["distilled_student_params"] = count_parameters(d.student)
            results["sdf_params"] = count_parameters(d.sdf)
            results["csa_params"] = count_parameters(d.csa)
        del d, opt


def measure_sdf_sharing(bench: CostBench, plain: Distiller, parts: DetectorParts) -> None:
    """SDF alone (forward, backward, SGD step), shared vs separate: what weight sharing saves beyond parameters."""
    batch = bench.batches[0]
    with torch.no_grad():
        c5_student = plain.student_parts.forward_train(batch.student_images, batch.student_targets).c5
        c5_teacher = parts.teacher_features(batch.teacher_images)[0]
    model = bench.cfg.model
    for sharing in (True, False):
        name = "shared" if sharing else "separate"
        sdf = ScaleDecoupledFeatures(C5_CHANNELS[model.student_backbone], C5_CHANNELS[model.teacher_backbone],
                                     bench.cfg.distill.sdf.embed_channels, (1, 2, 3), sharing).to(bench.device)
        sdf_opt = torch.optim.SGD([p for p in sdf.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        with PeakMemory(bench.device) as memory:
            for _ in range(3):
                s_emb, t_emb = sdf(c5_student, c5_teacher)
                sdf_opt.zero_grad()
                (s_emb - t_emb).pow(2).mean().backward()
                sdf_opt.step()
        bench.results[f"sdf_params_{name}"] = count_parameters(sdf)
        bench.results[f"sdf_step_peak_mb_{name}"] = memory.peak_mb
        # What sharing changes, counted exactly: weights, their gradients and SGD's momentum buffers.
        trained = [p for p in sdf.parameters() if p.requires_grad]
        state = sum(2 * p.numel() * p.element_size() for p in trained)
        state += sum(t.numel() * t.element_size() for st in sdf_opt.state.values() for t in st.values()
                     if torch.is_tensor(t))
        bench.results[f"sdf_state_mb_{name}"] = state / 2**20


def measure_inference(bench: CostBench, plain: Distiller) -> None:
    """The student's images per second at batch 1 (a distilled student is the same network)."""
    plain.student.eval()
    image = bench.batches[0].student_images[0]
    with torch.no_grad():
        for _ in range(3):
            plain.student([image])
        start = time.perf_counter()
        for _ in range(10):
            plain.student([image])
    bench.results["student_images_per_s"] = 10 / (time.perf_counter() - start)


def print_summary(rows: list[dict], results: dict) -> None:
    print(table(rows, ["what", "ms/iter", "peak MB", "phases (ms)"]))
    print(f"\nScaleKD overhead over teacher forward + student step: {results['scalekd_overhead_pct']:.1f}% "
          f"(target <= 25%; {results['scalekd_overhead_same_iteration_pct']:.1f}% from its own phases);\n"
          f"SDF + CSA attention + output (and cross-head) losses {results['sdf_csa_losses_forward_ms']:.0f} ms, "
          f"the assistant's pass through the head (forward, backward, step) "
          f"{results['assistant_head_pass_ms']:.0f} ms")
    if "scalekd_no_cross_head_ms" in results:
        print(f"the cross-head terms: {results['scalekd_ms'] - results['scalekd_no_cross_head_ms']:+.0f} ms per "
              f"iteration (default {results['scalekd_ms']:.0f} vs {results['scalekd_no_cross_head_ms']:.0f} ms "
              f"without them; CrossKD alone {results['crosskd_ms']:.0f} ms)")
    print(f"student params plain {results['plain_student_params']:,} vs distilled "
          f"{results['distilled_student_params']:,}; CSA {results['csa_params']:,}; SDF "
          f"{results['sdf_params_shared']:,} shared / {results['sdf_params_separate']:,} separate; SDF weights + "
          f"gradients + momentum {results['sdf_state_mb_shared']:.1f} / {results['sdf_state_mb_separate']:.1f} MB; "
          f"SDF step peak {results['sdf_step_peak_mb_shared']:.0f} / "
          f"{results['sdf_step_peak_mb_separate']:.0f} MB")
    print(f"student inference: {results['student_images_per_s']:.1f} images/s at batch 1")


def main() -> None:
    args = _parser().parse_args()
    bench = CostBench(args)
    plain, parts = measure_baseline(bench)
    measure_methods(bench)
    measure_sdf_sharing(bench, plain, parts)
    measure_inference(bench, plain)
    print_summary(bench.rows, bench.results)
    path = write_json(args.out, {"args": vars(args), **bench.results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

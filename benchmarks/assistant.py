"""Is the Cross-Scale Assistant a better detector than the student it teaches, and does it read the teacher?
Evaluates, per seed, the distilled student and its assistant run as a detector (student features + the 2x
teacher's paired maps -> CSA -> head), from the final checkpoints of a quality run (``benchmarks/quality.py``).
Both get the views the training collate makes. Diagnostics: the assistant with the teacher's maps intact, their
cells shuffled within the image, taken from another image, or zeroed (an assistant that reads the teacher loses
AP when they are not its own image's, in place); the student's maps (the queries) shuffled, the teacher's intact
(an assistant started as the teacher that ignores its queries is only the teacher fine-tuned); and the attention
each query puts on its own cell relative to uniform (1.0: none in particular).

    python benchmarks/assistant.py --workdir runs/bench/quality --dataset synth --variants scalekd scalekd_no_teacher
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import table, write_json
from scalekd.config import config_from_dict
from scalekd.data.coco import dataset_from_root
from scalekd.data.transforms import DualResolutionCollate
from scalekd.distill.assisted import TEACHER_ABLATIONS, AssistedDetector, footprint_attention
from scalekd.distill.distiller import Distiller
from scalekd.eval.metrics import metrics_from_eval, run_cocoeval
from scalekd.eval.predict import predict
from scalekd.geometry import DetectorSpec
from scalekd.models.detectors import build_detector
from scalekd.train import checkpoint as ckpt

KEYS = ("AP", "AP50", "AP_S", "AP_M", "AP_L")


def load_distiller(distill_dir: str, teacher_uri: str) -> Distiller:
    """The distill stage's student, SDF, CSA and assistant head from its last checkpoint, with its teacher."""
    state = ckpt.load(ckpt.latest_checkpoint(distill_dir))
    cfg = config_from_dict(state["config"])
    student = build_detector(DetectorSpec(**state["spec"]))
    student.load_state_dict(state["model"])
    teacher, _ = ckpt.load_model(teacher_uri)
    distiller = Distiller(student, teacher, cfg)
    try:
        distiller.load_distillation_state(state["distiller"])
    except ValueError as exc:
        raise SystemExit(f"{distill_dir}: {exc}") from None
    return distiller


def evaluate_pair(distill_dir: str, teacher_uri: str) -> dict[str, dict]:
    """Metrics of the distilled student and of its assistant, from the stage's last checkpoint, on the val split of
    the data that stage trained on (its config's ``data.root``)."""
    distiller = load_distiller(distill_dir, teacher_uri)
    cfg, student = distiller.cfg, distiller.student
    dataset = dataset_from_root(cfg.data.root, cfg.data.val_split)
    out = {}
    assisted = AssistedDetector(distiller)
    models = [("student", student, "intact", "intact")] + [
        ("assistant" if how == "intact" else f"assistant_{how}", assisted, how, "intact") for how in TEACHER_ABLATIONS]
    models.append(("assistant_student_permuted", assisted, "intact", "permuted"))
    for name, model, how, student_how in models:
        assisted.teacher_ablation, assisted.student_ablation = how, student_how
        # Both at the student's size: the assistant also gets the teacher's view, made as in training.
        detections = predict(model, dataset, cfg.data.student_size, cfg.data.max_size_ratio, cfg.eval.batch_size,
                             0.001, max(cfg.eval.max_detections))
        out[name] = metrics_from_eval(run_cocoeval(dataset.data, detections, cfg.eval.max_detections,
                                     cfg.eval.size_band_edges))
    out["footprint_attention_vs_uniform"] = _footprint(distiller, dataset, cfg)
    return out


def _footprint(distiller: Distiller, dataset, cfg, images: int = 32) -> list[float]:
    """Per head group at the finest level, mean over ``images`` validation images in batches of 4."""
    distiller.eval()
    collate = DualResolutionCollate(cfg.data.student_size, cfg.data.teacher_scale, cfg.data.max_size_ratio)
    per_batch = [footprint_attention(distiller, b.student_images, b.teacher_images)
                 for b in (collate([dataset[j] for j in range(i, min(i + 4, len(dataset)))])
                           for i in range(0, min(images, len(dataset)), 4))]
    return [round(statistics.mean(group), 3) for group in zip(*per_batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="runs/bench/quality")
    ap.add_argument("--dataset", default="synth", choices=["synth", "kit"])
    ap.add_argument("--variants", nargs="+", default=["scalekd", "scalekd_no_teacher"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="assistant.json")
    args = ap.parse_args()
    teacher = os.path.join(args.workdir, args.dataset, f"seed{args.seeds[0]}", "teacher", "model.pt")
    results, rows = {}, []
    for variant in args.variants:
        runs = [evaluate_pair(os.path.join(args.workdir, args.dataset, f"seed{seed}", f"distill-{variant}"),
                              teacher) for seed in args.seeds]
        results[variant] = runs
        for name in ("student", "assistant", *(f"assistant_{how}" for how in TEACHER_ABLATIONS[1:]),
                     "assistant_student_permuted"):
            row = {"variant": variant, "model": name}
            for k in KEYS:
                xs = [100 * r[name][k] for r in runs if r[name][k] >= 0]  # -1: no object of that size
                row[k] = f"{statistics.mean(xs):.2f} ± {statistics.pstdev(xs):.2f}" if xs else "-"
            rows.append(row)
        footprint = [statistics.mean(g) for g in zip(*(r["footprint_attention_vs_uniform"] for r in runs))]
        rows.append({"variant": variant, "model": "own-cell attention / uniform, per head group",
                     **{"AP": ", ".join(f"{x:.2f}" for x in footprint)}})
    print(f"{args.dataset}, seeds {args.seeds}; metrics in %, mean ± std")
    print(table(rows, ["variant", "model", *KEYS]))
    print(f"wrote {write_json(args.out, {'args': vars(args), 'rows': rows, 'runs': results})}")


if __name__ == "__main__":
    main()

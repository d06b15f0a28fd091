"""Is the Cross-Scale Assistant a better detector than the student it teaches? Evaluates, per seed, the
distilled student and its assistant run as a detector (student features + teacher at 2x -> CSA -> head),
from the final checkpoints of a quality run (``benchmarks/quality.py``). The method's premise is that the
assistant's predictions, which the student is distilled towards, are better on small objects.

    python benchmarks/assistant.py --workdir runs/bench/quality --dataset synth --variants scalekd own_head
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import table, write_json  # noqa: E402
from scalekd.config import config_from_dict  # noqa: E402
from scalekd.data.coco import dataset_from_root  # noqa: E402
from scalekd.distill.assisted import AssistedDetector  # noqa: E402
from scalekd.distill.distiller import Distiller  # noqa: E402
from scalekd.eval.metrics import metrics_from_eval, run_cocoeval  # noqa: E402
from scalekd.eval.predict import predict  # noqa: E402
from scalekd.models.detectors import DetectorSpec, build_detector  # noqa: E402
from scalekd.train import checkpoint as ckpt  # noqa: E402

KEYS = ("AP", "AP50", "AP_S", "AP_M", "AP_L")


def evaluate_pair(distill_dir: str, teacher_uri: str, data_root: str) -> dict[str, dict]:
    """Metrics of the distilled student and of its assistant, from the stage's last checkpoint."""
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
    dataset = dataset_from_root(data_root, cfg.data.val_split)
    out = {}
    for name, model, size in (("student", student, cfg.data.student_size),
                              ("assistant", AssistedDetector(distiller), cfg.teacher_size)):
        detections = predict(model, dataset, size, cfg.data.max_size_ratio, cfg.eval.batch_size, 0.001,
                             max(cfg.eval.max_detections))
        out[name] = metrics_from_eval(run_cocoeval(dataset.data, detections, cfg.eval.max_detections))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="runs/bench/quality")
    ap.add_argument("--dataset", default="synth", choices=["synth", "kit"])
    ap.add_argument("--variants", nargs="+", default=["scalekd", "own_head"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="assistant.json")
    args = ap.parse_args()
    data_root = os.path.join(args.workdir, f"{args.dataset}-data")
    teacher = os.path.join(args.workdir, args.dataset, f"seed{args.seeds[0]}", "teacher", "model.pt")
    results, rows = {}, []
    for variant in args.variants:
        runs = [evaluate_pair(os.path.join(args.workdir, args.dataset, f"seed{seed}", f"distill-{variant}"),
                              teacher, data_root) for seed in args.seeds]
        results[variant] = runs
        for name in ("student", "assistant"):
            row = {"variant": variant, "model": name}
            for k in KEYS:
                xs = [100 * r[name][k] for r in runs]
                row[k] = f"{statistics.mean(xs):.2f} ± {statistics.pstdev(xs):.2f}"
            rows.append(row)
    print(f"{args.dataset}, seeds {args.seeds}; metrics in %, mean ± std")
    print(table(rows, ["variant", "model", *KEYS]))
    print(f"wrote {write_json(args.out, {'args': vars(args), 'rows': rows, 'runs': results})}")


if __name__ == "__main__":
    main()

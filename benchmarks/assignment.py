"""What each RetinaNet anchor assignment gives the student's objects: coverage (objects with a positive anchor),
positives per object, and how well those positives overlap their object. Explains why ATSS, which covers almost
every tiny object, can still train a worse detector: the threshold it adapts per object also admits anchors that
barely overlap (``experimental.atss_topk`` sets how many candidates it is taken over).

    python benchmarks/assignment.py --annotations runs/bench/q12/synth-data/annotations/instances_val.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

from benchmarks.common import machine, table, write_json
from scalekd.config import load_config
from scalekd.data.annotations import load_coco_json
from scalekd.data.coverage import image_anchors, resized_objects
from scalekd.models.parts import atss_match
from scalekd.geometry import student_spec

# torchvision RetinaNet's matcher: IoU >= 0.5 positive, < 0.4 background, every object's best anchor kept.
RETINANET_MATCHER = Matcher(0.5, 0.4, allow_low_quality_matches=True)


def assignments(boxes: torch.Tensor, anchors: torch.Tensor, cells: list[int], topks: list[int]) -> dict:
    """Ground-truth index per anchor (-1 background, -2 ignored) under each assignment."""
    out = {"max_iou": RETINANET_MATCHER(box_iou(boxes, anchors))}
    for k in topks:
        out[f"atss k={k}"] = atss_match(boxes, anchors, cells, k)
    return out


def measure(data: dict, spec, topks: list[int]) -> dict[str, dict]:
    """Per assignment: objects, % with a positive, positives per object, mean IoU of positives, % under 0.3."""
    totals: dict[str, dict] = {}
    for boxes, rh, rw in resized_objects(data, spec):
        anchors, cells = image_anchors(spec, rh, rw)
        ious = box_iou(boxes, anchors)
        for name, matched in assignments(boxes, anchors, cells, topks).items():
            t = totals.setdefault(name, {"objects": 0, "with_positive": 0, "positives": 0, "iou_sum": 0.0,
                                         "under_0_3": 0})
            positive = matched >= 0
            pos_iou = ious[matched[positive], positive.nonzero().squeeze(1)]
            t["objects"] += len(boxes)
            t["with_positive"] += int(torch.unique(matched[positive]).numel())
            t["positives"] += int(positive.sum())
            t["iou_sum"] += float(pos_iou.sum())
            t["under_0_3"] += int((pos_iou < 0.3).sum())
    return {name: {"objects": t["objects"], "with_positive_pct": round(100 * t["with_positive"] / t["objects"], 1),
                   "positives_per_object": round(t["positives"] / t["objects"], 2),
                   "positive_mean_iou": round(t["iou_sum"] / max(1, t["positives"]), 3),
                   "positives_under_iou_0_3_pct": round(100 * t["under_0_3"] / max(1, t["positives"]), 1)}
            for name, t in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotations", default="runs/bench/quality/synth-data/annotations/instances_val.json",
                    help="a COCO JSON (default: the val split `make bench`'s quality run generates)")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--atss-topk", type=int, nargs="+", default=[9, 3, 1])
    ap.add_argument("--out", default="assignment.json")
    args = ap.parse_args()
    data = load_coco_json(args.annotations)
    spec = student_spec(load_config(preset=args.preset), max(1, len(data["categories"])))
    rows = measure(data, spec, args.atss_topk)
    print(f"student anchors of preset {args.preset} (levels from stride {spec.strides[0]}, anchor scale "
          f"{spec.anchor_scale}); positives include low-quality matches")
    print(table([{"assignment": k, **v} for k, v in rows.items()],
                ["assignment", "objects", "with_positive_pct", "positives_per_object", "positive_mean_iou",
                 "positives_under_iou_0_3_pct"]))
    path = write_json(args.out, {"machine": machine(), "args": vars(args), "spec": str(spec), "assignments": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

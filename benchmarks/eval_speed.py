"""Our evaluator against pycocotools' own evaluate/accumulate/summarize on 500 images x 100 detections:
identical numbers required, time ratio reported.

    python benchmarks/eval_speed.py [--images 500] [--detections 100]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import table, write_json  # noqa: E402
from scalekd.eval.metrics import evaluate_detections  # noqa: E402

KEYS = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR1", "AR10", "AR100", "AR_S", "AR_M", "AR_L")


def make_case(images: int, per_image: int, seed: int = 0) -> tuple[dict, list]:
    rng = random.Random(seed)
    cats = [{"id": i, "name": f"c{i}"} for i in range(1, 11)]
    gt = {"images": [], "annotations": [], "categories": cats}
    dets = []
    for i in range(1, images + 1):
        gt["images"].append({"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480})
        for _ in range(rng.randint(5, 40)):
            w, h = rng.choice([(8, 8), (20, 16), (40, 30), (120, 90)])
            w, h = w * rng.uniform(0.7, 1.3), h * rng.uniform(0.7, 1.3)
            box = [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i,
                                      "category_id": rng.randint(1, 10), "bbox": box, "area": w * h, "iscrowd": 0})
            if len([d for d in dets[-per_image:] if d["image_id"] == i]) < per_image // 2:
                x, y, bw, bh = box
                dets.append({"image_id": i, "category_id": gt["annotations"][-1]["category_id"],
                             "bbox": [x + rng.gauss(0, 2), y + rng.gauss(0, 2), bw, bh], "score": rng.random()})
        while sum(1 for d in dets[-per_image:] if d["image_id"] == i) < per_image:
            w, h = rng.uniform(4, 100), rng.uniform(4, 100)
            dets.append({"image_id": i, "category_id": rng.randint(1, 10),
                         "bbox": [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h], "score": rng.random() * 0.6})
    return gt, dets


def reference(gt: dict, dets: list) -> list:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        e = COCOeval(coco, coco.loadRes(dets), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return list(e.stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--detections", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    gt, dets = make_case(args.images, args.detections)
    ours_t, ref_t = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours = evaluate_detections(gt, [dict(d) for d in dets])
        ours_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        ref = reference(gt, [dict(d) for d in dets])
        ref_t.append(time.perf_counter() - start)
    max_diff = max(abs(ours[k] - r) for k, r in zip(KEYS, ref))
    rows = [{"evaluator": "scalekd (pycocotools COCOeval + our metric read-out)", "seconds": f"{min(ours_t):.2f}"},
            {"evaluator": "pycocotools summarize()", "seconds": f"{min(ref_t):.2f}"}]
    print(f"{args.images} images, {len(dets)} detections, {len(gt['annotations'])} ground-truth boxes")
    print(table(rows, ["evaluator", "seconds"]))
    print(f"max |difference| over the 12 summary metrics: {max_diff:.2e} (identical: {max_diff == 0.0})")
    print(f"time ratio ours/pycocotools: {min(ours_t) / min(ref_t):.2f}")
    print(write_json("eval_speed.json", {"images": args.images, "detections": len(dets),
                                         "ours_s": min(ours_t), "pycocotools_s": min(ref_t),
                                         "max_abs_diff": max_diff, "metrics": ours}))


if __name__ == "__main__":
    main()

"""`scalekd evaluate` (faster-coco-eval) against pycocotools' evaluate+accumulate+summarize, each end to end as a
command on the same two JSON files (interpreter start, JSON load, checks, evaluation, summary): identical 12
numbers required, time ratio reported at each size.

    python benchmarks/eval_speed.py [--images 500 5000] [--detections 100]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import table, write_json  # noqa: E402

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


REFERENCE = """
import contextlib, io, json, sys
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
coco = COCO(sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()):
    e = COCOeval(coco, coco.loadRes(sys.argv[2]), "bbox")
    e.evaluate()
    e.accumulate()
    e.summarize()
print(json.dumps(list(e.stats)))
"""


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return time.perf_counter() - started, done.stdout


def compare(images: int, per_image: int, repeats: int, folder: str) -> dict:
    gt, dets = make_case(images, per_image)
    gt_path, dt_path, out = (os.path.join(folder, n) for n in ("gt.json", "dt.json", "metrics.json"))
    for path, value in ((gt_path, gt), (dt_path, dets)):
        with open(path, "w") as f:
            json.dump(value, f)
    ours_cmd = [sys.executable, "-m", "scalekd.cli", "evaluate", "--gt", gt_path, "--detections", dt_path,
                "--json", out]
    ours_t, ref_t = [], []
    for _ in range(repeats):
        ours_t.append(timed(ours_cmd)[0])
        seconds, stdout = timed([sys.executable, "-c", REFERENCE, gt_path, dt_path])
        ref_t.append(seconds)
    ref = json.loads(stdout.strip().splitlines()[-1])  # COCO() prints its progress first
    with open(out) as f:
        ours = json.load(f)
    max_diff = max(abs(ours[k] - r) for k, r in zip(KEYS, ref))
    return {"images": images, "detections": len(dets), "gt_boxes": len(gt["annotations"]),
            "scalekd_evaluate_s": round(min(ours_t), 2), "pycocotools_s": round(min(ref_t), 2),
            "speedup": round(min(ref_t) / min(ours_t), 2), "max_abs_diff": max_diff,
            "tiny_bands": {k: v for k, v in ours.items() if k.endswith("px")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, nargs="+", default=[500, 5000])
    ap.add_argument("--detections", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = [compare(n, args.detections, args.repeats, folder) for n in args.images]
    print(table(rows, ["images", "detections", "scalekd_evaluate_s", "pycocotools_s", "speedup", "max_abs_diff"]))
    print("identical 12 numbers:", all(r["max_abs_diff"] == 0.0 for r in rows))
    print(write_json("eval_speed.json", {"rows": rows}))


if __name__ == "__main__":
    main()

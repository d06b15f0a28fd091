"""Does a model know its training images by heart? The same models on the training split and on the validation
split of one dataset, with the gap. A teacher whose training AP is far above its validation AP has learnt its
training set: an assistant trained on the ground truth of those same images from that teacher can only sharpen
towards labels the teacher already reproduces, and passes on less than the teacher's graded scores (KIT
against synthetic data).

    python benchmarks/generalisation.py --data runs/bench/kit320/kit-data-tile320 \\
        --models teacher=runs/bench/kit320/kit/seed0/teacher/model.pt --out generalisation_kit320.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import table, write_json
from scalekd.compare import eval_config
from scalekd.config import load_config, replace
from scalekd.eval.evaluate import evaluate_models

KEYS = ("AP", "AP50", "AP_S", "AP_M")


def _percent(value: float) -> float | None:
    """COCOeval's -1 (no object in the band) is no number, not -100%."""
    return round(100 * value, 2) if value >= 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True, help="a dataset root with train and val splits")
    ap.add_argument("--models", nargs="+", required=True, help="NAME=MODEL.pt ...")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--out", default="generalisation.json", help="JSON name under benchmarks/results/")
    ap.add_argument("--max-detections", type=int, default=100, help="per image, detector and COCO alike")
    args = ap.parse_args()
    models = dict(item.split("=", 1) for item in args.models)
    cfg = eval_config(replace(load_config(preset=args.preset), data={"root": args.data}), args.max_detections)
    per_split = {split: {r.name: r.metrics for r in evaluate_models(models, args.data, cfg, split)}
                 for split in (cfg.data.train_split, cfg.data.val_split)}
    train, val = per_split[cfg.data.train_split], per_split[cfg.data.val_split]
    rows = []
    for name in models:
        row = {"model": name}
        for k in KEYS:
            row[f"{k}_train"], row[f"{k}_val"] = _percent(train[name][k]), _percent(val[name][k])
            both = None not in (row[f"{k}_train"], row[f"{k}_val"])
            row[f"{k}_gap"] = round(row[f"{k}_train"] - row[f"{k}_val"], 2) if both else None
        rows.append(row)
    print(table(rows, ["model", *(f"{k}_{s}" for k in KEYS for s in ("train", "val", "gap"))]))
    print(f"wrote {write_json(args.out, {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()

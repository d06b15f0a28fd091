"""How far the trained assistant's targets have moved from the 2x teacher's own predictions on the student's
anchors (OD's targets), on the training images the student is distilled on. The assistant starts as exactly the
teacher (``distill.csa.starts_as``); a student gains from it only what its targets carry, so an assistant that
sharpens towards the ground truth on images the teacher already knows passes on less than the teacher itself.

Per distill stage (its last checkpoint): the mean top-class score on foreground anchors (matched to an object)
and background anchors (IoU below the matcher's low threshold), the share of background anchors scoring above
0.05 (the graded scores around objects), and the mean absolute difference of the top-class logits, for the
teacher's predictions and the assistant's.

    python benchmarks/targets.py --stages default=runs/bench/kit320/kit/seed0/distill-scalekd \\
        --teacher runs/bench/kit320/kit/seed0/teacher/model.pt --out targets_kit320.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.assistant import load_distiller
from benchmarks.common import table, write_json
from scalekd.data.coco import dataset_from_root
from scalekd.data.transforms import DualResolutionCollate
from scalekd.distill.distiller import Distiller

COLUMNS = ("teacher_fg", "assistant_fg", "teacher_bg", "assistant_bg", "teacher_bg_above_0.05",
           "assistant_bg_above_0.05", "logit_gap_fg", "logit_gap_bg")


def load_scalekd_distiller(distill_dir: str, teacher_uri: str) -> Distiller:
    """``assistant.load_distiller``, refused for a stage without a one-stage assistant."""
    distiller = load_distiller(distill_dir, teacher_uri)
    cfg = distiller.cfg
    if cfg.distill.method != "scalekd" or not cfg.distill.csa.enabled or not cfg.one_stage:
        raise SystemExit(f"{distill_dir}: not a one-stage ScaleKD stage with an assistant")
    return distiller.eval()


@torch.no_grad()
def target_gap(distiller: Distiller, images: int) -> dict[str, float]:
    """The columns above, averaged over batches of 4 of the first ``images`` training images (models in eval
    mode: BatchNorm at its running statistics, as at inference)."""
    cfg, parts = distiller.cfg, distiller.student_parts
    dataset = dataset_from_root(cfg.data.root, cfg.data.train_split)
    collate = DualResolutionCollate(cfg.data.student_size, cfg.data.teacher_scale, cfg.data.max_size_ratio)
    sums = dict.fromkeys(COLUMNS, 0.0)
    batches = 0
    for start in range(0, min(images, len(dataset)) - 3, 4):
        batch = collate([dataset[i] for i in range(start, start + 4)])
        out = parts.forward_train(batch.student_images, batch.student_targets)
        _, teacher_maps = distiller.teacher_maps(batch.teacher_images)
        teacher = distiller.teacher_predictions(teacher_maps, out)["cls_logits"]
        assistant_maps = distiller.method.assistant_maps(out.fpn, teacher_maps)
        assistant = parts.predict(assistant_maps, out.fpn_names, out.context, distiller.assistant_head)["cls_logits"]
        fg = torch.stack([m >= 0 for m in out.context.matched_idxs])
        bg = torch.stack([m == -1 for m in out.context.matched_idxs])
        for who, logits in (("teacher", teacher), ("assistant", assistant)):
            top = logits.sigmoid().max(-1).values
            sums[f"{who}_fg"] += float(top[fg].mean())
            sums[f"{who}_bg"] += float(top[bg].mean())
            sums[f"{who}_bg_above_0.05"] += float((top[bg] > 0.05).float().mean())
        gap = (teacher - assistant).abs().max(-1).values
        sums["logit_gap_fg"] += float(gap[fg].mean())
        sums["logit_gap_bg"] += float(gap[bg].mean())
        batches += 1
    if not batches:
        raise SystemExit(f"{cfg.data.root}: fewer than 4 training images")
    return {k: v / batches for k, v in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", required=True, help="NAME=DISTILL_STAGE_DIR ...")
    ap.add_argument("--teacher", required=True, help="the teacher's model.pt those stages distilled from")
    ap.add_argument("--images", type=int, default=48, help="training images probed (batches of 4)")
    ap.add_argument("--out", default="targets.json", help="JSON name under benchmarks/results/")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for given in args.stages:
        name, sep, stage_dir = given.partition("=")
        if not sep or not os.path.isdir(stage_dir):
            ap.error(f"--stages {given}: expected NAME=DIR with DIR a distill stage's output")
        gap = target_gap(load_scalekd_distiller(stage_dir, args.teacher), args.images)
        rows.append({"stage": name, "dir": stage_dir, **{k: round(v, 5) for k, v in gap.items()}})
        print(f"{name}: done", flush=True)
    print(table(rows, ["stage", *COLUMNS]))
    print(f"wrote {write_json(args.out, {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()

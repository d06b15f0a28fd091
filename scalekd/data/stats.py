"""Dataset statistics: objects, ignore regions, per-category and COCO size-class counts."""

from __future__ import annotations

from scalekd.data.coco import load_coco_json

SMALL_AREA, MEDIUM_AREA = 32**2, 96**2  # COCO's size classes, in original-image pixels


def dataset_stats(annotation_uri: str) -> dict:
    data = load_coco_json(annotation_uri)
    names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
    per_category = {names[c]: 0 for c in sorted(names)}
    small = medium = large = 0
    objects = 0
    ignore = set()
    degenerate = sum(data["info"].get("dropped_at_load", {}).values())  # no size, or outside the image
    for ann in data["annotations"]:
        _x, _y, w, h = ann["bbox"]
        if ann.get("iscrowd", 0) or ann.get("ignore", 0):
            ignore.add((ann["image_id"], tuple(ann["bbox"])))
            continue
        objects += 1
        per_category[names[ann["category_id"]]] += 1
        area = ann.get("area", w * h) or w * h
        if area < SMALL_AREA:
            small += 1
        elif area < MEDIUM_AREA:
            medium += 1
        else:
            large += 1
    return {"images": len(data["images"]), "annotations": objects, "ignore_regions": len(ignore),
            "degenerate_dropped": degenerate, "small": small, "medium": medium, "large": large,
            "per_category": per_category,
            "objects_per_image": round(objects / max(1, len(data["images"])), 2)}


def coverage_for_config(annotation_uri: str, cfg) -> dict:
    """Anchor coverage per size band for the config's student and its teacher (at teacher_scale, own pixels)."""
    from scalekd.data.coverage import RPN_POSITIVE_IOU, anchor_coverage, small_object_coverage
    from scalekd.geometry import student_spec, teacher_spec

    data = load_coco_json(annotation_uri)
    classes = max(1, len(data["categories"]))
    m, e = cfg.model, cfg.experimental
    threshold_rule = "some anchor reaches the positive threshold for"
    if m.detector == "fcos":
        assigner, rule = "fcos's centre sampling and per-level size ranges", "that get a positive location"
    elif m.detector == "faster_rcnn":
        assigner, rule = f"the RPN's max_iou (positive at IoU >= {RPN_POSITIVE_IOU:g})", threshold_rule
    elif e.assigner == "atss":
        assigner, rule = f"atss (k {e.atss_topk})", "that get a positive anchor"
    else:
        assigner, rule = f"max_iou (positive at IoU >= {e.positive_iou:g})", threshold_rule
    student = student_spec(cfg, classes)
    roles = {"student": anchor_coverage(data, student, e.assigner, e.atss_topk),
             "teacher": anchor_coverage(data, teacher_spec(cfg, classes), e.assigner, e.atss_topk)}
    return {"detector": m.detector, "assigner": assigner, "rule": rule, "student_min_level": student.min_level,
            **roles, "small_objects": {role: small_object_coverage(bands) for role, bands in roles.items()}}


def holdout_shares(annotation_uri: str, fraction: float) -> dict:
    """What ``data.teacher_holdout`` gives each role of this training file: images, source images, objects."""
    from scalekd.data.holdout import image_source, stage_images

    data = load_coco_json(annotation_uri)
    objects: dict = {}
    for ann in data["annotations"]:
        if not (ann.get("iscrowd", 0) or ann.get("ignore", 0)):
            objects[ann["image_id"]] = objects.get(ann["image_id"], 0) + 1
    shares: dict = {"share": fraction}
    for role, stage in (("teacher", "teacher"), ("students", "distill")):
        keep = stage_images(stage, fraction)
        images = [im for im in data["images"] if keep is None or keep(im)]
        shares[role] = {"images": len(images), "sources": len({image_source(im) for im in images}),
                        "objects": sum(objects.get(im["id"], 0) for im in images)}
    return shares


def _coverage_warning(cov: dict) -> list[str]:
    """A named warning when the student's anchors miss more small objects than the coverage bar allows: those
    objects train as background, and no distillation can give them back. Names the options that cover more."""
    from scalekd.data.coverage import COVERAGE_TARGET_PCT, SMALL_SIDE

    small = cov["small_objects"]["student"]
    if small["covered_pct"] is None or small["covered_pct"] >= COVERAGE_TARGET_PCT:
        return []
    options = ["model.student_min_level=2"] * (cov["student_min_level"] > 2 and cov["detector"] != "faster_rcnn")
    if cov["detector"] != "fcos":
        options.append("model.detector=fcos")
    if cov["detector"] == "retinanet":
        options += ["experimental.assigner=atss", "a lower experimental.positive_iou"]
    return [f"  warning: the student's anchors cover {small['covered_pct']}% of its {small['objects']} objects under "
            f"{SMALL_SIDE} px (below {COVERAGE_TARGET_PCT:g}%): the rest train as background. Options that cover "
            f"more: {', '.join(options) or 'larger inputs (data.student_size)'} (docs/method.md)"]


def format_stats(stats: dict, title: str) -> str:
    lines = [title, f"  images            {stats['images']}", f"  objects           {stats['annotations']}",
             f"  ignore regions    {stats['ignore_regions']}",
             f"  degenerate (drop) {stats['degenerate_dropped']}"]
    total = max(1, stats["annotations"])
    for key in ("small", "medium", "large"):
        lines.append(f"  {key:<17} {stats[key]} ({100.0 * stats[key] / total:.1f}%)")
    lines.append("  per category:")
    lines += [f"    {name:<20} {count}" for name, count in stats["per_category"].items()]
    if "anchor_coverage" in stats:
        from scalekd.data.coverage import SMALL_SIDE

        cov = stats["anchor_coverage"]
        lines.append(f"  anchor coverage ({cov['detector']}, assignment: {cov['assigner']}; side in "
                     f"each model's input pixels; % of objects {cov['rule']}):")
        for role in ("student", "teacher"):
            cells = [f"{band} {v['covered_pct']}% of {v['objects']}" for band, v in cov[role].items() if v["objects"]]
            small = cov["small_objects"][role]
            if small["objects"]:
                cells.append(f"all under {SMALL_SIDE} px {small['covered_pct']}%")
            lines.append(f"    {role:<8} " + "; ".join(cells))
        lines += _coverage_warning(cov)
    if "teacher_holdout" in stats:
        held = stats["teacher_holdout"]
        lines.append(f"  data.teacher_holdout {held['share']} (by source image):")
        lines += [f"    {role:<8} {held[role]['images']} images ({held[role]['sources']} sources, "
                  f"{held[role]['objects']} objects)" for role in ("teacher", "students")]
    return "\n".join(lines)

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
    degenerate = 0
    for ann in data["annotations"]:
        _x, _y, w, h = ann["bbox"]
        if ann.get("iscrowd", 0) or ann.get("ignore", 0):
            ignore.add((ann["image_id"], tuple(ann["bbox"])))
            continue
        if w <= 0 or h <= 0:
            degenerate += 1
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
    from scalekd.data.coverage import anchor_coverage
    from scalekd.train.loop import student_spec, teacher_spec

    data = load_coco_json(annotation_uri)
    classes = max(1, len(data["categories"]))
    m = cfg.model
    if m.assigner == "atss":
        assigner = f"atss (k {m.atss_topk})"
    elif m.detector == "retinanet":
        assigner = f"max_iou (positive at IoU >= {m.positive_iou:g})"
    else:
        assigner = m.assigner
    return {"detector": m.detector, "assigner": assigner,
            "student": anchor_coverage(data, student_spec(cfg, classes), m.assigner, m.atss_topk),
            "teacher": anchor_coverage(data, teacher_spec(cfg, classes), m.assigner, m.atss_topk)}


def holdout_shares(annotation_uri: str, fraction: float) -> dict:
    """What ``data.teacher_holdout`` gives each role of this training file: images, source images, objects."""
    from scalekd.data.holdout import image_source, stage_images

    data = load_coco_json(annotation_uri)
    objects: dict = {}
    for ann in data["annotations"]:
        if not (ann.get("iscrowd", 0) or ann.get("ignore", 0)):
            objects[ann["image_id"]] = objects.get(ann["image_id"], 0) + 1
    shares = {"share": fraction}
    for role, stage in (("teacher", "teacher"), ("students", "distill")):
        keep = stage_images(stage, fraction)
        images = [im for im in data["images"] if keep(im)]
        shares[role] = {"images": len(images), "sources": len({image_source(im) for im in images}),
                        "objects": sum(objects.get(im["id"], 0) for im in images)}
    return shares


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
        cov = stats["anchor_coverage"]
        rule = ("that get a positive anchor" if cov.get("assigner", "").startswith("atss")
                else "some anchor reaches the positive threshold for")
        lines.append(f"  anchor coverage ({cov['detector']}, {cov.get('assigner', 'max_iou')} assignment; side in "
                     f"each model's input pixels; % of objects {rule}):")
        for role in ("student", "teacher"):
            cells = [f"{band} {v['covered_pct']}% of {v['objects']}" for band, v in cov[role].items() if v["objects"]]
            lines.append(f"    {role:<8} " + "; ".join(cells))
    if "teacher_holdout" in stats:
        held = stats["teacher_holdout"]
        lines.append(f"  data.teacher_holdout {held['share']} (by source image):")
        lines += [f"    {role:<8} {held[role]['images']} images ({held[role]['sources']} sources, "
                  f"{held[role]['objects']} objects)" for role in ("teacher", "students")]
    return "\n".join(lines)

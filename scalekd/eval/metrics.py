"""COCO box metrics computed by pycocotools' COCOeval, read off its accumulated arrays exactly as
``COCOeval.summarize`` does, plus AR at any number of detections (VisDrone reports AR@500).

Ignore regions are crowd annotations (iscrowd=1): COCOeval does not count detections matched to them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np

from scalekd.data.coco import DataError, coco_api, is_finite_number

log = logging.getLogger(__name__)
AREAS = ("all", "small", "medium", "large")


def check_detections(gt: dict, detections: list, source: str = "detections") -> None:
    """Every detection is a COCO result of finite numbers on the ground truth's images and categories (a NaN box
    would count as a match in pycocotools: ``iou < threshold`` is False for NaN)."""
    if not isinstance(detections, list):
        raise DataError(f"{source}: expected a JSON list of COCO results, got {type(detections).__name__}")
    image_ids = {im["id"] for im in gt["images"]}
    category_ids = {c["id"] for c in gt["categories"]}
    for i, det in enumerate(detections):
        if not isinstance(det, dict):
            raise DataError(f"{source}[{i}] is {det!r}; expected an object with image_id, category_id, bbox, score")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in det:
                raise DataError(f"{source}[{i}] lacks '{key}' (COCO results: image_id, category_id, bbox, score)")
        bbox = det["bbox"]
        box_ok = isinstance(bbox, list) and len(bbox) == 4 and all(is_finite_number(v) for v in bbox)
        if not (box_ok and is_finite_number(det["score"])):
            raise DataError(f"{source}[{i}] has bbox {bbox!r} and score {det['score']!r}; expected [x, y, w, h] "
                            "and a score, all finite numbers")
        if det["image_id"] not in image_ids:
            raise DataError(f"{source}[{i}] names image_id {det['image_id']!r}, which the ground truth does "
                            "not have; are these detections for another dataset?")
        if det["category_id"] not in category_ids:
            raise DataError(f"{source}[{i}] names category_id {det['category_id']!r}; the ground truth has "
                            f"{sorted(category_ids)}")


def run_cocoeval(gt: dict, detections: list, max_detections: tuple[int, ...] = (1, 10, 100)):
    """The accumulated COCOeval object for these detections."""
    from pycocotools.cocoeval import COCOeval

    gt = {**gt, "annotations": [{**a, "area": a.get("area", a["bbox"][2] * a["bbox"][3]),
                                 # "ignore": 1 is an ignore region, as in training (see load_coco_json)
                                 "iscrowd": int(bool(a.get("iscrowd", 0) or a.get("ignore", 0)))}
                                for a in gt["annotations"]]}
    check_detections(gt, detections)
    coco_gt = coco_api(gt)
    if detections:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([dict(d) for d in detections])
    else:
        coco_dt = coco_api({"images": gt["images"], "categories": gt["categories"], "annotations": []})
    evaluator = COCOeval(coco_gt, coco_dt, "bbox")
    evaluator.params.maxDets = list(max_detections)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def metrics_from_eval(evaluator) -> dict:
    """AP, AP50, AP75, AP_S/M/L (at the largest max-detections), AR@each, AR_S/M/L; -1 = empty class."""
    p = evaluator.params
    precision, recall = evaluator.eval["precision"], evaluator.eval["recall"]  # [T,R,K,A,M], [T,K,A,M]
    last = len(p.maxDets) - 1
    t50 = int(np.where(np.isclose(p.iouThrs, 0.5))[0][0])
    t75 = int(np.where(np.isclose(p.iouThrs, 0.75))[0][0])
    out = {
        "AP": _mean_valid(precision[:, :, :, 0, last]),
        "AP50": _mean_valid(precision[t50, :, :, 0, last]),
        "AP75": _mean_valid(precision[t75, :, :, 0, last]),
        "AP_S": _mean_valid(precision[:, :, :, 1, last]),
        "AP_M": _mean_valid(precision[:, :, :, 2, last]),
        "AP_L": _mean_valid(precision[:, :, :, 3, last]),
    }
    for m, n in enumerate(p.maxDets):
        out[f"AR{n}"] = _mean_valid(recall[:, :, 0, m])
    out["AR_S"] = _mean_valid(recall[:, :, 1, last])
    out["AR_M"] = _mean_valid(recall[:, :, 2, last])
    out["AR_L"] = _mean_valid(recall[:, :, 3, last])
    return out


def evaluate_detections(gt: dict, detections: list, max_detections: tuple[int, ...] = (1, 10, 100)) -> dict:
    if not detections:
        warnings.warn("no detections to evaluate: every metric is 0 (or -1 where the size class is empty)",
                      stacklevel=2)
    return metrics_from_eval(run_cocoeval(gt, detections, max_detections))


def pr_curve(evaluator, iou: float = 0.5, area: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Recall thresholds and class-mean precision at one IoU threshold."""
    p = evaluator.params
    t = int(np.where(np.isclose(p.iouThrs, iou))[0][0])
    prec = evaluator.eval["precision"][t, :, :, AREAS.index(area), -1]  # [R, K]
    masked = np.where(prec > -1, prec, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(masked, axis=1)
    return np.asarray(p.recThrs), np.nan_to_num(mean, nan=0.0)

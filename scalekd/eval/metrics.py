"""COCO box metrics, computed by faster-coco-eval's ``COCOeval_faster`` (C++ evaluate and accumulate) and read off
its accumulated arrays as ``COCOeval.summarize`` does; plus AR at any number of detections (VisDrone reports
AR@500) and AP in tiny-object size bands (VisDrone/AI-TOD users report < 8, 8-16 and 16-32 px).

pycocotools' ``COCOeval`` stays the reference (``engine="pycocotools"``): the tests require both engines to give
the same precision and recall arrays on every pair they have. Ignore regions are crowd annotations (iscrowd=1):
neither engine counts detections matched to them.

Where we depart from pycocotools' ``summarize``: with custom max-detections, e.g. VisDrone's (1, 10, 100, 500),
``summarize`` reads AP and AR_S/M/L at ``maxDets[2]`` (100) whatever the list; we read them at the largest
(500), as faster-coco-eval's summarize and the VisDrone toolkit do. With the default (1, 10, 100) both agree.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np

from scalekd.data.annotations import DataError, coco_api, is_finite_number

log = logging.getLogger(__name__)
AREAS = ("all", "small", "medium", "large")
ENGINES = ("faster", "pycocotools")
# COCO's area ranges exactly as both engines define them (px^2).
COCO_RANGES = {"small": [0.0, 32.0**2], "medium": [32.0**2, 96.0**2], "large": [96.0**2, 1e5**2]}
# Tiny-object bands (object side, px of the annotation's image): very tiny < 8, tiny 8-16, small 16-32.
DEFAULT_BAND_EDGES = (0, 8, 16, 32)


def band_ranges(edges: tuple[int, ...]) -> dict[str, list[float]]:
    """``{"0-8px": [0, 64], ...}``: consecutive edges (object side in px) as COCO area ranges."""
    return {f"{lo}-{hi}px": [float(lo) ** 2, float(hi) ** 2] for lo, hi in zip(edges[:-1], edges[1:])}


def check_detections(gt: dict, detections: list, source: str = "detections") -> None:
    """Every detection is a COCO result of finite numbers on the ground truth's images and categories (a NaN box
    would count as a match in pycocotools: ``iou < threshold`` is False for NaN).

    Each rule runs over the whole list at C speed (set and numpy operations); the index is looked for only
    when a rule fails: a 500,000-detection file is checked in about a second."""
    if not isinstance(detections, list):
        raise DataError(f"{source}: expected a JSON list of COCO results, got {type(detections).__name__}")
    keys = {"image_id", "category_id", "bbox", "score"}
    if not all(type(d) is dict and keys <= d.keys() for d in detections):
        i, det = next((i, d) for i, d in enumerate(detections) if not (type(d) is dict and keys <= d.keys()))
        if not isinstance(det, dict):
            raise DataError(f"{source}[{i}] is {det!r}; expected an object with image_id, category_id, bbox, score")
        missing = next(k for k in ("image_id", "category_id", "bbox", "score") if k not in det)
        raise DataError(f"{source}[{i}] lacks '{missing}' (COCO results: image_id, category_id, bbox, score)")
    if not detections:
        return
    _check_numbers(detections, source)
    negative = next((i for i, d in enumerate(detections) if d["bbox"][2] < 0 or d["bbox"][3] < 0), None)
    if negative is not None:
        raise DataError(f"{source}[{negative}] has bbox {detections[negative]['bbox']!r}: a negative width or "
                        "height; expected [x, y, w, h] with w, h >= 0")
    for key, known in (("image_id", {im["id"] for im in gt["images"]}),
                       ("category_id", {c["id"] for c in gt["categories"]})):
        unknown = {d[key] for d in detections} - known
        if unknown:
            i = next(i for i, d in enumerate(detections) if d[key] in unknown)
            value = detections[i][key]
            raise DataError(f"{source}[{i}] names image_id {value!r}, which the ground truth does not have; are "
                            "these detections for another dataset?" if key == "image_id" else
                            f"{source}[{i}] names category_id {value!r}; the ground truth has {sorted(known)}")


def _check_numbers(detections: list, source: str) -> None:
    """bbox is four numbers and score one, all finite; bools, strings and None are not numbers."""
    boxes = [d["bbox"] for d in detections]
    shaped = all(type(b) is list and len(b) == 4 for b in boxes)
    flat = [v for b in boxes for v in b] + [d["score"] for d in detections] if shaped else []
    with contextlib.suppress(OverflowError):  # an integer beyond a float's range: the row check names it
        if shaped and {type(v) for v in flat} <= {int, float} and np.isfinite(np.asarray(flat, dtype=float)).all():
            return
    i = next(i for i, d in enumerate(detections) if not _finite_row(d["bbox"], d["score"]))
    det = detections[i]
    raise DataError(f"{source}[{i}] has bbox {det['bbox']!r} and score {det['score']!r}; expected [x, y, w, h] "
                    "and a score, all finite numbers")


def _finite_row(bbox, score) -> bool:
    if not (type(bbox) is list and len(bbox) == 4):
        return False
    return all(type(v) in (int, float) and is_finite_number(v) for v in (*bbox, score))


def _ground_truth(gt: dict) -> dict:
    """Areas filled in from the box and ``"ignore": 1`` made a crowd region, as in training."""
    return {**gt, "annotations": [{**a, "area": a.get("area", a["bbox"][2] * a["bbox"][3]),
                                   "iscrowd": int(bool(a.get("iscrowd", 0) or a.get("ignore", 0)))}
                                  for a in gt["annotations"]]}


def _results(gt: dict, detections: list) -> dict:
    """Detections as a COCO dataset, built as both engines' ``loadRes`` build bbox results (area w x h, ids from
    1, iscrowd 0), without its per-call copies."""
    annotations = []
    for i, d in enumerate(detections):
        x, y, w, h = d["bbox"]
        annotations.append({"id": i + 1, "image_id": d["image_id"], "category_id": d["category_id"],
                            "bbox": [x, y, w, h], "score": d["score"], "area": w * h, "iscrowd": 0})
    return {"images": gt["images"], "categories": gt["categories"], "annotations": annotations}


def run_cocoeval(gt: dict, detections: list, max_detections: tuple[int, ...] = (1, 10, 100),
                 band_edges: tuple[int, ...] = DEFAULT_BAND_EDGES, engine: str = "faster",
                 source: str = "detections"):
    """The accumulated COCOeval object for these detections: COCO's areas first, then the size bands."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: one of {ENGINES}")
    gt = _ground_truth(gt)
    check_detections(gt, detections, source)
    ranges = {**COCO_RANGES, **band_ranges(tuple(band_edges))}
    if engine == "faster":
        evaluator = _faster_eval(gt, _results(gt, detections), ranges)
    else:
        evaluator = _pycocotools_eval(gt, _results(gt, detections), ranges)
    evaluator.params.maxDets = list(max_detections)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _faster_eval(gt: dict, results: dict, ranges: dict):
    from faster_coco_eval import COCO, COCOeval_faster

    quiet = logging.getLogger("faster_coco_eval")
    quiet.setLevel(logging.WARNING)  # it warns when the bands do not span every area; they need not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = COCOeval_faster(COCO(gt), COCO(results), "bbox", ranges=ranges, print_function=quiet.debug)
    evaluator.params.areaRng = [[0.0, 1e5**2], *ranges.values()]  # exactly as pycocotools' "all"
    return evaluator


def _pycocotools_eval(gt: dict, results: dict, ranges: dict):
    from pycocotools.cocoeval import COCOeval

    evaluator = COCOeval(coco_api(gt), coco_api(results), "bbox")
    evaluator.params.areaRng = [[0.0, 1e5**2], *ranges.values()]
    evaluator.params.areaRngLbl = ["all", *ranges]
    return evaluator


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def metrics_from_eval(evaluator) -> dict:
    """AP, AP50, AP75, AP_S/M/L and AP per size band (at the largest max-detections), AR@each, AR_S/M/L;
    -1 = no object of that kind."""
    p = evaluator.params
    precision, recall = evaluator.eval["precision"], evaluator.eval["recall"]  # [T,R,K,A,M], [T,K,A,M]
    labels = list(p.areaRngLbl)
    last = len(p.maxDets) - 1
    t50 = int(np.where(np.isclose(p.iouThrs, 0.5))[0][0])
    t75 = int(np.where(np.isclose(p.iouThrs, 0.75))[0][0])
    out = {
        "AP": _mean_valid(precision[:, :, :, 0, last]),
        "AP50": _mean_valid(precision[t50, :, :, 0, last]),
        "AP75": _mean_valid(precision[t75, :, :, 0, last]),
    }
    for suffix, label in (("S", "small"), ("M", "medium"), ("L", "large")):
        out[f"AP_{suffix}"] = _mean_valid(precision[:, :, :, labels.index(label), last])
    for m, n in enumerate(p.maxDets):
        out[f"AR{n}"] = _mean_valid(recall[:, :, 0, m])
    for suffix, label in (("S", "small"), ("M", "medium"), ("L", "large")):
        out[f"AR_{suffix}"] = _mean_valid(recall[:, :, labels.index(label), last])
    for a, label in enumerate(labels):
        if label.endswith("px"):
            out[f"AP_{label}"] = _mean_valid(precision[:, :, :, a, last])
    return out


def evaluate_detections(gt: dict, detections: list, max_detections: tuple[int, ...] = (1, 10, 100),
                        band_edges: tuple[int, ...] = DEFAULT_BAND_EDGES, engine: str = "faster",
                        source: str = "detections") -> dict:
    if not detections:
        warnings.warn("no detections to evaluate: every metric is 0 (or -1 where the size class is empty)",
                      stacklevel=2)
    return metrics_from_eval(run_cocoeval(gt, detections, max_detections, band_edges, engine, source))


def pr_curve(evaluator, iou: float = 0.5, area: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Recall thresholds and class-mean precision at one IoU threshold."""
    p = evaluator.params
    t = int(np.where(np.isclose(p.iouThrs, iou))[0][0])
    prec = evaluator.eval["precision"][t, :, :, list(p.areaRngLbl).index(area), -1]  # [R, K]
    masked = np.where(prec > -1, prec, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(masked, axis=1)
    return np.asarray(p.recThrs), np.nan_to_num(mean, nan=0.0)

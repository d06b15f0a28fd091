"""COCO instances files as JSON: read, checked and indexed without torch.

Scoring a detections file (``scalekd evaluate --gt --detections``) needs only this module and the evaluator, so
it starts in a fraction of a second and never imports torch or Ray.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

from scalekd import storage


class DataError(ValueError):
    """Bad input data; the message names the file (and line or field) and what to do."""


def load_coco_json(uri: str) -> dict:
    """Parse and check a COCO instances file; tolerant of missing ``info``/``licenses``."""
    raw = storage.read_bytes(uri)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{uri}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                        "fix or regenerate the annotation file") from None
    except UnicodeDecodeError:
        raise DataError(f"{uri}: not a UTF-8 JSON file; is this an annotation file?") from None
    if not isinstance(data, dict):
        raise DataError(f"{uri}: expected a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{uri}: missing or non-list '{key}' (COCO instances format needs it)")
    for key in ("images", "annotations", "categories"):
        _check_unique_ids(uri, key, data[key])
    image_ids = {img.get("id") for img in data["images"]}
    category_ids = {c.get("id") for c in data["categories"]}
    for i, img in enumerate(data["images"]):
        for key in ("id", "file_name", "width", "height"):
            if key not in img:
                raise DataError(f"{uri}: images[{i}] lacks '{key}'")
        for key in ("width", "height"):
            if not (is_finite_number(img[key]) and img[key] > 0):
                raise DataError(f"{uri}: images[{i}] (id {img['id']}) has {key} {img[key]!r}; expected a positive "
                                "number of pixels")
    for i, ann in enumerate(data["annotations"]):
        if ann.get("image_id") not in image_ids:
            raise DataError(f"{uri}: annotations[{i}] (id {ann.get('id')}) names image_id "
                            f"{ann.get('image_id')!r}, which is not in 'images'; fix the file or add the image")
        if ann.get("category_id") not in category_ids:
            raise DataError(f"{uri}: annotations[{i}] (id {ann.get('id')}) names unknown category_id "
                            f"{ann.get('category_id')!r}; known: {sorted(category_ids)}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_finite_number(v) for v in bbox)):
            raise DataError(f"{uri}: annotations[{i}] (id {ann.get('id')}) has bbox {bbox!r}; "
                            "expected [x, y, width, height] of finite numbers")
        if "area" in ann and not (is_finite_number(ann["area"]) and ann["area"] >= 0):
            raise DataError(f"{uri}: annotations[{i}] (id {ann.get('id')}) has area {ann['area']!r}; expected a "
                            "finite number >= 0 (or no area: width x height is used)")
        if ann.get("ignore") and not ann.get("iscrowd"):
            # One meaning everywhere: "ignore": 1 is an ignore region, as "iscrowd": 1 (pycocotools' evaluation
            # would otherwise overwrite "ignore" with "iscrowd" and score it as a missed object).
            ann["iscrowd"] = 1
    if not data["images"]:
        raise DataError(f"{uri}: the dataset has no images; point at a non-empty annotation file")
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    return data


def is_finite_number(value) -> bool:
    """A real int or float (not a bool, string or None) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_unique_ids(uri: str, key: str, records: list) -> None:
    """COCO ids are unique per list; a repeated image id would give one image another's boxes."""
    seen, repeated = set(), []
    for record in records:
        if not isinstance(record, dict):
            raise DataError(f"{uri}: '{key}' holds {record!r}; expected objects")
        rid = record.get("id")
        if rid is None and key == "annotations":
            continue  # annotation ids are optional for our readers
        if rid in seen:
            repeated.append(rid)
        seen.add(rid)
    if repeated:
        shown = ", ".join(repr(r) for r in sorted(set(repeated), key=repr)[:5])
        raise DataError(f"{uri}: duplicate {key} ids {shown}; ids must be unique within '{key}'")


def coco_api(data: dict):
    """A pycocotools COCO object over an in-memory dict (quietly)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco

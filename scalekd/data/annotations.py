"""COCO instances files as JSON: read, checked and indexed without torch.

Scoring a detections file (``scalekd evaluate --gt --detections``) needs only this module and the evaluator, so
it starts in a fraction of a second and never imports torch or Ray.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re

from scalekd import storage


class DataError(ValueError):
    """Bad input data; the message names the file (and line or field) and what to do."""


SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def split_annotations(root: str, split: str) -> str:
    """``ROOT/annotations/instances_SPLIT.json``: the one place a split's file is named. A split is a plain name
    (letters, digits, ``_ . -``; not ``..`` or a path), so no split reaches a file outside its dataset root."""
    if not is_split_name(split):
        raise DataError(f"split {split!r}: {SPLIT_RULE}")
    return storage.join(root, "annotations", f"instances_{split}.json")


def is_split_name(split) -> bool:
    return isinstance(split, str) and SPLIT_NAME.fullmatch(split) is not None and ".." not in split


SPLIT_RULE = ("a plain name such as train, val or test (letters, digits, _ . -), naming "
              "annotations/instances_<split>.json")


def load_coco_json(uri: str) -> dict:
    """Parse and check a COCO instances file; tolerant of missing ``info``/``licenses``.

    The one boundary every reader shares (training, statistics, evaluation's ground truth): each field's type and
    range is checked here, and a record that breaks them is refused with its JSON path. One stated rule fixes
    rather than refuses: a box of zero or negative size, or one that misses its image, can be neither learnt nor
    found, so it is dropped here for every reader alike and counted in ``info.dropped_at_load``."""
    data = _parse(uri)
    for key in ("images", "annotations", "categories"):
        _check_unique_ids(uri, key, data[key])
    images = _check_images(uri, data["images"])
    category_ids = _check_categories(uri, data["categories"])
    for i, ann in enumerate(data["annotations"]):
        _check_annotation(uri, i, ann, images, category_ids)
    if not data["images"]:
        raise DataError(f"{uri}: the dataset has no images; point at a non-empty annotation file")
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    data["annotations"], dropped = _usable_boxes(data["annotations"], images)
    if dropped:
        data["info"] = {**data["info"], "dropped_at_load": dropped}
    return data


def _parse(uri: str) -> dict:
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
    return data


def _check_images(uri: str, images: list) -> dict:
    """Image id -> image; ids are integers, sizes positive numbers of pixels, file names relative paths inside
    images/."""
    for i, img in enumerate(images):
        for key in ("id", "file_name", "width", "height"):
            if key not in img:
                raise DataError(f"{uri}: images[{i}] lacks '{key}'")
        _require(uri, f"images[{i}]", "id", img["id"], is_integer(img["id"]), "an integer")
        _require(uri, f"images[{i}]", "file_name", img["file_name"], _inside_images(img["file_name"]),
                 "a non-empty path relative to images/ that stays inside it (no '..', no leading '/')")
        for key in ("width", "height"):
            _require(uri, f"images[{i}] (id {img['id']})", key, img[key],
                     is_finite_number(img[key]) and img[key] > 0, "a positive number of pixels")
    return {img["id"]: img for img in images}


def _inside_images(name) -> bool:
    """Images are read from ROOT/images/ only: an absolute name or one climbing out with '..' would read any file
    the process can see."""
    if not isinstance(name, str) or not name or "\0" in name:
        return False
    parts = name.replace("\\", "/").split("/")
    return not name.startswith(("/", "\\")) and ".." not in parts


def _check_categories(uri: str, categories: list) -> set:
    """Ids are integers and names are text, each name once: models, reports and the stages' class checks match
    classes by name, so two ids under one name would be one class to them."""
    names: dict[str, int] = {}
    for i, cat in enumerate(categories):
        _require(uri, f"categories[{i}]", "id", cat.get("id"), is_integer(cat.get("id")), "an integer")
        if "name" in cat:
            _require(uri, f"categories[{i}]", "name", cat["name"], isinstance(cat["name"], str), "text")
            if cat["name"] in names:
                raise DataError(f"{uri}: categories[{i}] (id {cat['id']}) repeats the name {cat['name']!r} of id "
                                f"{names[cat['name']]}; give each category its own name, or merge the two ids")
            names[cat["name"]] = cat["id"]
    return {c["id"] for c in categories}


def _check_annotation(uri: str, i: int, ann: dict, images: dict, category_ids: set) -> None:
    where = f"annotations[{i}]" + (f" (id {ann['id']})" if "id" in ann else "")
    if "id" in ann:
        _require(uri, f"annotations[{i}]", "id", ann["id"], is_integer(ann["id"]), "an integer")
    for key, known, what in (("image_id", images, "'images'"), ("category_id", category_ids, "'categories'")):
        value = ann.get(key)
        _require(uri, where, key, value, is_integer(value), "an integer")
        if value not in known:
            raise DataError(f"{uri}: {where} names unknown {key} {value!r} (not in {what}; known: "
                            f"{sorted(known)[:10]}); fix the file or add it")
    bbox = ann.get("bbox")
    _require(uri, where, "bbox", bbox, isinstance(bbox, list) and len(bbox) == 4
             and all(is_finite_number(v) for v in bbox), "[x, y, width, height] of finite numbers")
    if "area" in ann:
        _require(uri, where, "area", ann["area"], is_finite_number(ann["area"]) and ann["area"] >= 0,
                 "a finite number >= 0 (or no area: width x height is used)")
    for flag in ("iscrowd", "ignore"):
        if flag in ann:
            _require(uri, where, flag, ann[flag], ann[flag] in (0, 1) and type(ann[flag]) in (int, bool),
                     "true, false, 0 or 1")
    if ann.get("ignore") and not ann.get("iscrowd"):
        # One meaning everywhere: "ignore": 1 is an ignore region, as "iscrowd": 1 (pycocotools' evaluation
        # would otherwise overwrite "ignore" with "iscrowd" and score it as a missed object).
        ann["iscrowd"] = 1


def _usable_boxes(annotations: list, images: dict) -> tuple[list, dict]:
    """The annotations whose box has positive size and overlaps its image, and the others counted by reason."""
    kept: list = []
    dropped: dict[str, int] = {}
    for ann in annotations:
        x, y, w, h = ann["bbox"]
        image = images[ann["image_id"]]
        reason = ("zero or negative size" if w <= 0 or h <= 0 else
                  "outside its image" if x >= image["width"] or y >= image["height"] or x + w <= 0 or y + h <= 0
                  else None)
        if reason is None:
            kept.append(ann)
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    return kept, dropped


def _require(uri: str, where: str, field: str, value, ok: bool, expected: str) -> None:
    """Refuse ``where``'s ``field`` unless ``ok``, naming the file, the record and what was expected."""
    if not ok:
        raise DataError(f"{uri}: {where} has {field} {value!r}; expected {expected}")


def is_integer(value) -> bool:
    """A JSON integer (not a bool, float, string or null): what COCO's ids are."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A real int or float (not a bool, string or None) that is neither NaN nor infinite, nor an integer too large
    for a float (JSON allows 10**400)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


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

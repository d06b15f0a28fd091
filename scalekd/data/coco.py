"""COCO-format detection datasets read from local paths or s3:// URIs.

Objects (iscrowd=0) become targets; crowd boxes (iscrowd=1) become ignore regions, never objects.
Degenerate boxes are dropped and counted, the rest clipped to the image.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from scalekd import storage
from scalekd.data.annotations import (  # noqa: F401 - re-exported: the dataset's readers
    DataError, coco_api, is_finite_number, load_coco_json, split_annotations)

log = logging.getLogger(__name__)


# EXIF orientations 5-8 swap width and height (the image is stored rotated by 90 or 270 degrees).
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is meant to be seen, after its EXIF orientation: what labels refer to."""
    orientation = img.getexif().get(0x0112, 1)
    return (img.height, img.width) if orientation in _TRANSPOSED_ORIENTATIONS else img.size


def decode_image(data: bytes, name: str) -> torch.Tensor:
    """[3, H, W] float in [0, 1]; a corrupt or truncated file raises DataError naming it.

    Decoded at the image's real bit depth (a 16-bit PNG is scaled by 65535, not clipped at 255) and turned by
    its EXIF orientation, as converters measure its size (``oriented_size``)."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            img = ImageOps.exif_transpose(opened)
            if img.mode == "F":
                return _float_image(np.asarray(img, dtype=np.float32), name)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                depth = 65535.0 if img.mode.startswith("I;16") or np.asarray(img).max() > 255 else 255.0
                gray = np.asarray(img, dtype=np.float32) / depth
                return torch.from_numpy(np.clip(gray, 0.0, 1.0)).unsqueeze(0).repeat(3, 1, 1)
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{name}: {exc}; an image this large is refused (a decompression bomb, or a strip to cut "
                        "into tiles first)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name}: cannot decode image ({exc}); the file is corrupt or truncated: "
                        "replace it or remove it from the annotations") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _float_image(gray: np.ndarray, name: str) -> torch.Tensor:
    """A 32-bit float image: [0, 1] as it is, [0, 255] scaled by 255; another range has no meaning we could guess."""
    low, high = (float(gray.min()), float(gray.max())) if gray.size else (0.0, 0.0)
    if not (np.isfinite(gray).all() and low >= 0 and high <= 255):
        raise DataError(f"{name}: a 32-bit float image with values in [{low:g}, {high:g}]; expected [0, 1] or "
                        "[0, 255]: rescale it, or save it as 8- or 16-bit")
    scaled = gray if high <= 1.0 else gray / 255.0
    return torch.from_numpy(np.array(scaled, dtype=np.float32)).unsqueeze(0).repeat(3, 1, 1)  # a writable copy


@dataclass
class DatasetCounts:
    objects: int = 0
    ignore_regions: int = 0
    dropped_degenerate: int = 0
    clipped: int = 0
    per_image_dropped: dict = field(default_factory=dict)


class CocoDetection(torch.utils.data.Dataset):
    """Images with targets ``{boxes [n,4] xyxy, labels [n] in 1..K, ignore_boxes [m,4], image_id}``."""

    def __init__(self, annotation_uri: str, images_uri: str, cache: bool = True,
                 keep: Callable[[dict], bool] | None = None):
        """``keep(image entry)`` selects the images to use (``data.teacher_holdout``); the rest and their
        annotations are left out, categories kept."""
        self.annotation_uri = annotation_uri
        self.images_uri = images_uri.rstrip("/")
        self.cache = cache
        self.data = load_coco_json(annotation_uri)
        if keep is not None:
            self.data = _restricted(self.data, keep)
        cats = sorted(c["id"] for c in self.data["categories"])
        self.category_ids = cats  # contiguous label k (1-based) <-> cats[k - 1]
        self.label_of_category = {c: i + 1 for i, c in enumerate(cats)}
        self.category_names = {c["id"]: c.get("name", str(c["id"])) for c in self.data["categories"]}
        self.images = sorted(self.data["images"], key=lambda im: im["id"])
        # Boxes of no size or outside their image were dropped at load, for every reader (load_coco_json).
        self.counts = DatasetCounts(dropped_degenerate=sum(self.data["info"].get("dropped_at_load", {}).values()))
        by_image: dict = {im["id"]: [] for im in self.images}
        for ann in self.data["annotations"]:
            by_image[ann["image_id"]].append(ann)
        self._targets = [self._build_target(im, by_image[im["id"]]) for im in self.images]
        if self.counts.dropped_degenerate:
            log.warning("%s: dropped %d boxes of zero or negative size, outside their image or slivers after "
                        "clipping", annotation_uri,
                        self.counts.dropped_degenerate)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def _build_target(self, image: dict, anns: list) -> dict:
        w, h = float(image["width"]), float(image["height"])
        boxes, labels, ignore = [], [], []
        for ann in anns:
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(w, x + bw), min(h, y + bh)
            if bw <= 0 or bh <= 0 or x2 - x1 < 1e-3 or y2 - y1 < 1e-3:
                self.counts.dropped_degenerate += 1
                self.counts.per_image_dropped[image["id"]] = self.counts.per_image_dropped.get(image["id"], 0) + 1
                continue
            if (x1, y1, x2, y2) != (x, y, x + bw, y + bh):
                self.counts.clipped += 1
            if ann.get("iscrowd", 0) or ann.get("ignore", 0):
                ignore.append([x1, y1, x2, y2])
                self.counts.ignore_regions += 1
            else:
                boxes.append([x1, y1, x2, y2])
                labels.append(self.label_of_category[ann["category_id"]])
                self.counts.objects += 1
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "ignore_boxes": torch.tensor(ignore, dtype=torch.float32).reshape(-1, 4),
            "image_id": int(image["id"]),
        }

    def __len__(self) -> int:
        return len(self.images)

    def image_uri(self, index: int) -> str:
        return f"{self.images_uri}/{self.images[index]['file_name']}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        uri = self.image_uri(index)
        try:
            raw = storage.read_bytes(uri, cache=self.cache)
        except storage.StorageError as exc:
            raise DataError(f"{exc} (image of {self.annotation_uri})") from None
        image = decode_image(raw, uri)
        meta = self.images[index]
        if image.shape[1:] != (meta["height"], meta["width"]):
            raise DataError(f"{uri}: image is {image.shape[2]}x{image.shape[1]} but the annotations say "
                            f"{meta['width']}x{meta['height']}; regenerate the annotation file")
        target = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in self._targets[index].items()}
        return image, target


def _restricted(data: dict, keep: Callable[[dict], bool]) -> dict:
    images = [im for im in data["images"] if keep(im)]
    ids = {im["id"] for im in images}
    return {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}


def resolve_root(root: str) -> str:
    """``PREFIX/latest`` means the newest dataset under PREFIX: scheduled retraining points at a prefix that gains a
    dated folder per data drop. Newest is last in natural order: runs of digits compare as numbers, so
    ``2026-10-01`` is after ``2026-9-30`` and ``drop-10`` after ``drop-9`` (ISO dates sort right either way)."""
    if not root.rstrip("/").endswith("/latest"):
        return root
    prefix = root.rstrip("/")[: -len("/latest")]
    marker = "/annotations/"
    roots = sorted({u[: u.index(marker)] for u in storage.list_uris(prefix) if marker in u}, key=_natural)
    if not roots:
        raise DataError(f"{root}: no dataset (a folder with annotations/) under {prefix}")
    log.info("%s is %s (the last of %d in natural order)", root, roots[-1], len(roots))
    return roots[-1]


def _natural(text: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def dataset_from_root(root: str, split: str, cache: bool = True,
                      keep: Callable[[dict], bool] | None = None) -> CocoDetection:
    """The project's layout: ``ROOT/annotations/instances_SPLIT.json`` and ``ROOT/images/``."""
    root = resolve_root(root)
    return CocoDetection(split_annotations(root, split),
                         storage.join(root, "images"), cache=cache, keep=keep)

"""Converters to COCO JSON: VisDrone2019-DET txt (optionally split into 4 patches) and YOLO txt; ``tile_coco``
cuts a converted set into fixed-size tiles (wide aerial strips at a resolution where their objects stay visible)."""

from __future__ import annotations

import io
import math
import os

from PIL import Image, ImageOps

from scalekd import storage
from scalekd.data.coco import DataError, oriented_size

# VisDrone2019-DET: 0 = ignored region, 1..10 objects, 11 = others (treated as ignore regions).
VISDRONE_NAMES = ("pedestrian", "people", "bicycle", "car", "van", "truck", "tricycle",
                  "awning-tricycle", "bus", "motor")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SLIVER_MIN_SIDE = 2.0  # px: a clipped box thinner than this is dropped
SLIVER_MIN_KEPT = 0.25  # fraction of a box's area that must remain inside a patch


def _image_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(storage.read_bytes(path))) as img:
            img.verify()
        with Image.open(io.BytesIO(storage.read_bytes(path))) as img:
            return oriented_size(img)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: {exc}; an image this large is refused (a decompression bomb, or a strip to cut "
                        "into tiles first)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({exc}); replace or remove it") from None


class DropReport:
    """What a converter left out and why: counts per reason and the first few file:line, stored in the COCO
    file's ``info.conversion`` and printed by the CLI. Nothing is dropped without a word."""

    def __init__(self, source: str):
        self.source = source
        self.counts: dict[str, int] = {}
        self.examples: list[str] = []
        self.skipped: dict[str, int] = {}
        self.skipped_examples: list[str] = []

    def drop(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")

    def skip(self, reason: str, path: str) -> None:
        """A source file that is not in the output: every file under the source is in one or the other."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(f"{path}: {reason}")

    def finish(self, coco: dict) -> dict:
        """Record the report in ``coco``; a conversion that kept no annotation at all is an error."""
        kept = sum(1 for a in coco["annotations"] if not a.get("iscrowd"))
        coco["info"] = {"conversion": {"source": self.source, "kept": kept, "dropped": dict(self.counts),
                                       "examples": list(self.examples), "not_converted": dict(self.skipped),
                                       "not_converted_examples": list(self.skipped_examples)}}
        if kept == 0:
            why = "; ".join(f"{n} {r}" for r, n in self.counts.items()) or "no label lines found"
            raise DataError(f"{self.source}: no annotations kept ({why}); e.g. {self.examples[:3]}"
                            if self.examples else f"{self.source}: no annotations kept ({why})")
        return coco


def _find_image(images_dir: str, stem: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        candidate = os.path.join(images_dir, stem + suffix)
        if os.path.exists(candidate):
            return candidate
    raise DataError(f"no image for annotation '{stem}' in {images_dir} (looked for {IMAGE_SUFFIXES})")


def parse_visdrone_line(line: str, path: str, lineno: int) -> tuple[list[float], int, bool]:
    """(box, category, evaluated): the toolkit's ground truth marks a box it ignores with score 0."""
    fields = [f for f in line.strip().rstrip(",").split(",")]
    if len(fields) != 8:
        raise DataError(f"{path}:{lineno}: expected 8 comma-separated fields "
                        "(left,top,width,height,score,category,truncation,occlusion), got "
                        f"{len(fields)}: {line.strip()!r}")
    try:
        left, top, width, height = (float(v) for v in fields[:4])
        score, category = int(fields[4]), int(fields[5])
    except ValueError:
        raise DataError(f"{path}:{lineno}: non-numeric field in {line.strip()!r}") from None
    if not all(math.isfinite(v) for v in (left, top, width, height)):
        raise DataError(f"{path}:{lineno}: non-finite box {line.strip()!r}; fix or remove the line")
    if not 0 <= category <= 11:
        raise DataError(f"{path}:{lineno}: category {category} is outside VisDrone's 0..11")
    if score not in (0, 1):
        raise DataError(f"{path}:{lineno}: score {score} in a ground-truth file; VisDrone's is 1 (evaluated) or 0 "
                        "(ignored)")
    return [left, top, width, height], category, score == 1


def convert_visdrone(src: str, patches: int = 1, images_out: str | None = None) -> dict:
    """COCO dict from ``SRC/images`` + ``SRC/annotations``; ignored (category 0 or score 0) and others (11) become
    crowd."""
    if patches not in (1, 4):
        raise DataError(f"--patches {patches}: VisDrone conversion supports 1 or 4 (2x2) patches")
    if patches == 4 and not images_out:
        raise DataError("--patches 4 writes patch images: give an images output folder")
    ann_dir, img_dir = os.path.join(src, "annotations"), os.path.join(src, "images")
    if not os.path.isdir(ann_dir) or not os.path.isdir(img_dir):
        raise DataError(f"{src}: expected VisDrone2019-DET layout with images/ and annotations/")
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(VISDRONE_NAMES)]
    out = {"images": [], "annotations": [], "categories": categories}
    ann_files = sorted(f for f in os.listdir(ann_dir) if f.endswith(".txt"))
    if not ann_files:
        raise DataError(f"{ann_dir}: no .txt annotation files")
    report = DropReport(src)
    used: set[str] = set()
    for txt in ann_files:
        path = os.path.join(ann_dir, txt)
        image_path = _find_image(img_dir, txt[:-4])
        width, height = _image_size(image_path)
        objects: list = []
        ignores: list = []
        for lineno, line in enumerate(storage.read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            bbox, category, evaluated = parse_visdrone_line(line, path, lineno)
            if bbox[2] <= 0 or bbox[3] <= 0:
                report.drop("non-positive width or height", f"{path}:{lineno}")
                continue
            ignored = category in (0, 11) or not evaluated
            (ignores if ignored else objects).append((bbox, category, f"{path}:{lineno}"))
        tiles = _tiles(width, height, patches)
        source = _read_upright(image_path) if images_out and patches > 1 else None  # patches > 1 needs images_out
        for t_index, tile in enumerate(tiles):
            image_id = len(out["images"]) + 1
            file_name = os.path.basename(image_path)
            if source is not None and images_out:
                stem, suffix = os.path.splitext(file_name)
                file_name = f"{stem}_p{t_index}{suffix}"
                _save_crop(source, tile, storage.join(images_out, file_name))
            out["images"].append({"id": image_id, "file_name": file_name, "width": tile[2], "height": tile[3]})
            for bbox, category, _where in objects:
                _add_clipped(out, image_id, category, bbox, tile, crowd=False)
            for bbox, _, _where in ignores:  # an ignored region ignores every class (COCOeval: crowd per class)
                for cat in range(1, len(VISDRONE_NAMES) + 1):
                    _add_clipped(out, image_id, cat, bbox, tile, crowd=True)
        for bbox, _category, where in objects:  # in no tile (outside the image, or a sliver in every tile)
            if not any(_clip_to_tile(bbox, tile) for tile in tiles):
                report.drop("outside the image or a sliver after clipping", where)
        used |= {os.path.abspath(path), os.path.abspath(image_path)}
    _account_for_every_file(report, src, used, (ann_dir, img_dir))
    return report.finish(out)


def _tiles(width: int, height: int, patches: int) -> list[tuple[int, int, int, int]]:
    if patches == 1:
        return [(0, 0, width, height)]
    hw, hh = width // 2, height // 2
    return [(0, 0, hw, hh), (hw, 0, width - hw, hh), (0, hh, hw, height - hh), (hw, hh, width - hw, height - hh)]


def tile_coco(coco: dict, images_dir: str, images_out: str, side: int) -> dict:
    """The same annotations on tiles of at most ``side`` x ``side`` px, spread evenly so each image is covered with
    the fewest tiles (neighbours overlap where the image is not a multiple of ``side``).

    Why: detectors resize a whole image to the student's size, so a 1764 x 430 aerial strip at a 128 px student
    leaves a 25 px car at 3 px; tiles keep the object's scale at the cost of context. Boxes are clipped to each
    tile (slivers dropped, as ``--patches``), an object across a seam is in both tiles, crowd and ignore flags are
    kept, and every tile records its source image (``source_image_id``) so a split by image stays one."""
    if side < 32:
        raise DataError(f"tile side {side}: must be at least 32 px")
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    out = {"images": [], "annotations": [], "categories": coco["categories"]}
    for image in coco["images"]:
        # Tiles keep the source's sub-folder, so two images with one stem in different folders cannot collide.
        stem, suffix = os.path.splitext(image["file_name"])
        source = _read_upright(os.path.join(images_dir, image["file_name"]))
        for index, tile in enumerate(_even_tiles(image["width"], image["height"], side)):
            file_name = f"{stem}_t{index}{suffix}"
            _save_crop(source, tile, storage.join(images_out, file_name))
            tile_id = len(out["images"]) + 1
            out["images"].append({"id": tile_id, "file_name": file_name, "width": tile[2], "height": tile[3],
                                  "source_image_id": image["id"]})
            for ann in by_image.get(image["id"], []):
                crowd = bool(ann.get("iscrowd"))
                added = _add_clipped(out, tile_id, ann["category_id"], ann["bbox"], tile, crowd)
                if added and ann.get("ignore"):
                    out["annotations"][-1]["ignore"] = 1
    return out


def _even_tiles(width: int, height: int, side: int) -> list[tuple[int, int, int, int]]:
    def starts(length: int) -> list[int]:
        count = max(1, math.ceil(length / side))
        span = length - min(side, length)
        return [round(i * span / (count - 1)) if count > 1 else 0 for i in range(count)]

    tw, th = min(side, width), min(side, height)
    return [(x, y, tw, th) for y in starts(height) for x in starts(width)]


def _clip_to_tile(bbox: list[float], tile: tuple[int, int, int, int]) -> list[float] | None:
    x, y, w, h = bbox
    tx, ty, tw, th = tile
    if w <= 0 or h <= 0:
        return None
    x1, y1 = max(x, tx), max(y, ty)
    x2, y2 = min(x + w, tx + tw), min(y + h, ty + th)
    cw, ch = x2 - x1, y2 - y1
    if cw < SLIVER_MIN_SIDE or ch < SLIVER_MIN_SIDE or cw * ch < SLIVER_MIN_KEPT * w * h:
        return None
    return [x1 - tx, y1 - ty, cw, ch]


def _add(out: dict, image_id: int, category: int, bbox: list[float], crowd: bool) -> None:
    out["annotations"].append({"id": len(out["annotations"]) + 1, "image_id": image_id,
                               "category_id": category, "bbox": [round(v, 2) for v in bbox],
                               "area": round(bbox[2] * bbox[3], 2), "iscrowd": int(crowd)})


def _add_clipped(out: dict, image_id: int, category: int, bbox: list[float], tile: tuple[int, int, int, int],
                 crowd: bool) -> bool:
    """Add ``bbox`` clipped to ``tile`` in the tile's pixels; False (nothing added) for a sliver or a miss."""
    clipped = _clip_to_tile(bbox, tile)
    if clipped:
        _add(out, image_id, category, clipped, crowd)
    return bool(clipped)


def _read_upright(path: str) -> Image.Image:
    """The image decoded and upright (EXIF orientation applied, as the sizes we record are), keeping its format
    name; an unreadable file is a DataError that names it."""
    try:
        with Image.open(io.BytesIO(storage.read_bytes(path))) as source:
            upright = ImageOps.exif_transpose(source)  # a decoded copy
            upright.format = source.format or "PNG"
            return upright
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: {exc}; an image this large is refused (a decompression bomb, or a strip to cut "
                        "into tiles first)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({exc}); replace or remove it") from None


def _save_crop(image: Image.Image, tile: tuple[int, int, int, int], uri: str) -> None:
    """Write ``tile`` (x, y, w, h) of ``image`` to ``uri`` in the source's format (JPEG at quality 95)."""
    tx, ty, tw, th = tile
    buf = io.BytesIO()
    image.crop((tx, ty, tx + tw, ty + th)).save(buf, format=image.format, quality=95)
    storage.write_bytes(uri, buf.getvalue())


def yolo_layout(src: str, split: str | None = None) -> tuple[str, str]:
    """(image folder, label folder) of a YOLO set: labels beside their images in ``src``; the standard
    ``src/images`` + ``src/labels``; or one split of Ultralytics' ``src/images/SPLIT`` + ``src/labels/SPLIT``, which
    converts one split at a time (one annotation file per split), so ``split`` names it."""
    images, labels = os.path.join(src, "images"), os.path.join(src, "labels")
    if not (os.path.isdir(images) and os.path.isdir(labels)):
        if split:
            raise DataError(f"--split {split}: {src} has no images/ and labels/ folders to hold splits")
        return src, src
    splits = sorted(d for d in os.listdir(images) if os.path.isdir(os.path.join(images, d)))
    has_images = any(f.lower().endswith(IMAGE_SUFFIXES) for f in os.listdir(images))
    if splits and not has_images:
        if split is None:
            raise DataError(f"{src}: one folder per split under images/ ({', '.join(splits)}); convert each split "
                            "into its own annotation file with --split NAME")
        if split not in splits:
            raise DataError(f"--split {split}: {images} holds the splits {', '.join(splits)}")
        return os.path.join(images, split), os.path.join(labels, split)
    if split:
        raise DataError(f"--split {split}: {images} holds images, not one folder per split")
    return images, labels


def convert_yolo(src: str, names_file: str, split: str | None = None) -> dict:
    """COCO dict from YOLO labels (``class cx cy w h`` normalised to [0, 1]) in any layout of ``yolo_layout``.
    Dropped labels are reported (``DropReport``): coordinates outside [0, 1] (pixels, probably), empty boxes, boxes
    outside the image; so is every file under ``src`` that is not in the output, with the reason."""
    names = [n.strip() for n in storage.read_text(names_file).splitlines() if n.strip()]
    if not names:
        raise DataError(f"{names_file}: no class names")
    out = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}
    if not os.path.isdir(src):
        raise DataError(f"{src}: not a folder; give the folder with the images and their .txt labels")
    image_dir, label_dir = yolo_layout(src, split)
    image_files = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_SUFFIXES))
    if not image_files:
        raise DataError(f"{image_dir}: no images found (accepted: {', '.join(IMAGE_SUFFIXES)})")
    label_of = _yolo_labels(label_dir, image_files)
    used = {os.path.abspath(names_file)} | {os.path.abspath(os.path.join(image_dir, f)) for f in image_files} | \
        {os.path.abspath(p) for p in label_of.values()}
    report = DropReport(src)
    for file_name in image_files:
        image_path = os.path.join(image_dir, file_name)
        width, height = _image_size(image_path)
        image_id = len(out["images"]) + 1
        out["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        label_path = label_of.get(file_name)
        if label_path is None:
            continue  # an image without a label file has no objects (YOLO convention)
        for lineno, line in enumerate(storage.read_text(label_path).splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 5:
                raise DataError(f"{label_path}:{lineno}: expected 'class cx cy w h', got {line.strip()!r}")
            try:
                cls = int(fields[0])
                cx, cy, w, h = (float(v) for v in fields[1:])
            except ValueError:
                raise DataError(f"{label_path}:{lineno}: non-numeric field in {line.strip()!r}") from None
            if not all(math.isfinite(v) for v in (cx, cy, w, h)):
                raise DataError(f"{label_path}:{lineno}: non-finite coordinates {line.strip()!r}; fix or "
                                "remove the line")
            if not 0 <= cls < len(names):
                raise DataError(f"{label_path}:{lineno}: class {cls} not in {names_file} "
                                f"({len(names)} names)")
            where = f"{label_path}:{lineno}"
            if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
                report.drop("coordinates outside [0, 1] (pixels instead of normalised?)", where)
                continue
            x0 = max(0.0, (cx - w / 2) * width)
            y0 = max(0.0, (cy - h / 2) * height)
            x1 = min(float(width), (cx + w / 2) * width)
            y1 = min(float(height), (cy + h / 2) * height)
            if x1 - x0 <= 0 or y1 - y0 <= 0:
                report.drop("empty box after clipping to the image", where)
                continue
            _add(out, image_id, cls + 1, [x0, y0, x1 - x0, y1 - y0], crowd=False)
    _account_for_every_file(report, src, used, (image_dir, label_dir))
    return report.finish(out)


def _yolo_labels(label_dir: str, image_files: list[str]) -> dict[str, str]:
    """Image file -> its label file (``.txt`` in any case); one label that two images would share (``a.png`` and
    ``a.jpg``) is refused: whichever image got it, the other would silently become background."""
    labels = {os.path.splitext(f)[0]: os.path.join(label_dir, f) for f in sorted(os.listdir(label_dir))
              if f.lower().endswith(".txt")}  # read through storage.read_text, which names a FIFO or folder
    by_stem: dict[str, list[str]] = {}
    for image in image_files:
        by_stem.setdefault(os.path.splitext(image)[0], []).append(image)
    for stem, images in by_stem.items():
        if len(images) > 1 and stem in labels:
            raise DataError(f"{labels[stem]}: one label for {len(images)} images ({', '.join(images)}); rename "
                            "the images so that each has its own label")
    return {image: labels[os.path.splitext(image)[0]] for image in image_files
            if os.path.splitext(image)[0] in labels}


def _account_for_every_file(report: DropReport, src: str, used: set[str], read_from: tuple[str, str]) -> None:
    """Report, with its reason, every file under ``src`` that the conversion did not use."""
    folders = {os.path.abspath(d) for d in read_from}
    for folder, _dirs, files in os.walk(src):
        for name in sorted(files):
            path = os.path.abspath(os.path.join(folder, name))
            if path in used:
                continue
            suffix = os.path.splitext(name)[1].lower()
            if os.path.abspath(folder) not in folders:
                reason = "outside the folders converted (another split: --split NAME; or not part of the layout)"
            elif suffix == ".txt":
                reason = "a label without an image"
            elif suffix in IMAGE_SUFFIXES:
                reason = "an image without its annotation file"
            else:
                reason = f"not an image type we read ({suffix or 'no suffix'}; accepted: {', '.join(IMAGE_SUFFIXES)})"
            report.skip(reason, os.path.join(folder, name))

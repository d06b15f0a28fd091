"""Deterministic synthetic small-object scenes in COCO format.

Objects are told apart by *shape* only (every class draws from the same colour palette), most of
them 8-24 px at the generated size, so at the student's half resolution they are 4-12 px and their
shapes blur together, while the teacher's 2x view still resolves them: doubling the input resolution
visibly helps, which is exactly the gap ScaleKD is meant to close. Backgrounds are cluttered with
low-frequency shading, pixel noise and distractor strokes that belong to no class.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from scalekd import storage
from scalekd.data.annotations import DataError, split_annotations

CLASSES = ("disc", "square", "ring", "cross")
PALETTE = [(230, 60, 50), (60, 200, 80), (60, 110, 240), (240, 220, 60), (240, 240, 240), (200, 80, 220)]
# (fraction, min side, max side) in px at the generated size; COCO small < 32^2 <= medium < 96^2.
SIZE_MIX = ((0.72, 8, 24), (0.24, 34, 80), (0.04, 100, 140))


def _background(rng: np.random.RandomState, size: int) -> np.ndarray:
    coarse = rng.uniform(40, 150, size=(4, 4, 3)).astype(np.float32)
    coarse_image = Image.fromarray(coarse.astype(np.uint8))
    img = np.asarray(coarse_image.resize((size, size), Image.Resampling.BILINEAR), np.float32)
    img += rng.normal(0, 12, size=(size, size, 3))
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.randint(6, 14)):  # distractor strokes: thin lines and arcs of no class
        x0, y0 = rng.randint(0, size, 2)
        x1, y1 = x0 + rng.randint(-40, 40), y0 + rng.randint(-40, 40)
        colour = tuple(int(c) for c in rng.randint(60, 200, 3))
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.randint(1, 3)))
    return np.asarray(canvas)


def _draw_object(draw: ImageDraw.ImageDraw, cls: int, box: tuple[int, ...], colour) -> None:
    x0, y0, x1, y1 = box
    w = x1 - x0
    if cls == 0:
        draw.ellipse(box, fill=colour)
    elif cls == 1:
        draw.rectangle(box, fill=colour)
    elif cls == 2:
        draw.ellipse(box, outline=colour, width=max(2, w // 4))
    else:
        t = max(2, w // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((x0, cy - t // 2, x1, cy + (t - t // 2)), fill=colour)
        draw.rectangle((cx - t // 2, y0, cx + (t - t // 2), y1), fill=colour)


def _intersects(a, b, margin: int = 0) -> bool:
    return (min(a[2], b[2]) + margin > max(a[0], b[0])) and (min(a[3], b[3]) + margin > max(a[1], b[1]))


def render_scene(rng: np.random.RandomState, size: int,
                 object_scale: float | None = None) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """One image [size, size, 3] uint8 and its objects as (class index, [x0, y0, x1, y1]).

    Object sides are ``SIZE_MIX`` x ``object_scale``; by default size/256, so a scene looks the same at any size.
    ``object_scale=1`` keeps the objects' pixel sizes whatever the scene size (the pipeline's data: a 128 px
    scene for a 64 px student still has 8-24 px objects, 4-12 px at the student's size)."""
    canvas = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(canvas)
    objects: list[tuple[int, list[int]]] = []
    target = rng.randint(8, 20)
    scale = size / 256.0 if object_scale is None else object_scale
    fractions = np.array([m[0] for m in SIZE_MIX])
    for _ in range(target * 8):
        if len(objects) >= target:
            break
        tier = SIZE_MIX[rng.choice(len(SIZE_MIX), p=fractions / fractions.sum())]
        side = int(round(rng.randint(tier[1], tier[2] + 1) * scale))
        side = max(4, min(side, size - 2))
        x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
        box = [int(x0), int(y0), int(x0 + side), int(y0 + side)]
        # No overlap at all: a small object drawn under a later large one would be labelled but invisible.
        if any(_intersects(box, other, margin=2) for _, other in objects):
            continue
        cls = int(rng.randint(len(CLASSES)))
        colour = PALETTE[rng.randint(len(PALETTE))]
        _draw_object(draw, cls, tuple(box), colour)
        objects.append((cls, box))
    return np.asarray(canvas), objects


def generate(out: str, images: int, seed: int = 0, size: int = 256, val_fraction: float = 0.2,
             object_scale: float | None = None) -> dict:
    """Write ``OUT/images/*.png`` and ``OUT/annotations/instances_{train,val}.json``; returns counts."""
    if images < 2:
        raise DataError(f"--images {images}: need at least 2 (one train, one val)")
    if not 64 <= size <= 4096:  # 60000 px would be a 10 GB scene, found only when the first one is drawn
        raise DataError(f"--size {size}: a scene side from 64 to 4096 px")
    if not 0 <= seed < 2**32:
        raise DataError(f"--seed {seed}: an integer from 0 to 2**32 - 1")
    rng = np.random.RandomState(seed)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    n_val = max(1, int(round(images * val_fraction)))
    splits: dict[str, dict] = {s: {"images": [], "annotations": [], "categories": categories}
                               for s in ("train", "val")}
    ann_id = 1
    for index in range(images):
        split = "val" if index >= images - n_val else "train"
        pixels, objects = render_scene(rng, size, object_scale)
        name = f"synth_{seed:04d}_{index:06d}.png"
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        storage.write_bytes(storage.join(out, "images", name), buf.getvalue())
        splits[split]["images"].append({"id": index + 1, "file_name": name, "width": size, "height": size})
        for cls, (x0, y0, x1, y1) in objects:
            w, h = x1 - x0, y1 - y0
            splits[split]["annotations"].append({
                "id": ann_id, "image_id": index + 1, "category_id": cls + 1,
                "bbox": [x0, y0, w, h], "area": float(w * h), "iscrowd": 0})
            ann_id += 1
    for split, data in splits.items():
        data["info"] = {"description": f"scalekd synthetic small objects, seed {seed}, size {size}",
                        "object_scale": size / 256.0 if object_scale is None else object_scale}
        storage.write_text(split_annotations(out, split), json.dumps(data))
    return {split: {"images": len(d["images"]), "annotations": len(d["annotations"])}
            for split, d in splits.items()}


def ensure_synthetic(out: str, images: int, seed: int = 0, size: int = 256, object_scale: float | None = None) -> str:
    """Generate once: reuse ``out`` when both annotation files are already there."""
    train = storage.join(out, "annotations", "instances_train.json")
    val = storage.join(out, "annotations", "instances_val.json")
    if not (storage.exists(train) and storage.exists(val)):
        if not storage.is_s3(out):
            os.makedirs(out, exist_ok=True)
        generate(out, images, seed, size, object_scale=object_scale)
    return out

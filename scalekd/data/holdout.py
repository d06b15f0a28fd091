"""The teacher's own images: a share of the training images that only the teacher trains on (``data.teacher_holdout``).

Why (measured, docs/results.md): on a small training set a teacher
learns its images by heart (KIT cars: AP_S 87 on its own training tiles, 67 on val), so on those images its
predictions carry little beyond the labels, and output distillation and an assistant that starts as the teacher
read it where it is least like itself on new images. A teacher trained on the other half of the images gave OD
+12.4 to +20.1 AP_S over the plain student on three seeds, against +3.3 (5 seeds) with the teacher that had seen
every image.
Not in the paper (its teacher trains on all of COCO's training images); off by default (0).

The split is by source image, so the tiles or patches of one photograph stay together (``source_image_id``,
written by the tiling converters; an image without one is its own source), and by a hash of the source id, not a
shuffle: an image keeps its role when images are added (scheduled retraining on a growing dataset never moves a
teacher's image into the students' share), whatever the seed. The benchmark's measured runs
(``benchmarks/quality.py --holdout-teacher``) split by a seeded shuffle instead, into exactly half of the sources;
the principle, disjoint shares by source (``image_source``, shared by both), is the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

TEACHER_STAGE = "teacher"


def image_source(image: dict):
    """The photograph a COCO image entry was cut from: its ``source_image_id``, else the image itself."""
    return image.get("source_image_id", image["id"])


def in_teacher_share(source, fraction: float) -> bool:
    """Whether a source image belongs to the teacher's share: a fixed point in [0, 1) hashed from its id."""
    digest = hashlib.sha256(f"scalekd-teacher-holdout:{source}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < fraction


def stage_images(stage: str, fraction: float) -> Callable[[dict], bool] | None:
    """Which training images a stage trains on: the teacher its share, every student stage (warm-up, distillation)
    the rest; None (every image) when ``fraction`` is 0."""
    if not fraction:
        return None
    teacher = stage == TEACHER_STAGE
    return lambda image: in_teacher_share(image_source(image), fraction) == teacher

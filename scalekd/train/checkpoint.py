"""Checkpoints and model files: plain dicts of tensors and primitives, written atomically, loaded with
``weights_only=True`` (no pickled code runs from a file someone handed you).

The student's model file holds the student alone; the teacher, the assistant and the optimizers live
in the stage's resumable checkpoints only.
"""

from __future__ import annotations

import io
import logging
import re

import torch

from scalekd import storage
from scalekd.geometry import DetectorSpec
from scalekd.models.detectors import build_detector

log = logging.getLogger(__name__)
MODEL_FORMAT = "scalekd-model-v1"
CHECKPOINT_FORMAT = "scalekd-checkpoint-v1"
_ITER_RE = re.compile(r"iter_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    pass


def save(obj: dict, uri: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes(uri, buf.getvalue())


def load(uri: str) -> dict:
    raw = storage.read_bytes(uri)
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own message can suggest weights_only=False (unsafe loading): never pass that advice on.
        raise CheckpointError(f"{uri}: not a scalekd model or checkpoint file (unreadable as one: "
                              f"{type(exc).__name__}); it may be truncated, or not a file scalekd wrote") from None


def checkpoint_uri(out: str, iteration: int) -> str:
    return storage.join(out, "checkpoints", f"iter_{iteration:07d}.pt")


def latest_checkpoint(out: str) -> str | None:
    found = [(int(m.group(1)), u) for u in storage.list_uris(storage.join(out, "checkpoints"))
             if (m := _ITER_RE.search(u))]
    return max(found)[1] if found else None


def prune_checkpoints(out: str, keep: int = 2) -> None:
    found = sorted((int(m.group(1)), u) for u in storage.list_uris(storage.join(out, "checkpoints"))
                   if (m := _ITER_RE.search(u)))
    for _, uri in found[:-keep]:
        storage.delete(uri)


def model_uri(out: str) -> str:
    return storage.join(out, "model.pt")


def save_model(model: torch.nn.Module, spec: DetectorSpec, out: str, categories: list, extra: dict) -> str:
    uri = model_uri(out)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save({"format": MODEL_FORMAT, "spec": spec.to_dict(), "state_dict": state,
          "categories": categories, **extra}, uri)
    return uri


def load_model(uri: str, expect: DetectorSpec | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild a detector from its model file; errors name both architectures on a mismatch."""
    blob = load(uri)
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(f"{uri}: not a scalekd model file (format {found!r})")
    try:
        spec = DetectorSpec(**blob["spec"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{uri}: its stored spec is unreadable ({exc}); re-export the model") from None
    wrong = spec.problems()
    if wrong:
        raise CheckpointError(f"{uri}: its stored spec is out of range ({', '.join(wrong)}); the file was altered or "
                              "written by other code") from None
    if expect is not None:
        mine = (expect.detector, expect.backbone, expect.num_classes, expect.fpn_channels, expect.min_level)
        theirs = (spec.detector, spec.backbone, spec.num_classes, spec.fpn_channels, spec.min_level)
        if mine != theirs:
            raise CheckpointError(f"{uri}: holds a {_describe(spec)} but the config asks for a "
                                  f"{_describe(expect)}; point at the right file or change the config")
    model = build_detector(spec)
    try:
        model.load_state_dict(blob["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{uri}: its weights do not fit its stored spec, a {_describe(spec)} "
                              f"({_first_line(exc)}); the file was altered or written by other code") from None
    return model, blob


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__)[:200]


def _describe(spec: DetectorSpec) -> str:
    low = spec.min_level if spec.detector != "faster_rcnn" else 2
    return f"{spec.detector}/{spec.backbone} ({spec.num_classes} classes, FPN {spec.fpn_channels}, P{low}-P{low + 4})"

"""Export the student alone (with its NMS) to TorchScript and ONNX, check both against eager outputs
on real images, and write a model card. Any parity failure stops the export loudly."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import io
import json
import logging
import time
import warnings

import numpy as np
import torch

from scalekd import storage
from scalekd.data.annotations import split_annotations
from scalekd.data.coco import dataset_from_root
from scalekd.data.transforms import DualResolutionCollate
from scalekd.eval.predict import configure_for_eval
from scalekd.outputs import held, write_whole
from scalekd.train.checkpoint import load_model

log = logging.getLogger(__name__)
ONNX_OPSET = 17
BOX_ATOL_PX = 0.05  # stated tolerance: boxes within 0.05 px, scores within 1e-3
SCORE_ATOL = 1e-3


class ExportError(RuntimeError):
    pass


def _above(out: dict, min_score: float):
    boxes, scores, labels = (np.asarray(out[k]) for k in ("boxes", "scores", "labels"))
    keep = scores >= min_score
    return boxes[keep].reshape(-1, 4), scores[keep], labels[keep]


def compare(reference: dict, candidate: dict, min_score: float = 0.1) -> dict:
    """Match each reference detection to the closest candidate of the same label and score (NMS may
    order ties differently); report the worst box and score differences over the matches."""
    rb, rs, rl = _above(reference, min_score)
    cb, cs, cl = _above(candidate, min_score)
    result = {"count_reference": len(rs), "count_candidate": len(cs), "max_box_diff": 0.0, "max_score_diff": 0.0}
    if len(rs) != len(cs):
        return {**result, "ok": False, "max_box_diff": float("inf")}
    # Detections tied with the lowest kept score may be swapped for equally scored ones by the top-k
    # cut; those are left out of the comparison (a trained model has few such ties).
    floor = rs.min() + SCORE_ATOL if len(rs) else 0.0
    compared = rs > floor
    result["count_compared"] = int(compared.sum())
    for box, score, label in zip(rb[compared], rs[compared], rl[compared]):
        same = (cl == label) & (np.abs(cs - score) <= SCORE_ATOL)
        if not same.any():
            return {**result, "ok": False, "max_score_diff": float("inf")}
        box_diffs = np.abs(cb[same] - box).max(axis=1)
        best = int(np.argmin(box_diffs))
        result["max_box_diff"] = max(result["max_box_diff"], float(box_diffs[best]))
        result["max_score_diff"] = max(result["max_score_diff"], float(np.abs(cs[same][best] - score)))
    result["ok"] = result["max_box_diff"] <= BOX_ATOL_PX and result["max_score_diff"] <= SCORE_ATOL
    return result


def _dataset_hash(data_root: str, split: str) -> str:
    raw = storage.read_bytes(split_annotations(data_root, split))
    return hashlib.sha256(raw).hexdigest()


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("scalekd", "torch", "torchvision", "onnx", "onnxruntime", "ray", "kfp"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _read_metrics(metrics_uri: str | None) -> dict | None:
    if not metrics_uri:
        return None
    try:
        metrics = json.loads(storage.read_text(metrics_uri))
    except json.JSONDecodeError as exc:
        raise ExportError(f"--metrics {metrics_uri}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(metrics, dict):
        raise ExportError(f"--metrics {metrics_uri}: expected a JSON object of metrics")
    return metrics


def export_model(model_uri: str, out: str, data_root: str, split: str = "val", images: int = 4,
                 metrics_uri: str | None = None, score_threshold: float = 0.05) -> dict:
    """Write ``model.torchscript.pt``, ``model.onnx`` and ``model_card.json`` as the whole of ``out``, with a
    ``manifest.json`` of their sizes and digests."""
    # Every argument is checked before the first write: a typo must not leave an export without its card.
    if not isinstance(images, int) or images < 1:
        raise ExportError(f"--images {images}: the parity check needs at least 1 image")
    storage.is_s3(out)  # the one URI parser: S3://, s4:// or a stray space is refused here, not after the export
    metrics = _read_metrics(metrics_uri)
    model, blob = load_model(model_uri)
    spec = blob["spec"]
    configure_for_eval(model, score_threshold, 100)
    model.eval()
    samples = _parity_samples(spec, data_root, split, images)
    with torch.no_grad():
        eager = [{k: v.numpy() for k, v in model([im])[0].items()} for im in samples]
    ts_bytes, ts_out, ts_seconds = _torchscript(model, samples)
    onnx_bytes, onnx_out, onnx_seconds = _onnx(model, samples)
    parity = {"torchscript": [compare(e, t, score_threshold) for e, t in zip(eager, ts_out)],
              "onnx": [compare(e, o, score_threshold) for e, o in zip(eager, onnx_out)]}
    failed = [(fmt, i, r) for fmt, rows in parity.items() for i, r in enumerate(rows) if not r["ok"]]
    if failed:
        fmt, i, r = failed[0]
        raise ExportError(f"{fmt} export of {model_uri} disagrees with eager outputs on parity image {i}: {r}; "
                          "nothing was written")
    seconds = {"torchscript": round(ts_seconds, 2), "onnx": round(onnx_seconds, 2)}
    card = _model_card(model, blob, model_uri, metrics, data_root, split, samples, parity, seconds)
    # Whole or absent: a card never sits beside a model it does not describe (scalekd.outputs).
    with held(out, "export"):
        write_whole(out, {"model.torchscript.pt": ts_bytes, "model.onnx": onnx_bytes,
                          "model_card.json": storage.json_text(card, indent=2).encode()})
    return card


def _parity_samples(spec: dict, data_root: str, split: str, images: int) -> list[torch.Tensor]:
    """The first ``images`` images of the split at the student's input size, as the evaluation resizes them; only
    those of the first one's shape (parity is checked at the exported input size)."""
    dataset = dataset_from_root(data_root, split)
    collate = DualResolutionCollate(spec["min_size"], 1.0, spec["max_size"] / spec["min_size"], with_teacher=False)
    samples = [collate([dataset[i]]).student_images[0] for i in range(min(images, len(dataset)))]
    return [s for s in samples if tuple(s.shape) == tuple(samples[0].shape)]


# Known, harmless warnings of scripting and tracing torchvision's detectors, silenced by message, only around the
# export: the scripted forward returns (losses, detections) by design, and tracing makes sizes constants.
_EXPORT_NOISE = (r"(RetinaNet|FCOS|FasterRCNN|RCNN) always returns a \(Losses, Detections\) tuple in scripting",
                 r"To copy construct from a tensor, it is recommended",
                 r"torch\.(as_)?tensor results are registered as constants in the trace",
                 r"Converting a tensor to a Python boolean might cause the trace to be incorrect")


@contextlib.contextmanager
def _quiet_export():
    """The parity check below is what shows the export right; these messages say nothing about this model."""
    with warnings.catch_warnings():
        for message in _EXPORT_NOISE:
            warnings.filterwarnings("ignore", message=message)
        yield


def _torchscript(model: torch.nn.Module, samples: list[torch.Tensor]) -> tuple[bytes, list[dict], float]:
    """The scripted model's bytes, the reloaded copy's outputs on the samples, and the seconds it took."""
    started = time.perf_counter()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    reloaded = torch.jit.load(io.BytesIO(buf.getvalue()))
    with torch.no_grad(), _quiet_export():
        outputs = [{k: v.numpy() for k, v in reloaded([im])[1][0].items()} for im in samples]
    return buf.getvalue(), outputs, time.perf_counter() - started


def _onnx(model: torch.nn.Module, samples: list[torch.Tensor]) -> tuple[bytes, list[dict], float]:
    """The ONNX graph's bytes (traced at the first sample's size), onnxruntime's outputs on the samples, the
    seconds it took."""
    import onnxruntime as ort

    started = time.perf_counter()
    buf = io.BytesIO()
    with _quiet_export():
        # A file object is accepted where the annotation says a path.
        torch.onnx.export(model, ([samples[0]],), buf, opset_version=ONNX_OPSET, dynamo=False,  # type: ignore[arg-type]
                          input_names=["image"], output_names=["boxes", "scores", "labels"])
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    outputs = []
    for im in samples:
        boxes, scores, labels = session.run(None, {"image": im.numpy()})
        outputs.append({"boxes": boxes, "scores": scores, "labels": labels})
    return buf.getvalue(), outputs, time.perf_counter() - started


def _model_card(model: torch.nn.Module, blob: dict, model_uri: str, metrics: dict | None, data_root: str,
                split: str, samples: list[torch.Tensor], parity: dict, seconds: dict) -> dict:
    """What the export is, what it was trained and checked on, how well it agrees with the eager model."""
    spec = blob["spec"]
    return {
        "model": {"source": model_uri, **spec, "parameters": sum(p.numel() for p in model.parameters())},
        "input": {"short_side": spec["min_size"], "max_side": spec["max_size"], "format": "RGB float [0,1], CHW",
                  "onnx_input": list(samples[0].shape)},
        "categories": blob.get("categories", []),
        "training": {"stage": blob.get("stage"), "iterations": blob.get("iterations"), "config": blob.get("config")},
        "metrics": metrics,
        "dataset": {"root": data_root, "split": split, "annotations_sha256": _dataset_hash(data_root, split)},
        "parity": {"images": len(samples), "box_atol_px": BOX_ATOL_PX, "score_atol": SCORE_ATOL,
                   "torchscript_max_box_diff": max(r["max_box_diff"] for r in parity["torchscript"]),
                   "onnx_max_box_diff": max(r["max_box_diff"] for r in parity["onnx"]),
                   "onnx_max_score_diff": max(r["max_score_diff"] for r in parity["onnx"]),
                   "detections_compared": sum(r.get("count_compared", 0) for r in parity["onnx"])},
        "export_seconds": seconds,
        "onnx_opset": ONNX_OPSET,
        "versions": _versions(),
        "files": ["model.torchscript.pt", "model.onnx", "model_card.json"],
    }

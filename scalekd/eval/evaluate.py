"""Evaluate model files on one validation set: metrics, parameter count and measured speed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from scalekd.config import Config
from scalekd.data.coco import CocoDetection, DataError, dataset_from_root
from scalekd.eval.metrics import metrics_from_eval, run_cocoeval
from scalekd.eval.predict import images_per_second, predict
from scalekd.models.detectors import count_parameters
from scalekd.train.checkpoint import load_model

log = logging.getLogger(__name__)


@dataclass
class ModelResult:
    name: str
    model_uri: str
    metrics: dict
    parameters: int
    images_per_s: float
    input_size: int
    detections: list = field(default_factory=list, repr=False)
    evaluator: object = field(default=None, repr=False)

    def row(self) -> dict:
        return {"model": self.name, **self.metrics, "params": self.parameters,
                "images_per_s": round(self.images_per_s, 2), "input_size": self.input_size,
                "model_uri": self.model_uri}


def check_categories(model_uri: str, stored: list | None, dataset: CocoDetection, use: str = "evaluate it") -> None:
    """A model's classes are the dataset's, ids and names in the same order: labels map to categories by position,
    so a 10-class model on a 4-class set, or one trained on other names under the same ids, would otherwise be
    scored (or distilled) against the wrong classes."""
    if stored is None:
        return  # written before categories were stored: nothing to compare
    ours = [(c["id"], c.get("name")) for c in stored]
    theirs = [(c, dataset.category_names[c]) for c in dataset.category_ids]
    if ours != theirs:
        raise DataError(f"{model_uri} was trained on categories {ours}, but {dataset.annotation_uri} has "
                        f"{theirs}; {use} on a dataset with the same categories")


def evaluate_model(name: str, model_uri: str, dataset: CocoDetection, cfg: Config,
                   device: str | None = None, speed_images: int = 10) -> ModelResult:
    model, blob = load_model(model_uri)
    check_categories(model_uri, blob.get("categories"), dataset)
    spec = blob["spec"]
    device = device or ("cuda" if cfg.scaling.gpu and torch.cuda.is_available() else "cpu")
    size = int(spec["min_size"])
    max_dets = max(cfg.eval.max_detections)
    detections = predict(model, dataset, size, cfg.data.max_size_ratio, cfg.eval.batch_size,
                         cfg.eval.score_threshold, max_dets, device)
    evaluator = run_cocoeval(dataset.data, detections, cfg.eval.max_detections, cfg.eval.size_band_edges)
    fps = images_per_second(model, dataset, size, cfg.data.max_size_ratio, device, images=speed_images)
    return ModelResult(name, model_uri, metrics_from_eval(evaluator), count_parameters(model), fps, size,
                       detections, evaluator)


def evaluate_models(models: dict[str, str], data_root: str, cfg: Config, split: str | None = None,
                    device: str | None = None) -> list[ModelResult]:
    """Every model on the same loader and val set (the teacher beside the students)."""
    dataset = dataset_from_root(data_root, split or cfg.data.val_split)
    results = []
    for name, uri in models.items():
        if not uri:
            continue
        log.info("evaluating %s (%s)", name, uri)
        results.append(evaluate_model(name, uri, dataset, cfg, device))
    return results



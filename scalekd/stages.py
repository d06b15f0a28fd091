"""The pipeline's stages as plain functions: what each kfp component calls, in a line or two.

Each takes the resolved config (a YAML file), URIs, and local paths where the orchestrator wants its
artifacts, and returns small JSON-able results. Nothing here imports kfp or knows about Kubernetes.
"""

from __future__ import annotations

import json
import logging
import os

from scalekd import storage
from scalekd.data.annotations import split_annotations
from scalekd.config import Config, load_config

log = logging.getLogger(__name__)


def config_from_params(preset: str, params: dict, overrides: list[str]) -> Config:
    """The run's config from its run parameters (``scalekd.params``; empty keeps the preset's value) and overrides,
    validated; writes nothing (the CLI checks a run with it before submitting, the resolve-config component
    before any stage). A value the config refuses is named as the parameter it came from."""
    from scalekd.config import ConfigError
    from scalekd.params import RUN_PARAMETERS, config_overrides

    try:
        return load_config(preset=preset or None, overrides=config_overrides(params) + [o for o in overrides if o])
    except ConfigError as exc:
        given = {p.field: p.name for p in RUN_PARAMETERS if params.get(p.name) not in ("", None)}
        if exc.path in given:
            raise ConfigError(f"--param {given[exc.path]} ({exc.path})", exc.value, exc.allowed) from None
        raise


def resolve_config(out_path: str, preset: str, params: dict, overrides: list[str]) -> dict:
    """Validate the run's config once, at the edge, and write it as YAML for every later stage."""
    cfg = config_from_params(preset, params, overrides)
    _ensure_dir(out_path)
    with open(out_path, "w") as f:
        f.write(cfg.to_yaml())
    return cfg.to_dict()


def read_config(path: str) -> Config:
    cfg = load_config(path)
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    return cfg


def prepare_data(config_path: str, dataset_uri: str, workdir: str, synth_images: int, stats_path: str) -> str:
    """A dataset root ready for training: the given one (validated) or synthetic scenes under workdir."""
    from scalekd.data.coco import resolve_root
    from scalekd.data.stats import dataset_stats
    from scalekd.data.synth import ensure_synthetic

    cfg = read_config(config_path)
    # "PREFIX/latest" is pinned here to one concrete dataset for every later stage of the run.
    root = resolve_root(dataset_uri) if dataset_uri else storage.join(workdir, "data")
    if not dataset_uri:
        # Objects keep their pixel sizes (8-24 px mostly, 4-12 at the student's size) whatever the scene size.
        ensure_synthetic(root, synth_images, seed=cfg.train.seed, size=2 * cfg.data.student_size, object_scale=1.0)
    stats = {split: dataset_stats(split_annotations(root, split))
             for split in (cfg.data.train_split, cfg.data.val_split)}
    _ensure_dir(stats_path)
    with open(stats_path, "w") as f:
        json.dump({"root": root, **stats}, f, indent=2)
    return root


def train(config_path: str, stage: str, data_root: str, workdir: str, model_path: str, name: str = "",
          teacher_uri: str = "", student_uri: str = "", method: str = "") -> dict:
    """Run one training stage (Ray Train locally, or a Ray job on ``scaling.ray_address``)."""
    from scalekd.config import replace
    from scalekd.train.stage import StageRequest
    from scalekd.train.ray_runner import launch

    cfg = read_config(config_path)
    if method:
        cfg = replace(cfg, distill={"method": method})
    out = storage.join(workdir, name or stage)
    summary = launch(StageRequest(stage, cfg.to_dict(), data_root, out, teacher=teacher_uri,
                                  student_init=student_uri), cfg)
    model_uri = storage.join(out, "model.pt")
    _ensure_dir(model_path)
    with open(model_path, "wb") as f:
        f.write(storage.read_bytes(model_uri))
    return {"uri": model_uri, **{k: v for k, v in summary.items() if k != "spec"}}


def evaluate(config_path: str, data_root: str, models: dict[str, str], workdir: str, report_dir: str) -> dict:
    """All models on the same val set; the report (Markdown, PNGs) to workdir/report and report_dir."""
    from scalekd.data.coco import dataset_from_root
    from scalekd.eval.evaluate import evaluate_models
    from scalekd.eval.report import metrics_table, write_report
    from scalekd.tracking import log_evaluation

    cfg = read_config(config_path)
    results = evaluate_models(models, data_root, cfg)
    dataset = dataset_from_root(data_root, cfg.data.val_split)
    report_uri = storage.join(workdir, "report")
    write_report(results, dataset, report_uri, title="scalekd: teacher, plain student and ScaleKD student")
    if report_dir:
        os.makedirs(report_dir, exist_ok=True)
        write_report(results, dataset, report_dir, title="scalekd: teacher, plain student and ScaleKD student")
    rows = [r.row() for r in results]
    storage.write_json(storage.join(workdir, "metrics.json"), {"models": rows})
    log_evaluation(workdir, data_root, rows, [storage.join(report_uri, "report.md"),
                                              storage.join(workdir, "metrics.json")])
    return {"models": rows, "table": metrics_table(results, markdown=False),
            "markdown": metrics_table(results), "report": storage.join(report_uri, "report.md")}


def compare(config_path: str, data_root: str, workdir: str, seeds: list, variants: list, eval_split: str,
            max_detections: int) -> dict:
    """``scalekd compare`` under ``workdir/compare``: the report's JSON with its Markdown and where it lies."""
    from scalekd.compare import CompareRequest, run_compare
    from scalekd.compare_report import markdown

    cfg = read_config(config_path)
    out = storage.join(workdir, "compare")
    request = CompareRequest(data_root, out, seeds=tuple(int(s) for s in seeds), variants=tuple(variants),
                             eval_split=eval_split, max_detections=max_detections)
    doc = run_compare(cfg, request)
    return {**doc, "markdown": markdown(doc), "report": storage.join(out, "report.md")}


def export(config_path: str, data_root: str, model_uri: str, workdir: str, out_dir: str) -> dict:
    from scalekd.export import export_model

    cfg = read_config(config_path)
    dest = storage.join(workdir, "export")
    metrics = storage.join(workdir, "metrics.json")
    card = export_model(model_uri, dest, data_root, split=cfg.data.val_split,
                        metrics_uri=metrics if storage.exists(metrics) else None)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for name in card["files"]:
            with open(os.path.join(out_dir, name), "wb") as f:
                f.write(storage.read_bytes(storage.join(dest, name)))
    return {"uri": dest, "parity": card["parity"]}


def _ensure_dir(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)

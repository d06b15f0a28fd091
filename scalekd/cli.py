"""The ``scalekd`` command line: one command per stage, plus data tools, evaluation, export, tune,
pipeline compile/run/submit/schedule and the demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback

from scalekd import storage
from scalekd.config import Config, ConfigError, load_config

log = logging.getLogger("scalekd")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (local or s3://)")
    p.add_argument("--preset", help="tiny | demo | bench | paper")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set distill.alpha=0.02 (repeatable)")


def _stage_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--data", help="dataset root (local or s3://) with annotations/ and images/")
    p.add_argument("--out", required=True, help="output URI of this stage (local or s3://)")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--ray-address", help="submit to this Ray cluster (http://HEAD:8265) instead of a local Ray")
    p.add_argument("--no-ray", action="store_true", help="run in this process without Ray (debugging)")


def _load(args) -> Config:
    overrides = list(args.overrides)
    for flag, key in (("data", "data.root"), ("workers", "scaling.workers"), ("ray_address", "scaling.ray_address")):
        value = getattr(args, flag, None)
        if value is not None and value != "":  # --workers 0 reaches the config's check, never "unset"
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    if getattr(args, "gpu", False):
        overrides.append("scaling.gpu=true")
    cfg = load_config(args.config, args.preset, overrides)
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    return cfg


def cmd_config(args) -> int:
    if args.reference:
        from scalekd.config_reference import reference_markdown

        print(reference_markdown())
        return 0
    print(_load(args).to_yaml(), end="")
    return 0


def cmd_stage(args) -> int:
    from scalekd.train.stage import StageRequest
    from scalekd.train.ray_runner import launch

    cfg = _load(args)
    stage = {"train-teacher": "teacher", "warmup": "warmup", "distill": "distill"}[args.command]
    request = StageRequest(stage, cfg.to_dict(), cfg.data.root, args.out,
                           teacher=getattr(args, "teacher", "") or "", student_init=getattr(args, "student", "") or "")
    summary = launch(request, cfg, use_ray=not args.no_ray)
    print(json.dumps(summary, indent=2))
    return 0


def _refuse_to_overwrite(out: str, force: bool, folder: bool) -> None:
    """Commands that write a dataset never replace one without --force: a dataset folder must be new or empty,
    an annotation file must not exist; a dataset folder given as a file path is refused either way."""
    if not storage.is_s3(out) and os.path.exists(out) and os.path.isdir(out) != folder:
        kind = "a file" if folder else "a folder"
        raise ConfigError("--out" if not folder else "OUT", out, f"is {kind}; give a {'folder' if folder else 'file'}")
    taken = next(iter(storage.list_uris(out)), None) if folder else (storage.exists(out) and out)
    if taken and not force:
        what = f"holds {taken}" if folder else "exists"
        raise ConfigError("OUT" if folder else "--out", out, f"{what}; choose a new or empty location, or pass "
                          "--force to overwrite")


def _data_upload(args) -> int:
    """``scalekd data upload``: a local dataset root to S3, checked first so that nothing half-useful lands there."""
    if not storage.is_s3(args.dest):
        raise ConfigError("DEST", args.dest, "an s3://bucket/prefix URI")
    if not os.path.isdir(args.root):
        raise ConfigError("ROOT", args.root, "a local dataset root (a folder with annotations/ and images/)")
    annotations = os.path.join(args.root, "annotations")
    splits = sorted(f for f in os.listdir(annotations) if f.startswith("instances_") and f.endswith(".json")) \
        if os.path.isdir(annotations) else []
    if not splits or not os.path.isdir(os.path.join(args.root, "images")):
        raise ConfigError("ROOT", args.root, "a dataset root: annotations/instances_<split>.json and images/")
    storage.upload_dir(args.root, args.dest)
    print(f"uploaded {args.root} to {args.dest} ({', '.join(splits)})")
    return 0


def _data_convert(args) -> int:
    """``scalekd data convert``: VisDrone or YOLO to COCO JSON, optionally as patches or tiles."""
    from scalekd.data import convert

    _refuse_to_overwrite(args.out, args.force, folder=False)
    images_out = args.images_out or os.path.join(os.path.dirname(os.path.abspath(args.out)), "images")
    if args.tile and args.patches != 1:
        raise ConfigError("--tile", args.tile, "either --tile or --patches, not both")
    visdrone = args.format == "visdrone"
    if visdrone and args.split:
        raise ConfigError("--split", args.split, "YOLO only (VisDrone's splits are separate downloads)")
    source_images = os.path.join(args.src, "images") if visdrone else convert.yolo_layout(args.src, args.split)[0]
    if args.patches > 1 or args.tile:
        if os.path.abspath(images_out) == os.path.abspath(source_images):
            raise ConfigError("--images-out", images_out, "a folder other than the source's images (patches or tiles "
                              "would be written among the originals)")
        _refuse_to_overwrite(images_out, args.force, folder=True)
    if visdrone:
        coco = convert.convert_visdrone(args.src, args.patches, images_out if args.patches > 1 else None)
    else:
        if not args.names:
            raise ConfigError("--names", None, "YOLO conversion needs --names FILE (one class name per line)")
        if args.patches != 1:
            raise ConfigError("--patches", args.patches, "VisDrone only; YOLO conversion takes --tile SIDE instead")
        coco = convert.convert_yolo(args.src, args.names, args.split)
    if args.tile:
        coco = {**convert.tile_coco(coco, source_images, images_out, args.tile), "info": coco["info"]}
    storage.write_text(args.out, json.dumps(coco))
    report = coco["info"]["conversion"]
    print(f"wrote {args.out}: {len(coco['images'])} images, {len(coco['annotations'])} annotations")
    if report["dropped"]:
        reasons = "; ".join(f"{n} {reason}" for reason, n in report["dropped"].items())
        print(f"dropped {sum(report['dropped'].values())} labels: {reasons}; e.g. "
              + " | ".join(report["examples"][:3]), file=sys.stderr)
    if report.get("not_converted"):
        reasons = "; ".join(f"{n} {reason}" for reason, n in report["not_converted"].items())
        print(f"not converted: {sum(report['not_converted'].values())} files under {args.src}: {reasons}; e.g. "
              + " | ".join(report["not_converted_examples"][:3]), file=sys.stderr)
    return 0


def cmd_data(args) -> int:
    from scalekd.data import stats, synth
    from scalekd.data.annotations import split_annotations

    if args.data_command == "synth":
        _refuse_to_overwrite(args.out, args.force, folder=True)
        counts = synth.generate(args.out, args.images, args.seed, args.size)
        print(json.dumps(counts))
        for split in ("train", "val"):
            ann = split_annotations(args.out, split)
            print(stats.format_stats(stats.dataset_stats(ann), f"{split}: {ann}"))
        return 0
    if args.data_command == "convert":
        return _data_convert(args)
    if args.data_command == "upload":
        return _data_upload(args)
    if args.data_command == "stats":
        result = stats.dataset_stats(args.annotations)
        if args.images:
            data = json.loads(storage.read_text(args.annotations))
            missing = [im["file_name"] for im in data["images"]
                       if not storage.exists(storage.join(args.images, im["file_name"]))]
            result["missing_images"] = len(missing)
            if missing:
                print(f"warning: {len(missing)} images missing under {args.images}, e.g. {missing[0]}",
                      file=sys.stderr)
        if args.config or args.preset or args.overrides:
            cfg = _load(args)
            result["anchor_coverage"] = stats.coverage_for_config(args.annotations, cfg)
            if cfg.data.teacher_holdout:
                result["teacher_holdout"] = stats.holdout_shares(args.annotations, cfg.data.teacher_holdout)
        print(stats.format_stats(result, args.annotations))  # printed first: a bad --json loses nothing
        if args.json:
            storage.write_json(args.json, result)
        return 0
    raise SystemExit(2)


def cmd_evaluate(args) -> int:
    from scalekd.eval.metrics import evaluate_detections

    _check_bands(args.bands)
    if not args.max_dets or any(m < 1 for m in args.max_dets) or args.max_dets != sorted(set(args.max_dets)):
        raise ConfigError("--max-dets", args.max_dets, "increasing positive integers, e.g. 1 10 100 (500 for "
                          "crowded images)")
    if args.detections and args.model:
        raise ConfigError("--model", args.model, "either --detections (scored as they are) or --model (run on "
                          "--data), not both")
    if args.detections:
        from scalekd.data.annotations import DataError, load_coco_json

        if not args.gt:
            raise ConfigError("--gt", None, "--detections needs --gt ANNOTATIONS.json (the ground truth)")
        gt = load_coco_json(args.gt)
        try:
            dets = json.loads(storage.read_text(args.detections))
        except json.JSONDecodeError as exc:
            raise DataError(f"{args.detections}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                            "is the file truncated?") from None
        if isinstance(dets, dict) and "annotations" in dets:
            dets = dets["annotations"]
        metrics = evaluate_detections(gt, dets, tuple(args.max_dets), tuple(args.bands), source=args.detections)
    else:
        if not (args.model and args.data):
            raise ConfigError("--model/--data", None, "give --gt and --detections, or --model and --data")
        from scalekd.eval.evaluate import evaluate_models
        from scalekd.eval.report import metrics_table

        cfg = load_config(args.config, args.preset, args.overrides + [f"eval.max_detections={list(args.max_dets)}",
                                                                      f"eval.size_band_edges={list(args.bands)}"])
        (result,) = evaluate_models({"model": args.model}, args.data, cfg, args.split)
        print(metrics_table([result], markdown=False))
        metrics = {**result.metrics, "params": result.parameters, "images_per_s": result.images_per_s}
    print(json.dumps(metrics, indent=2))  # before the write: a bad --json path must not lose the metrics
    if args.json:
        storage.write_json(args.json, metrics)
    return 0


def _named_models(items: list[str]) -> dict[str, str]:
    """``--model NAME=URI`` flags as a dict: both parts given, each name once."""
    models: dict[str, str] = {}
    for item in items:
        name, sep, uri = item.partition("=")
        if not sep or not name.strip() or not uri.strip():
            raise ConfigError("--model", item, "NAME=URI with both parts, e.g. --model teacher=runs/x/teacher/model.pt")
        if name.strip() in models:
            raise ConfigError("--model", item, f"the name '{name.strip()}' is given twice")
        models[name.strip()] = uri.strip()
    return models


def _check_bands(edges: list[int]) -> None:
    if edges and (len(edges) < 2 or edges[0] < 0 or edges != sorted(set(edges))):
        raise ConfigError("--bands", edges, "increasing object sides in px, at least two, e.g. 0 8 16 32 "
                          "(none: no size bands)")


def cmd_report(args) -> int:
    from scalekd.data.coco import dataset_from_root
    from scalekd.eval.evaluate import evaluate_models
    from scalekd.eval.report import metrics_table, write_report
    from scalekd.tracking import log_evaluation

    cfg = _load(args)
    results = evaluate_models(_named_models(args.model), cfg.data.root, cfg)
    paths = write_report(results, dataset_from_root(cfg.data.root, cfg.data.val_split), args.out)
    log_evaluation(args.out, cfg.data.root, [r.row() for r in results], [paths["report.md"]])
    print(metrics_table(results, markdown=False))
    print(f"report: {paths['report.md']}")
    return 0


def cmd_export(args) -> int:
    from scalekd.export import export_model

    card = export_model(args.model, args.out, args.data, split=args.split, images=args.images,
                        metrics_uri=args.metrics)
    print(json.dumps(card, indent=2))
    return 0


def cmd_tune(args) -> int:
    from scalekd.tune import TuneSpace, run_tune

    cfg = _load(args)
    space = TuneSpace.parse(args.space) if args.space else TuneSpace.around_paper(cfg)
    best = run_tune(cfg, args.teacher, args.student, cfg.data.root, args.out, space, trials=args.trials,
                    metric=args.metric, rungs=args.rungs, cpus_per_trial=args.cpus_per_trial, resume=args.resume)
    print(json.dumps(best, indent=2))
    return 0


def cmd_compare(args) -> int:
    from scalekd.compare import CompareRequest, run_compare

    if not args.data:
        raise ConfigError("--data", None, "the dataset root to compare on (local or s3://)")
    cfg = _load(args)
    request = CompareRequest(cfg.data.root, args.out, seeds=tuple(args.seeds), variants=tuple(args.variants),
                             eval_split=args.eval_split, max_detections=args.max_detections, use_ray=not args.no_ray)
    doc = run_compare(cfg, request)
    print("\n".join(doc["verdict"]))
    print(f"report: {storage.join(args.out, 'report.md')}")
    return 0


def _pipeline_runner():
    """The kfp pipelines live beside the library in a checkout (pipelines/, components/), not in the wheel: the
    library knows nothing of kfp, and the wheel installs no generic top-level package names."""
    try:
        from pipelines import runner
    except ImportError as exc:
        raise ConfigError("pipeline", None, f"the pipeline commands run from a checkout of scalekd, which holds "
                          f"pipelines/ and components/ ({exc}); `make install` there puts it on the path") from None
    return runner


def cmd_pipeline(args) -> int:
    runner = _pipeline_runner()

    if args.pipeline_command == "compile":
        for path in runner.compile_all(args.out):
            print(path)
        return 0
    params = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError("--param", item, "NAME=VALUE, e.g. --param workdir=s3://bucket/run")
        params[name.strip()] = value
    if args.pipeline_command == "run":
        result = runner.run_local(params, preset=args.preset, pipeline=args.pipeline)
        print(json.dumps(result, indent=2))
        return 0
    if args.pipeline_command == "submit":
        run_id = runner.submit(args.host, params, experiment=args.experiment, preset=args.preset,
                               pipeline=args.pipeline)
        print(f"created run {run_id} on {storage.redact(args.host)}")
        return 0
    if args.pipeline_command == "schedule":
        job_id = runner.schedule(args.host, args.cron, params, experiment=args.experiment, preset=args.preset,
                                 pipeline=args.pipeline)
        print(f"created recurring run {job_id} on {storage.redact(args.host)} ({args.cron})")
        return 0
    raise SystemExit(2)


def cmd_demo(args) -> int:
    return _pipeline_runner().demo(workdir=args.workdir, preset=args.preset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalekd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_config_command(sub)
    _add_stage_commands(sub)
    _add_data_command(sub)
    _add_evaluate_command(sub)
    _add_report_command(sub)
    _add_export_command(sub)
    _add_tune_command(sub)
    _add_compare_command(sub)
    _add_pipeline_command(sub)
    _add_demo_command(sub)
    return parser


def _add_config_command(sub) -> None:
    """``scalekd config``: the resolved config."""
    p = sub.add_parser("config", help="print the resolved config as YAML")
    _config_args(p)
    p.add_argument("--reference", action="store_true",
                   help="print every field with its default, type and meaning (docs/configuration.md)")
    p.set_defaults(func=cmd_config)


def _add_stage_commands(sub) -> None:
    """The three training stages, one subcommand each."""
    for name, text in (("train-teacher", "train the teacher at teacher_scale x the student's resolution"),
                       ("warmup", "warm up the student (backbone frozen for the first F iterations)"),
                       ("distill", "ScaleKD distillation (or a baseline) from the warm student")):
        p = sub.add_parser(name, help=text)
        _stage_args(p)
        if name == "distill":
            p.add_argument("--teacher", required=True, help="the teacher's model.pt")
            p.add_argument("--student", required=True, help="the warm student's model.pt")
        p.set_defaults(func=cmd_stage)


def _add_data_command(sub) -> None:
    """``scalekd data synth|convert|stats``."""
    p = sub.add_parser("data", help="generate, convert and inspect datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("synth", help="synthetic small-object scenes in COCO format")
    q.add_argument("out")
    q.add_argument("--images", type=int, default=200)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--size", type=int, default=256, help="image side in px (the teacher's view)")
    q.add_argument("--force", action="store_true", help="write into a folder that already holds files")
    q = dsub.add_parser("convert", help="VisDrone or YOLO annotations to COCO JSON")
    q.add_argument("format", choices=("visdrone", "yolo"))
    q.add_argument("src")
    q.add_argument("--out", required=True)
    q.add_argument("--names", help="YOLO class names file")
    q.add_argument("--split", help="YOLO in Ultralytics' images/SPLIT + labels/SPLIT layout: the split to convert")
    q.add_argument("--patches", type=int, default=1, help="VisDrone: 4 = split each image into 2x2 patches")
    q.add_argument("--tile", type=int, default=0, metavar="SIDE",
                   help="cut every image into tiles of at most SIDE x SIDE px (wide aerial strips: a car keeps its "
                        "pixels instead of shrinking with the whole strip); boxes across a seam are clipped into "
                        "each tile")
    q.add_argument("--images-out", help="where --patches/--tile write their images (default: OUT's folder/images)")
    q.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    q = dsub.add_parser("upload", help="copy a local dataset root to s3://bucket/prefix (credentials: AWS_* "
                                       "variables or AWS_PROFILE; AWS_ENDPOINT_URL for any S3-compatible server)")
    q.add_argument("root")
    q.add_argument("dest")
    q = dsub.add_parser("stats", help="objects, ignore regions, per-category and size-class counts; with a config "
                                      "(--preset/--config/--set), the student's and teacher's anchor coverage")
    q.add_argument("annotations")
    _config_args(q)
    q.add_argument("--images", help="check that every image exists under this folder")
    q.add_argument("--json")
    p.set_defaults(func=cmd_data)


def _add_evaluate_command(sub) -> None:
    """``scalekd evaluate``: COCO metrics of detections or of a model."""
    p = sub.add_parser("evaluate", help="COCO metrics of a detections file, or of a model on a dataset")
    _config_args(p)
    p.add_argument("--gt")
    p.add_argument("--detections")
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--split")
    p.add_argument("--max-dets", type=int, nargs="+", default=[1, 10, 100],
                   help="AP and AR_S/M/L are read at the largest (VisDrone: 1 10 100 500)")
    p.add_argument("--bands", type=int, nargs="*", default=[0, 8, 16, 32], metavar="PX",
                   help="tiny-object size bands by object side in px (default 0 8 16 32: AP_0-8px, AP_8-16px, "
                        "AP_16-32px); no value: none")
    p.add_argument("--json")
    p.set_defaults(func=cmd_evaluate)


def _add_report_command(sub) -> None:
    """``scalekd report``: tables, charts and drawn examples."""
    p = sub.add_parser("report", help="metrics table, charts and drawn examples for several models")
    _config_args(p)
    p.add_argument("--data")
    p.add_argument("--model", action="append", required=True, metavar="NAME=URI")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)


def _add_export_command(sub) -> None:
    """``scalekd export``: TorchScript, ONNX, model card."""
    p = sub.add_parser("export", help="TorchScript + ONNX with a parity check, and a model card")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data", required=True, help="dataset root whose images the parity check runs on")
    p.add_argument("--split", default="val")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--metrics", help="metrics JSON to put in the model card")
    p.set_defaults(func=cmd_export)


def _add_tune_command(sub) -> None:
    """``scalekd tune``: Ray Tune over the loss weights."""
    p = sub.add_parser("tune", help="Ray Tune over alpha/beta/gamma (and teacher_anchor) with ASHA on validation AP_S")
    _config_args(p)
    p.add_argument("--data")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--rungs", type=int, default=2, help="validation reports per trial (ASHA rungs)")
    p.add_argument("--metric", default="AP_S")
    p.add_argument("--space", help="e.g. 'alpha=0.001:0.1,beta=0.05:1,gamma=0.01:0.5' (log-uniform ranges) and "
                   "'teacher_anchor=0|5' (a choice); default: alpha, beta, gamma from 1/4 to 4x the paper's")
    p.add_argument("--ray-address", help="run the search as a Ray job on this cluster (http://HEAD:8265); every URI "
                   "then s3://")
    p.add_argument("--cpus-per-trial", type=int, default=1,
                   help="CPUs Ray reserves for each of a trial's training processes")
    p.add_argument("--gpu", action="store_true", help="one GPU for each of a trial's training processes")
    p.add_argument("--workers", type=int, help="Ray Train workers per trial (default 1: the trial trains in its own "
                   "process); N > 1 runs a TorchTrainer of N workers inside each trial")
    p.add_argument("--resume", action="store_true",
                   help="continue the search under --out (local or s3://, from any machine): trials that ended are "
                        "kept, the others continue from their last rung and checkpoint")
    p.set_defaults(func=cmd_tune)


def _add_compare_command(sub) -> None:
    """``scalekd compare``: does the 2x teacher help on this dataset?"""
    from scalekd.compare import DEFAULT_VARIANTS, VARIANTS

    p = sub.add_parser("compare", help="does the 2x teacher help on this dataset? teacher and warm student once, "
                                       "then each variant over paired seeds; a report with 95%% intervals")
    _stage_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="NAME",
                   help=f"default: {' '.join(DEFAULT_VARIANTS)}; any of {', '.join(VARIANTS)}")
    p.add_argument("--eval-split", default="val", help="evaluate on annotations/instances_SPLIT.json")
    p.add_argument("--max-detections", type=int, default=100,
                   help="detections per image, for the detector and COCO's AP (raise it where images hold more than "
                        "100 objects, e.g. 500)")
    p.set_defaults(func=cmd_compare)


def _add_pipeline_command(sub) -> None:
    """``scalekd pipeline compile|run|submit|schedule``."""
    p = sub.add_parser("pipeline", help="compile, run locally, submit or schedule the kfp pipelines")
    psub = p.add_subparsers(dest="pipeline_command", required=True)
    q = psub.add_parser("compile")
    q.add_argument("--out", default="pipelines/compiled")
    for name in ("run", "submit", "schedule"):
        q = psub.add_parser(name)
        q.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
        q.add_argument("--preset", default="demo")
        q.add_argument("--pipeline", default="training", choices=("training", "tune", "compare"),
                       help="training (the default), tune (Ray Tune over the loss weights) or compare (paired seeds "
                            "with and without the teacher)")
        if name == "run":
            q.add_argument("--local", action="store_true", required=True, help="kfp's local SubprocessRunner")
        else:
            q.add_argument("--host", required=True, help="Kubeflow Pipelines API endpoint")
            q.add_argument("--experiment", default="scalekd")
        if name == "schedule":
            q.add_argument("--cron", required=True, help="six fields, seconds first: '0 0 3 * * *'")
    p.set_defaults(func=cmd_pipeline)


def _add_demo_command(sub) -> None:
    """``scalekd demo``: the main job locally."""
    p = sub.add_parser("demo", help="the main job: the training pipeline on synthetic data, locally")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--preset", default="demo")
    p.set_defaults(func=cmd_demo)


def _resolve_data(args) -> None:
    """Every command's ``--data``: ``PREFIX/latest`` names one concrete dataset from here on (scalekd.data.coco)."""
    if getattr(args, "data", None):
        from scalekd.data.coco import resolve_root

        args.data = resolve_root(args.data)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    storage.adopt_environment()  # before any library reads AWS_ENDPOINT_URL (botocore logs it at DEBUG)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(storage.RedactingFilter())
    try:
        _resolve_data(args)
        return args.func(args)
    except Exception as exc:
        return _report(exc, args.verbose)


def _report(exc: Exception, verbose: bool) -> int:
    """Bad input (our own error types) and the system's answers about paths, disks and connections (OSError: a
    full disk, a missing file, a refused connection) are one line; anything else is a bug of ours, said so, with
    its traceback under -v."""
    if isinstance(exc, _user_errors()):
        print(f"scalekd: error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, OSError):
        print(f"scalekd: error: {storage.redact(str(exc))}", file=sys.stderr)
        return 1
    if verbose:
        print(storage.redact("".join(traceback.format_exception(exc))), file=sys.stderr, end="")
    print(f"scalekd: internal error, a bug in scalekd: {type(exc).__name__}: {storage.redact(str(exc))}\n"
          f"Please report it with the output of the same command run with -v"
          f"{'' if verbose else ' (which prints the traceback)'}.", file=sys.stderr)
    return 70  # EX_SOFTWARE


# Errors that mean bad input, reported in one line; anything else (a ValueError from a library, a bug of ours) keeps
# its traceback. Looked up among the modules already loaded: a command that never imported torch (scoring a
# detections file) must not import it to report an error.
_USER_ERROR_CLASSES = {"scalekd.data.annotations": "DataError", "scalekd.export": "ExportError",
                       "scalekd.train.checkpoint": "CheckpointError", "scalekd.train.loop": "TrainingError",
                       "scalekd.compare": "CompareError", "pipelines.runner": "PipelineError"}


def _user_errors() -> tuple[type, ...]:
    loaded = [getattr(sys.modules[m], name) for m, name in _USER_ERROR_CLASSES.items() if m in sys.modules]
    return (ConfigError, storage.StorageError, *loaded)


if __name__ == "__main__":
    sys.exit(main())

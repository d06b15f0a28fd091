"""Does the 2x teacher's knowledge reach the student? Teacher at 2x, plain student, FitNet, Chen et al.'s OD,
PKD, CrossKD, ScaleKD (the default recipe), the no-teacher control, the paper's literal reading and ablations, on the
synthetic small-object set (and the real KIT AIS cars, split by image with a fixed seed), one student
architecture and one iteration budget for all, several seeds; AP, AP50, AP75, AP_S/M/L. Writes the full
result and ``<out>_headline.json`` (every variant's per-seed metrics; ``--merge-headline`` adds to an
earlier run's); ``benchmarks/headline.py`` judges the quality targets from it.

    python benchmarks/quality.py [--preset bench] [--seeds 0 1 2] [--datasets synth kit] [--shared-teacher]
                                 [--variants plain fitnet od pkd crosskd scalekd scalekd_crosskd
                                             scalekd_no_cross_head scalekd_no_teacher scalekd_paper no_sdf no_csa
                                             plain_attention no_locality no_assistant_warmup]

``--shared-teacher`` trains the teacher and the warm student once, in the *first* listed seed's folder, and
lets the seeds vary the distillation stage only: a third of the CPU time, and the spread it reports is then
the distillation's alone. To add seeds to variants of an earlier run, list that run's first seed first
(``--seeds 0 1 2``: finished stages are not rerun, only evaluated).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import RESULTS, machine, numerics, table, write_json
from benchmarks.headline import verdicts
from scalekd.compare import VARIANTS, eval_config, variant_config
from scalekd.config import Config, load_config, replace
from scalekd.data.convert import convert_visdrone, convert_yolo, tile_coco
from scalekd.data.holdout import image_source
from scalekd.data.synth import ensure_synthetic
from scalekd.eval.evaluate import evaluate_models
from scalekd.train.stage import StageRequest, run_stage
from scalekd.train.memory_format import use_channels_last
from scalekd.distill.methods import method_class

KEYS = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")
SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
KIT = os.path.join(SHARED_DATA, "kit_ais_cars")
VISDRONE = os.path.join(SHARED_DATA, "visdrone_sample")
DSB2018 = os.path.join(SHARED_DATA, "dsb2018_nuclei")  # already a dataset root (train/val COCO JSON + images/)


def kit_dataset(out: str, seed: int = 0, val_fraction: float = 0.25, tile: int = 0) -> str:
    """KIT AIS cars converted from YOLO and split by image with a fixed seed; ``tile`` > 0 cuts each split into
    tiles of that side (``scalekd.data.convert.tile_coco``) after the split, so no source image is in both."""
    if os.path.exists(os.path.join(out, "annotations", "instances_val.json")):
        return out
    if not os.path.isdir(KIT):
        raise SystemExit(f"KIT AIS data not found at {KIT} (../shared/data beside the checkout)")
    coco = convert_yolo(KIT, os.path.join(KIT, "aerial.names"))
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    train, val = _split_by_source(coco, lambda im: im["id"], seed, val_fraction)
    for part in (train, val):
        if tile:
            part.update(tile_coco(part, KIT, os.path.join(out, "images"), tile))
        else:
            for im in part["images"]:
                shutil.copyfile(os.path.join(KIT, im["file_name"]), os.path.join(out, "images", im["file_name"]))
    return _write_splits(out, train, val)


def visdrone_dataset(out: str, seed: int = 0, val_fraction: float = 0.2) -> str:
    """The VisDrone sample converted with ``--patches 4`` (2 x 2 patches per image), split by source image."""
    if os.path.exists(os.path.join(out, "annotations", "instances_val.json")):
        return out
    if not os.path.isdir(VISDRONE):
        raise SystemExit(f"VisDrone sample not found at {VISDRONE} (../shared/data beside the checkout)")
    coco = convert_visdrone(VISDRONE, 4, os.path.join(out, "images"))
    train, val = _split_by_source(coco, lambda im: im["file_name"].rsplit("_p", 1)[0], seed, val_fraction)
    return _write_splits(out, train, val)


def _split_by_source(coco: dict, source, seed: int, val_fraction: float) -> tuple[dict, dict]:
    """(train, val) COCO dicts; every image of one source (``source(image)``) lands in the same split."""
    sources = sorted({source(im) for im in coco["images"]})
    random.Random(seed).shuffle(sources)
    val_sources = set(sources[: max(1, int(len(sources) * val_fraction))])
    parts = []
    for in_val in (False, True):
        ids = {im["id"] for im in coco["images"] if (source(im) in val_sources) == in_val}
        parts.append({"images": [im for im in coco["images"] if im["id"] in ids], "categories": coco["categories"],
                      "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]})
    return parts[0], parts[1]


def _write_splits(out: str, train: dict, val: dict) -> str:
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    for split, part in (("train", train), ("val", val)):
        with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(part, f)
    return out


def holdout_roots(root: str, seed: int = 0) -> tuple[str, str]:
    """(teacher_root, student_root): the training images split in half by source image (a tile's
    ``source_image_id``), the teacher's half and the students' half, with the same val split and images.

    Why: a teacher that has learnt its training set by heart predicts the ground truth there, so an assistant that
    starts as it and trains on those images, or OD, reads it where it is least like itself on new images. Trained
    on the other half, the teacher is read only on images it never saw (as at validation)."""
    out = root.rstrip("/") + "-holdout"
    roots = tuple(os.path.join(out, role) for role in ("teacher", "students"))
    if all(os.path.exists(os.path.join(r, "annotations", "instances_train.json")) for r in roots):
        return roots
    with open(os.path.join(root, "annotations", "instances_train.json")) as f:
        train = json.load(f)
    with open(os.path.join(root, "annotations", "instances_val.json")) as f:
        val = json.load(f)
    students, teacher = _split_by_source(train, image_source, seed, 0.5)
    for part_root, part in zip(roots, (teacher, students)):
        os.makedirs(part_root, exist_ok=True)
        link = os.path.join(part_root, "images")
        if not os.path.islink(link):
            os.symlink(os.path.abspath(os.path.join(root, "images")), link)
        _write_splits(part_root, part, val)
    return roots


def dataset_root(dataset: str, args, base) -> str:
    if dataset == "synth":
        return ensure_synthetic(os.path.join(args.workdir, "synth-data"), args.synth_images, seed=0,
                                size=2 * base.data.student_size)
    if dataset == "kit":
        return kit_dataset(os.path.join(args.workdir, f"kit-data-tile{args.kit_tile}"), tile=args.kit_tile)
    if dataset == "dsb2018":
        if not os.path.isdir(DSB2018):
            raise SystemExit(f"DSB2018 nuclei not found at {DSB2018} (../shared/data beside the checkout)")
        return DSB2018
    return visdrone_dataset(os.path.join(args.workdir, "visdrone-data-patches4"))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=["synth", "kit"], choices=["synth", "kit", "visdrone", "dsb2018"])
    ap.add_argument("--max-detections", type=int, default=100,
                    help="detections per image, for the detector and COCO's AP alike (500 for sets whose images hold "
                         "more than 100 objects: DSB2018 nuclei, VisDrone)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--kit-tile", type=int, default=320, help="KIT: tiles of this side in px (0: whole images, "
                    "where a 128 px student sees a car at ~3 px; 320: 6.5-26 px, median 10)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--workdir", default="runs/bench/quality")
    ap.add_argument("--out", default="quality.json", help="JSON name under benchmarks/results/ (chart beside it)")
    ap.add_argument("--synth-images", type=int, default=1000, help="20%% are validation images (>= 200 resolve "
                    "about 1 AP_S)")
    ap.add_argument("--shared-teacher", action="store_true",
                    help="one teacher and warm student per dataset; seeds vary the distillation only")
    ap.add_argument("--headline", help="headline JSON name (default: OUT with _headline)")
    ap.add_argument("--teacher-model", help="a finished teacher's model.pt to distil from instead of training one "
                    "(one dataset; e.g. another workdir's, to vary the student's stages against the same teacher)")
    ap.add_argument("--warm-model", help="a finished warm student's model.pt to start every variant from")
    ap.add_argument("--holdout-teacher", action="store_true",
                    help="the teacher trains on half of the training images (split by source image), the warm-up "
                         "and every distillation on the other half: the teacher is read only on images it never saw")
    ap.add_argument("--merge-headline", action="store_true",
                    help="keep the variants an earlier run wrote to the headline file (same protocol and size)")
    return ap


def main() -> None:
    ap = _parser()
    args = ap.parse_args()
    if (args.teacher_model or args.warm_model) and len(args.datasets) > 1:
        ap.error("--teacher-model / --warm-model belong to one dataset: pass one --datasets")
    for given in filter(None, (args.teacher_model, args.warm_model)):
        if not os.path.isfile(given):
            ap.error(f"no such model file: {given}")
    args.started = time.strftime("%Y-%m-%dT%H:%M:%S")
    for dataset in args.datasets:  # before any training: a refusal at the end would cost the run
        mergeable_headline(args, dataset)
    os.environ.setdefault("SCALEKD_NO_PROGRESS", "1")
    summary: dict = {}
    started = time.time()
    for dataset in args.datasets:
        runs = run_dataset(args, dataset, started)
        summary[dataset] = report(args, dataset, runs)
    path = write_json(args.out, {"args": vars(args), "wall_s": round(time.time() - started), **summary})
    _chart(summary, os.path.join(RESULTS, args.out.replace(".json", "_ap_s.png")))
    print(f"wrote {path}")


def run_dataset(args, dataset: str, started: float) -> dict[str, list[dict]]:
    """Every seed's stages on one dataset, evaluated; per model name, its metrics per seed."""
    base = load_config(preset=args.preset, overrides=args.overrides)
    root = dataset_root(dataset, args, base)
    teacher_root = root
    if args.holdout_teacher:
        teacher_root, root = holdout_roots(root)
    # A run of plain students only (an assignment or loss study) trains no teacher.
    needs_teacher = any(method_class(variant_config(base, v).distill.method).needs_teacher() for v in args.variants)
    # A given teacher is evaluated (and reported) even when no variant reads it.
    has_teacher = needs_teacher or bool(args.teacher_model)
    runs: dict[str, list[dict]] = {v: [] for v in ["teacher"] * has_teacher + ["warm", *args.variants]}
    for seed in args.seeds:
        cfg = replace(base, data={"root": root}, train={"seed": seed})
        models = _start_models(args, cfg, dataset, teacher_root, needs_teacher)
        work = os.path.join(args.workdir, dataset, f"seed{seed}")
        for variant in args.variants:
            out = os.path.join(work, f"distill-{variant}")
            run_stage(StageRequest("distill", variant_config(cfg, variant).to_dict(), root, out,
                                   teacher=models["teacher"], student_init=models["warm"]))
            models[variant] = os.path.join(out, "model.pt")
        for result in evaluate_models(models, root, eval_config(cfg, args.max_detections)):
            runs[result.name].append({**result.metrics, "params": result.parameters,
                                      "images_per_s": result.images_per_s})
        print(f"[{time.time() - started:.0f}s] {dataset} seed {seed} done", flush=True)
        # After every seed: a run cut short still leaves its finished seeds.
        write_headline(args, runs, time.time() - started, dataset)
    return runs


def _start_models(args, cfg, dataset: str, teacher_root: str, needs_teacher: bool) -> dict[str, str]:
    """The teacher's and the warm student's model files for cfg's seed: given, or trained (in the first seed's
    folder with ``--shared-teacher``); the teacher on ``teacher_root``, the warm-up on cfg's data."""
    seed = cfg.train.seed
    stages_dir = os.path.join(args.workdir, dataset, f"seed{args.seeds[0] if args.shared_teacher else seed}")
    models = {}
    for stage, name, given in (("teacher", "teacher", args.teacher_model), ("warmup", "warm", args.warm_model)):
        if given or (name == "teacher" and not needs_teacher):
            models[name] = given or ""
            continue
        stage_root = teacher_root if stage == "teacher" else cfg.data.root
        stage_cfg = replace(cfg, data={"root": stage_root},
                            train={"seed": args.seeds[0] if args.shared_teacher else seed})
        run_stage(StageRequest(stage, stage_cfg.to_dict(), stage_root, os.path.join(stages_dir, stage)))
        models[name] = os.path.join(stages_dir, stage, "model.pt")
    return models


def report(args, dataset: str, runs: dict[str, list[dict]]) -> dict:
    """Prints the table and the verdicts of one dataset; returns them with the runs."""
    rows = []
    for name, values in runs.items():
        row = {"model": name, "seeds": len(values), "params": values[0]["params"]}
        for k in KEYS:
            xs = [100 * v[k] for v in values if v[k] >= 0]
            row[k] = f"{statistics.mean(xs):.2f} ± {statistics.pstdev(xs):.2f}" if xs else "-"
            row[f"{k}_mean"] = statistics.mean(xs) if xs else None
        rows.append(row)
    protocol = _protocol(args)
    print(f"\n{dataset} ({args.preset} preset, seeds {args.seeds}, {protocol}); metrics in %, mean ± std")
    print(table(rows, ["model", *KEYS, "params"]))
    # headline.py's rule, the verdict of record: paired by seed, with the 95% interval of the differences.
    judged = headline_variants(args.seeds, runs)
    verdict = _print_verdicts("scalekd", verdicts(judged)) if "scalekd" in runs else {}
    # Our departures from the paper's setting, judged by the same rule (never in the paper's place).
    others = [v for v in args.variants if v not in ("plain", "fitnet", "od", "pkd", "crosskd", "scalekd")]
    other_verdicts = {v: _print_verdicts(v, verdicts(judged, v)) for v in others}
    return {"rows": rows, "runs": runs, "protocol": protocol, "verdict": verdict, "other_verdicts": other_verdicts}


def _print_verdicts(variant: str, lines: dict[str, str]) -> dict[str, str]:
    for target, line in lines.items():
        print(f"{variant}: {target}: {line}")
    return lines


def headline_variants(seeds: list[int], runs: dict[str, list[dict]]) -> dict:
    """The headline file's ``variants``: per variant, its per-seed metrics in percent (one COCO could not
    compute, -1 where no object has that size, left out) and its parameter count."""
    return {name: {"per_seed": [{"seed": seed, **{k: round(100 * v[k], 3) for k in _reported(v) if v[k] >= 0},
                                 "params": v["params"]} for seed, v in zip(seeds, values)]}
            for name, values in runs.items()}


def _reported(metrics: dict) -> list[str]:
    """COCO's AP keys and the tiny-object size bands (``AP_0-8px``, ...) the evaluation produced."""
    return [*KEYS, *(k for k in metrics if k.startswith("AP_") and k.endswith("px"))]


def write_headline(args, runs: dict[str, list[dict]], wall_s: float, dataset: str = "synth") -> str:
    """benchmarks/results/<out>_headline.json (``<out>_<dataset>_headline.json`` for a real dataset): per variant,
    its per-seed metrics (%); ``headline.py`` pairs them. With ``--merge-headline`` an earlier call's seeds stay
    (``mergeable_headline`` has checked at start-up that they were run the same way), and ``calls`` keeps each
    call's own wall time: ``wall_s`` is their sum."""
    variants = headline_variants(args.seeds, runs)
    key = headline_key(args)
    path = os.path.join(RESULTS, headline_name(args, dataset))
    calls = [{"out": args.out, "seeds": args.seeds, "variants": args.variants, "started": args.started,
              "wall_s": round(wall_s)}]
    old = mergeable_headline(args, dataset)
    if old is not None:
        for variant, entry in old["variants"].items():  # per seed: a later run of other seeds adds to them
            fresh = {r["seed"] for r in variants.get(variant, {}).get("per_seed", [])}
            kept = [r for r in entry["per_seed"] if r["seed"] not in fresh]
            merged = sorted(kept + variants.get(variant, {}).get("per_seed", []), key=lambda r: r["seed"])
            variants[variant] = {"per_seed": merged}
        earlier = old.get("calls") or [{"out": None, "wall_s": old.get("wall_s", 0)}]  # files from before calls
        calls = [c for c in earlier if c.get("started") != args.started] + calls  # this call: after every seed
    doc = {**key, "machine": {**machine(), **key["machine"]}, "overrides": args.overrides, "dataset": dataset,
           "wall_s": sum(c["wall_s"] for c in calls), "calls": calls, "variants": variants}
    return write_json(os.path.basename(path), doc)


def headline_name(args, dataset: str) -> str:
    """``<out>_headline.json`` for the synthetic set, ``<out>_<dataset>_headline.json`` for a real one, unless the
    name (``--headline`` or ``--out``) already names the dataset."""
    headline = args.headline or args.out.replace(".json", "_headline.json")
    if dataset == "synth" or f"_{dataset}_" in headline or headline.startswith(f"{dataset}_"):
        return headline
    return headline.replace("_headline.json", f"_{dataset}_headline.json")


def headline_key(args) -> dict:
    """What must be equal for two calls' seeds to be paired in one headline file: the protocol, the given models,
    the resolved base config (the variants set ``distill``, the seeds ``train.seed``) and the machine's numerics
    (``common.numerics``: the same seed on another ISA trains another teacher and student). The resolved config,
    not the ``--set`` strings: ``--set model.detector=fcos`` on the FCOS preset is the same run as leaving it out.
    A given model is named by its path: the numerics are what tell a file retrained elsewhere."""
    cfg = load_config(preset=args.preset, overrides=args.overrides)
    return {"protocol": _protocol(args), "preset": args.preset, "synth_images": args.synth_images,
            **({"max_detections": args.max_detections} if args.max_detections != 100 else {}),
            "teacher_model": args.teacher_model, "warm_model": args.warm_model,
            "config": _base_config(cfg), "machine": run_numerics(cfg)}


def run_numerics(cfg: Config) -> dict:
    """``common.numerics()`` and the weight layout this call's stages train in: ``train.channels_last: auto`` picks
    it by timing on each machine, and the layout changes the floating-point results (an AVX2 EPYC that
    timed NCHW faster trained the FCOS warm student to AP_S 54.64, where one that timed channels_last
    faster had 58.16, same code and seed). The resolved layout, not the setting, is what pairs two calls."""
    device = torch.device("cuda" if cfg.scaling.gpu and torch.cuda.is_available() else "cpu")
    return {**numerics(), "channels_last": use_channels_last(cfg.train.channels_last, device)}


def _base_config(cfg: Config) -> dict:
    config = cfg.to_dict()
    config.pop("distill")
    config["train"].pop("seed")
    config["train"].pop("channels_last")  # its resolved layout is among the numerics (run_numerics)
    return config


def mergeable_headline(args, dataset: str) -> dict | None:
    """The earlier headline file ``--merge-headline`` adds to (None: no merge, or no file yet). Raises SystemExit,
    naming what differs, where its seeds were run another way: pairing them with this call's would compare unlike
    runs, and writing without them would lose them."""
    path = os.path.join(RESULTS, headline_name(args, dataset))
    if not (args.merge_headline and os.path.exists(path)):
        return None
    with open(path) as f:
        old = json.load(f)
    if "config" not in old:  # written before the resolved config was stored: resolve its --set strings now
        old = {**old, "config": _base_config(load_config(preset=old.get("preset", "bench"),
                                                         overrides=old.get("overrides", [])))}
    differs = _differences(old, json.loads(json.dumps(headline_key(args))))
    if differs:
        raise SystemExit(f"--merge-headline: {path} was run another way: {'; '.join(differs)}; pass another "
                         "--headline, or the settings it was run with")
    return old


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: file's value, this call's value' for each leaf of new that old does not match (dotted keys)."""
    lines = []
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            lines += _differences(old[key], value, f"{prefix}{key}.")
        elif old.get(key) != value:
            lines.append(f"{prefix}{key}: {old.get(key)!r} there, {value!r} here")
    return lines


def _protocol(args) -> str:
    """What the seeds vary: a teacher and warm student given by file (or shared) leave only the distillation."""
    if getattr(args, "holdout_teacher", False):
        return "teacher on a held-out half of the training images, " + _seeds_vary(args)
    return _seeds_vary(args)


def _seeds_vary(args) -> str:
    if args.teacher_model and args.warm_model:
        return "teacher and warm student given, seeds vary distillation"
    if args.shared_teacher:
        return "teacher and warm student shared, seeds vary distillation"
    return "every stage per seed"


def _chart(summary: dict, path: str) -> None:
    """AP_S per model, mean over seeds with the seeds' standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = {k: v for k, v in summary.items() if isinstance(v, dict) and "rows" in v}
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 3.5), squeeze=False)
    for ax, (dataset, data) in zip(axes[0], datasets.items()):
        names = [r["model"] for r in data["rows"]]
        spread = [statistics.pstdev([100 * v["AP_S"] for v in data["runs"][n] if v["AP_S"] >= 0] or [0.0])
                  for n in names]
        ax.bar(names, [r["AP_S_mean"] or 0 for r in data["rows"]], yerr=spread, capsize=3)
        ax.set_title(f"AP_S, {dataset} ({len(data['runs'][names[-1]])} seeds)")
        ax.set_ylabel("AP_S (%)")
        ax.tick_params(axis="x", rotation=45)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()

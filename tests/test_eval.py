"""The evaluator against pycocotools' own summarize(), on real COCO files and generated cases."""

import contextlib
import io
import json
import random
import warnings

import numpy as np
import pytest

from scalekd.data.coco import DataError, load_coco_json
from scalekd.eval.metrics import evaluate_detections, metrics_from_eval, run_cocoeval
from tests.helpers import write_coco

SUMMARIZE_KEYS = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR1", "AR10", "AR100", "AR_S", "AR_M", "AR_L")


def _reference_stats(gt: dict, dets: list) -> np.ndarray:
    """pycocotools' own path: loadRes + evaluate + accumulate + summarize."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco = COCO()
    coco.dataset = json.loads(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        dt = coco.loadRes(json.loads(json.dumps(dets)))
        e = COCOeval(coco, dt, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


def _jittered_detections(gt: dict, seed: int, per_image: int = 30) -> list:
    rng = random.Random(seed)
    cats = [c["id"] for c in gt["categories"]]
    dets = []
    for ann in gt["annotations"]:
        if rng.random() < 0.8:
            x, y, w, h = ann["bbox"]
            j = lambda v: v * (1 + rng.uniform(-0.15, 0.15))
            dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"] if rng.random() < 0.85
                         else rng.choice(cats), "bbox": [j(x + 1), j(y + 1), j(w), j(h)], "score": rng.random()})
    for img in gt["images"]:
        for _ in range(rng.randint(0, per_image)):
            w, h = rng.uniform(2, 80), rng.uniform(2, 80)
            dets.append({"image_id": img["id"], "category_id": rng.choice(cats),
                         "bbox": [rng.uniform(0, img["width"] - w), rng.uniform(0, img["height"] - h), w, h],
                         "score": rng.random() * 0.7})
    return dets


@pytest.mark.parametrize("split", ["val2017", "train2017"])
def test_identical_to_pycocotools_on_real_coco_files(shared_data, split):
    gt = load_coco_json(str(shared_data / "coco_tiny" / "annotations" / f"instances_{split}.json"))
    dets = _jittered_detections(gt, seed=1)
    ours = evaluate_detections(gt, dets)
    reference = _reference_stats(gt, dets)
    assert [ours[k] for k in SUMMARIZE_KEYS] == pytest.approx(list(reference), abs=1e-12)
    assert 0.02 < ours["AP"] < 0.9 and ours["AP50"] > ours["AP75"]  # a non-trivial case


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identical_to_pycocotools_on_generated_cases(synth_root, seed):
    gt = load_coco_json(f"{synth_root}/annotations/instances_train.json")
    dets = _jittered_detections(gt, seed=seed)
    ours = evaluate_detections(gt, dets)
    assert [ours[k] for k in SUMMARIZE_KEYS] == pytest.approx(list(_reference_stats(gt, dets)), abs=1e-12)


def test_ignore_regions_do_not_count_as_false_positives():
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a"}],
          "categories": [{"id": 1, "name": "car"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 40, 40], "iscrowd": 1}]}
    hit = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.5}
    in_ignore = {"image_id": 1, "category_id": 1, "bbox": [55, 55, 20, 20], "score": 0.9}
    assert evaluate_detections(gt, [hit, in_ignore])["AP"] == pytest.approx(1.0)
    gt["annotations"][1]["iscrowd"] = 0
    assert evaluate_detections(gt, [hit, in_ignore])["AP"] < 1.0


def test_ar_at_500_and_empty_size_classes():
    gt = {"images": [{"id": 1, "width": 640, "height": 640, "file_name": "a"}],
          "categories": [{"id": 1, "name": "p"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1,
                           "bbox": [(i % 30) * 20, (i // 30) * 20, 10, 10],
                           "iscrowd": 0} for i in range(300)]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": a["bbox"], "score": 1.0 - i / 1000}
            for i, a in enumerate(gt["annotations"])]
    m = evaluate_detections(gt, dets, (1, 10, 100, 500))
    assert m["AR100"] == pytest.approx(100 / 300, abs=1e-3) and m["AR500"] == pytest.approx(1.0)
    assert m["AP_M"] == -1 and m["AP_L"] == -1  # no medium or large objects


def test_bad_detections_get_clear_errors(synth_root):
    gt = load_coco_json(f"{synth_root}/annotations/instances_val.json")
    with pytest.raises(DataError, match="image_id 9999"):
        evaluate_detections(gt, [{"image_id": 9999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}])
    with pytest.raises(DataError, match="category_id 77"):
        evaluate_detections(gt, [{"image_id": gt["images"][0]["id"], "category_id": 77, "bbox": [0, 0, 1, 1],
                                  "score": 1}])
    with pytest.raises(DataError, match="lacks 'score'"):
        evaluate_detections(gt, [{"image_id": gt["images"][0]["id"], "category_id": 1, "bbox": [0, 0, 1, 1]}])


def test_empty_detections_give_zeros_with_a_warning(synth_root):
    gt = load_coco_json(f"{synth_root}/annotations/instances_val.json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = evaluate_detections(gt, [])
    assert any("no detections" in str(w.message) for w in caught)
    assert m["AP"] == 0 and m["AR100"] == 0


def test_cli_evaluate_detections_file(synth_root, tmp_path):
    from scalekd.cli import main

    gt_path = f"{synth_root}/annotations/instances_val.json"
    gt = load_coco_json(gt_path)
    dets = _jittered_detections(gt, seed=5)
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    assert main(["evaluate", "--gt", gt_path, "--detections", str(tmp_path / "dt.json"),
                 "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(SUMMARIZE_KEYS) <= set(metrics) and all(-1 <= v <= 1 for v in metrics.values())
    assert run_cocoeval(gt, dets).params.maxDets == [1, 10, 100]


@pytest.mark.parametrize("bad", [
    {"bbox": [float("nan")] * 4}, {"bbox": [0, 0, float("inf"), 1]}, {"score": float("nan")},
    {"bbox": [0, 0, None, 1]}, {"bbox": "0,0,1,1"}, {"score": "high"},
])
def test_non_finite_or_malformed_detections_are_refused_never_scored(synth_root, bad):
    gt = load_coco_json(f"{synth_root}/annotations/instances_val.json")
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9, **bad}
            for a in gt["annotations"]]  # all-NaN boxes on every object scored AP 1.0 before
    with pytest.raises(DataError, match=r"detections\[0\]"):
        evaluate_detections(gt, dets)


@pytest.mark.parametrize("content", ["3", '{"a": 1}', "[1, 2]", '[{"image_id": 1'])
def test_cli_evaluate_refuses_scalar_truncated_or_non_object_detections(synth_root, tmp_path, capsys, content):
    from scalekd.cli import main

    (tmp_path / "dt.json").write_text(content)
    gt = f"{synth_root}/annotations/instances_val.json"
    assert main(["evaluate", "--gt", gt, "--detections", str(tmp_path / "dt.json")]) == 2
    assert "dt.json" in capsys.readouterr().err


def test_cli_evaluate_detections_without_gt_names_the_flag(tmp_path, capsys):
    from scalekd.cli import main

    (tmp_path / "dt.json").write_text("[]")
    assert main(["evaluate", "--detections", str(tmp_path / "dt.json")]) == 2
    assert "--gt" in capsys.readouterr().err


def test_cli_evaluate_json_to_a_folder_prints_the_metrics_first(synth_root, tmp_path, capsys):
    from scalekd.cli import main

    gt_path = f"{synth_root}/annotations/instances_val.json"
    (tmp_path / "dt.json").write_text(json.dumps(_jittered_detections(load_coco_json(gt_path), seed=1)))
    assert main(["evaluate", "--gt", gt_path, "--detections", str(tmp_path / "dt.json"),
                 "--json", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert '"AP"' in captured.out and "is a folder" in captured.err


def _with_ignore_regions_and_empty_images(gt: dict) -> dict:
    """Every 7th object a crowd region, every 11th an ``"ignore": 1`` region, and three images without objects."""
    gt = json.loads(json.dumps(gt))
    for i, ann in enumerate(gt["annotations"]):
        if i % 7 == 0:
            ann["iscrowd"] = 1
        elif i % 11 == 0:
            ann["ignore"] = 1
    top = max(im["id"] for im in gt["images"])
    gt["images"] += [{"id": top + k, "file_name": f"empty{k}.png", "width": 128, "height": 128} for k in (1, 2, 3)]
    return gt


def _engine_case(name: str, shared_data, synth_root) -> tuple[dict, list]:
    if name.startswith("coco_"):
        gt = load_coco_json(str(shared_data / "coco_tiny" / "annotations" / f"instances_{name[5:]}.json"))
        return gt, _jittered_detections(gt, seed=3)
    gt = load_coco_json(f"{synth_root}/annotations/instances_train.json")
    if name == "synth_ignore_empty_images":
        gt = _with_ignore_regions_and_empty_images(gt)
        return gt, _jittered_detections(gt, seed=4)
    return gt, []  # synth_no_detections


@pytest.mark.parametrize("max_dets", [(1, 10, 100), (1, 10, 100, 500), (1,), (10,), (5, 20)])
@pytest.mark.parametrize("case", ["coco_val2017", "coco_train2017", "synth_ignore_empty_images",
                                  "synth_no_detections"])
def test_faster_engine_gives_pycocotools_arrays(case, max_dets, synth_root, request):
    """faster-coco-eval is kept only where it is pycocotools: precision, recall and scores over every IoU, recall
    threshold, class, area (COCO's and the tiny bands) and max-detections column."""
    shared = request.getfixturevalue("shared_data") if case.startswith("coco_") else None
    gt, dets = _engine_case(case, shared, synth_root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = run_cocoeval(gt, dets, max_dets, engine="faster")
        ref = run_cocoeval(gt, dets, max_dets, engine="pycocotools")
    assert list(fast.params.areaRngLbl) == list(ref.params.areaRngLbl)
    for key in ("precision", "recall", "scores"):
        a, b = np.asarray(fast.eval[key]), np.asarray(ref.eval[key])
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-12, key
    assert metrics_from_eval(fast) == pytest.approx(metrics_from_eval(ref), abs=1e-12)


def test_custom_max_dets_are_read_at_the_largest_unlike_pycocotools_summarize():
    """VisDrone reports AP at 500 detections; pycocotools' summarize reads maxDets[2] (100) whatever the list.
    One crowded image: 150 confident false positives, then a hit on each of its 300 objects."""
    gt = {"images": [{"id": 1, "width": 640, "height": 640, "file_name": "a"}],
          "categories": [{"id": 1, "name": "p"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1,
                           "bbox": [(i % 30) * 20, (i // 30) * 20, 10, 10], "area": 100, "iscrowd": 0}
                          for i in range(300)]}
    misses = [{"image_id": 1, "category_id": 1, "bbox": [600.0 + i % 5, 600.0, 3, 3], "score": 0.99 - i / 1e4}
              for i in range(150)]
    hits = [{"image_id": 1, "category_id": 1, "bbox": a["bbox"], "score": 0.9 - i / 1e4}
            for i, a in enumerate(gt["annotations"])]
    ours = evaluate_detections(gt, misses + hits, (1, 10, 100, 500))
    from pycocotools.cocoeval import COCOeval

    from scalekd.data.annotations import coco_api

    coco = coco_api(json.loads(json.dumps(gt)))
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(coco, coco.loadRes(json.loads(json.dumps(misses + hits))), "bbox")
        e.params.maxDets = [1, 10, 100, 500]
        e.evaluate()
        e.accumulate()
        e.summarize()
    assert e.stats[0] == 0.0  # pycocotools: AP@100, the 100 false positives alone
    assert ours["AP"] > 0.3 and ours["AR500"] == pytest.approx(1.0)  # ours: AP@500, every object found


def test_tiny_object_bands_by_side_in_pixels():
    sides = {1: 6, 2: 12, 3: 24, 4: 48}  # one object per band: 0-8, 8-16, 16-32, and one medium
    gt = {"images": [{"id": 1, "width": 400, "height": 100, "file_name": "a"}],
          "categories": [{"id": 1, "name": "p"}],
          "annotations": [{"id": i, "image_id": 1, "category_id": 1, "bbox": [i * 80, 10, s, s], "iscrowd": 0}
                          for i, s in sides.items()]}
    hit = [{"image_id": 1, "category_id": 1, "bbox": [2 * 80, 10, 12, 12], "score": 0.9}]  # the 8-16 px one only
    m = evaluate_detections(gt, hit)
    assert m["AP_8-16px"] == pytest.approx(1.0)
    assert m["AP_0-8px"] == 0 and m["AP_16-32px"] == 0 and m["AP_M"] == 0
    custom = evaluate_detections(gt, hit, band_edges=(0, 10, 40))
    assert set(k for k in custom if k.endswith("px")) == {"AP_0-10px", "AP_10-40px"}
    assert custom["AP_10-40px"] == pytest.approx(0.5, abs=0.02)  # one of its two objects found
    assert not [k for k in evaluate_detections(gt, hit, band_edges=()) if k.endswith("px")]


def test_scoring_a_detections_file_imports_neither_torch_nor_ray(synth_root, tmp_path):
    import subprocess
    import sys

    gt_path = f"{synth_root}/annotations/instances_val.json"
    (tmp_path / "dt.json").write_text(json.dumps(_jittered_detections(load_coco_json(gt_path), seed=1)))
    code = ("import sys; from scalekd.cli import main; "
            f"rc = main(['evaluate', '--gt', {gt_path!r}, '--detections', {str(tmp_path / 'dt.json')!r}]); "
            "heavy = [m for m in ('torch', 'ray', 'torchvision') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc or bool(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-500:] + done.stderr[-2000:]
    assert "HEAVY []" in done.stdout and '"AP_0-8px"' in done.stdout


@pytest.mark.parametrize("bands", [["8"], ["16", "8"], ["-1", "8"], ["8", "8", "16"]])
def test_cli_refuses_bad_bands(synth_root, tmp_path, capsys, bands):
    from scalekd.cli import main

    (tmp_path / "dt.json").write_text("[]")
    gt = f"{synth_root}/annotations/instances_val.json"
    assert main(["evaluate", "--gt", gt, "--detections", str(tmp_path / "dt.json"), "--bands", *bands]) == 2
    assert "--bands" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--max-dets", "0"], "--max-dets"), (["--max-dets", "100", "10"], "--max-dets"),
    (["--max-dets", "-5"], "--max-dets"), (["--model", "m.pt"], "either --detections"),
])
def test_evaluate_refuses_flags_it_would_ignore_or_misread(tmp_path, argv, words, capsys):
    from scalekd.cli import main

    gt = write_coco(tmp_path, [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
                    [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}])
    dets = tmp_path / "d.json"
    dets.write_text('[{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "score": 0.9}]')
    assert main(["evaluate", "--gt", gt, "--detections", str(dets), *argv]) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("model", ["teacher=", "=m.pt", "m.pt", "  =  "])
def test_report_models_are_name_equals_uri(model, capsys):
    from scalekd.cli import main

    assert main(["report", "--model", model, "--out", "x", "--preset", "tiny"]) == 2
    assert "NAME=URI" in capsys.readouterr().err

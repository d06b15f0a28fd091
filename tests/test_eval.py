"""The evaluator against pycocotools' own summarize(), on real COCO files and generated cases."""

import contextlib
import io
import json
import random
import warnings

import numpy as np
import pytest

from scalekd.data.coco import DataError, load_coco_json
from scalekd.eval.metrics import evaluate_detections, run_cocoeval

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

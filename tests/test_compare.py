"""``scalekd compare``: the quality protocol as a product command, end to end on the tiny preset, from a local and
an S3 dataset root; its refusals before any training; its report when a metric is not defined."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from scalekd import storage
from scalekd.cli import main
from scalekd.compare import CompareError, CompareRequest, check_request
from scalekd.compare_report import comparisons, verdict
from scalekd.data.annotations import DataError
from scalekd.eval.paired import paired_interval

pytestmark = pytest.mark.xdist_group("compare")


def _compare(data: str, out: str, *extra: str) -> int:
    return main(["compare", "--data", data, "--out", out, "--preset", "tiny", "--seeds", "0", "1",
                 "--variants", "plain", "scalekd", "--no-ray", *extra])


def _report(out: str) -> dict:
    return json.loads(storage.read_text(storage.join(out, "report.json")))


def test_compare_on_a_local_root_pairs_seeds_and_reuses_finished_stages(synth_root, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    assert _compare(synth_root, out, "--max-detections", "300") == 0
    doc = _report(out)
    assert doc["seeds"] == [0, 1] and doc["max_detections"] == 300 and doc["eval_split"] == "val"
    assert set(doc["reference"]) == {"teacher", "warm"}
    assert [r["seed"] for r in doc["variants"]["scalekd"]["per_seed"]] == [0, 1]
    assert {"AP_0-8px", "AP_8-16px", "AP_16-32px"} & set(doc["variants"]["plain"]["per_seed"][0])
    (pair,) = doc["paired"]
    ours, plain = doc["variants"]["scalekd"]["per_seed"], doc["variants"]["plain"]["per_seed"]
    if "AP_S" in pair["metrics"]:
        expected = [round(a["AP_S"] - b["AP_S"], 2) for a, b in zip(ours, plain)]
        assert pair["metrics"]["AP_S"]["per_seed"] == expected
    assert doc["coverage"]["anchor_coverage"]["small_objects"]["student"]["objects"] > 0
    assert os.path.getsize(os.path.join(out, "ap_s.png")) > 1000
    assert "Paired differences" in open(os.path.join(out, "report.md")).read()
    printed = capsys.readouterr().out
    assert "report:" in printed and doc["verdict"][0] in printed
    stamp = os.path.getmtime(os.path.join(out, "seed1", "scalekd", "model.pt"))
    assert _compare(synth_root, out, "--max-detections", "300") == 0  # resumed: nothing retrained
    assert os.path.getmtime(os.path.join(out, "seed1", "scalekd", "model.pt")) == stamp


def test_compare_reads_its_dataset_from_s3_and_writes_its_report_there(synth_root, s3):
    root, out = f"s3://{s3['bucket']}/compare/data", f"s3://{s3['bucket']}/compare/run"
    assert main(["data", "upload", synth_root, root]) == 0
    assert _compare(root, out) == 0
    doc = _report(out)
    assert doc["data"] == root and [r["seed"] for r in doc["variants"]["plain"]["per_seed"]] == [0, 1]
    assert storage.exists(storage.join(out, "seed0", "scalekd", "model.pt"))
    assert storage.exists(storage.join(out, "ap_s.png")) and storage.exists(storage.join(out, "report.md"))


def test_upload_refuses_what_is_not_a_dataset_root_before_writing(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert main(["data", "upload", str(tmp_path), "s3://bucket/x"]) == 2
    assert "annotations/instances_<split>.json" in capsys.readouterr().err
    assert main(["data", "upload", str(tmp_path), "s4://bucket/x"]) == 2


def test_eval_split_selects_the_file_and_a_missing_split_is_refused_before_training(synth_root, tmp_path, tiny_cfg):
    root = tmp_path / "root"
    shutil.copytree(synth_root, root)
    with pytest.raises(DataError, match="no evaluation split 'test'.*instances_test.json"):
        check_request(tiny_cfg, CompareRequest(str(root), str(tmp_path / "out"), eval_split="test"))
    assert main(["compare", "--data", str(root), "--out", str(tmp_path / "out"), "--preset", "tiny",
                 "--eval-split", "test", "--no-ray"]) == 2
    assert not (tmp_path / "out").exists()  # nothing trained
    shutil.copy(root / "annotations" / "instances_val.json", root / "annotations" / "instances_test.json")
    check_request(tiny_cfg, CompareRequest(str(root), str(tmp_path / "out"), eval_split="test"))


@pytest.mark.parametrize("change, message", [
    ({"variants": ("plain", "nope")}, "unknown: nope"),
    ({"variants": ("plain", "plain")}, "distinct names"),
    ({"variants": ()}, "distinct names"),
    ({"seeds": (0, 0)}, "distinct non-negative"),
    ({"seeds": (-1,)}, "distinct non-negative"),
    ({"max_detections": 0}, "positive number"),
    ({"eval_split": "train"}, "the split the models train on"),
    ({"eval_split": "../val"}, "--eval-split '../val': a plain name"),
    ({"eval_split": "val/../../x"}, "a plain name"),
])
def test_bad_requests_are_refused_by_name(synth_root, tmp_path, tiny_cfg, change, message):
    request = CompareRequest(synth_root, str(tmp_path / "out"), **change)
    with pytest.raises(CompareError, match=message):
        check_request(tiny_cfg, request)


def test_the_reported_interval_is_the_hand_computed_one():
    # AP_S 10, 12, 15 vs 9, 10, 11: differences 1, 2, 4; mean 7/3, sample sd sqrt(7/3), t(0.975, 2) = 4.303.
    ours = [{"seed": s, "AP_S": v} for s, v in zip((0, 1, 2), (10.0, 12.0, 15.0))]
    plain = [{"seed": s, "AP_S": v} for s, v in zip((2, 0, 1), (11.0, 9.0, 10.0))]  # order must not matter
    (pair,) = comparisons({"scalekd": ours, "plain": plain})
    half = 4.303 * (7 / 3) ** 0.5 / 3 ** 0.5
    assert pair["metrics"]["AP_S"]["per_seed"] == [1.0, 2.0, 4.0]
    assert pair["metrics"]["AP_S"]["interval95"] == pytest.approx([7 / 3 - half, 7 / 3 + half], abs=1e-3)
    assert paired_interval([1.0, 2.0, 4.0]) == pytest.approx((7 / 3 - half, 7 / 3 + half))


def test_the_verdict_says_what_the_teacher_adds_and_why_not_more():
    ours = [{"seed": s, "AP_S": v} for s, v in enumerate((20.0, 21.0, 22.0))]
    control = [{"seed": s, "AP_S": v} for s, v in enumerate((18.0, 19.5, 19.0))]
    plain = [{"seed": s, "AP_S": v} for s, v in enumerate((19.0, 19.0, 19.0))]
    results = {"plain": plain, "scalekd": ours, "scalekd_no_teacher": control}
    coverage = {"anchor_coverage": {"small_objects": {"student": {"objects": 100, "covered": 60,
                                                                  "covered_pct": 60.0}}}}
    lines = verdict(results, {"teacher": {"AP_S": 20.0}}, coverage, comparisons(results))
    assert lines[1].startswith("The teacher adds +2.17 AP_S over the same recipe without it")
    assert any("little to pass on" in line for line in lines)  # teacher 20.0 vs plain 19.0
    assert any("60.0%" in line and "train as background" in line for line in lines)


def test_a_report_is_written_when_a_variant_has_no_small_objects(tmp_path):
    from scalekd.compare_report import write_report
    from scalekd.config import load_config

    no_small = [{"seed": 0, "AP": 50.0, "AP_M": 50.0, "params": 10}]
    request = CompareRequest(str(tmp_path), str(tmp_path / "out"), seeds=(0,), variants=("plain", "scalekd"))
    coverage = {"split_stats": {"images": 1, "annotations": 1, "ignore_regions": 0, "degenerate_dropped": 0,
                                "small": 0, "medium": 1, "large": 0, "per_category": {"a": 1},
                                "objects_per_image": 1.0},
                "anchor_coverage": {"detector": "fcos", "assigner": "fcos", "rule": "r", "student_min_level": 2,
                                    "student": {}, "teacher": {},
                                    "small_objects": {"student": {"objects": 0, "covered": 0, "covered_pct": None},
                                                      "teacher": {"objects": 0, "covered": 0, "covered_pct": None}}}}
    doc = write_report(request, load_config(preset="tiny"), {"teacher": {"AP": 60.0}},
                       {"plain": no_small, "scalekd": no_small}, coverage, 1.0)
    assert "AP_S is not defined" in doc["verdict"][0]
    assert (tmp_path / "out" / "report.md").read_text().startswith("# Does the 2x teacher help?")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L"])
def test_pngs_of_every_mode_decode_as_their_rgb_colours(mode):
    """The nuclei images are RGBA; alpha (here varying) must not leak into or shift the colour channels."""
    import io

    from scalekd.data.coco import decode_image

    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), mode="RGBA")
    image = rgba if mode == "RGBA" else rgba.convert("RGB").convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    decoded = decode_image(buf.getvalue(), f"{mode}.png")
    expected = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    assert tuple(decoded.shape) == (3, 20, 30)
    np.testing.assert_allclose(decoded.permute(1, 2, 0).numpy(), expected, atol=1e-6)

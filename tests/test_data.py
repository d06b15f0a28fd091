import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from scalekd import storage
from scalekd.data import convert, stats, synth
from scalekd.data.coco import CocoDetection, DataError, dataset_from_root, load_coco_json
from scalekd.data.transforms import DualResolutionCollate
from tests.helpers import write_coco


def _write_png(path, w=40, h=30):
    from PIL import Image

    Image.new("RGB", (w, h), (10, 20, 30)).save(path)


def test_synthetic_data_is_deterministic_and_mostly_small(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synth.generate(str(a), images=6, seed=3, size=128)
    synth.generate(str(b), images=6, seed=3, size=128)
    ann = Path("annotations") / "instances_train.json"
    assert (a / ann).read_bytes() == (b / ann).read_bytes()
    assert sorted(os.listdir(a / "images")) == sorted(os.listdir(b / "images"))
    first = sorted(os.listdir(a / "images"))[0]
    assert (a / "images" / first).read_bytes() == (b / "images" / first).read_bytes()
    s = stats.dataset_stats(str(a / "annotations" / "instances_train.json"))
    assert s["images"] == 5 and s["annotations"] > 20
    assert s["small"] / s["annotations"] > 0.6
    synth.generate(str(tmp_path / "c"), images=6, seed=4, size=128)
    assert (tmp_path / "c" / "annotations" / "instances_train.json").read_bytes() != \
        (a / "annotations" / "instances_train.json").read_bytes()


def test_crowd_boxes_become_ignore_regions_and_degenerate_boxes_are_dropped(tmp_path):
    (tmp_path / "img").mkdir()
    _write_png(tmp_path / "img" / "a.png")
    ann = write_coco(tmp_path, [{"id": 7, "file_name": "a.png", "width": 40, "height": 30}], [
        {"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 2, 10, 8], "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 2, "bbox": [30, 20, 20, 20], "iscrowd": 0},  # clipped
        {"id": 3, "image_id": 7, "category_id": 1, "bbox": [5, 5, 0, 4], "iscrowd": 0},  # degenerate
        {"id": 4, "image_id": 7, "category_id": 1, "bbox": [5, 5, -3, 4], "iscrowd": 0},  # negative
        {"id": 5, "image_id": 7, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 1},  # ignore region
    ])
    ds = CocoDetection(ann, str(tmp_path / "img"))
    image, target = ds[0]
    assert image.shape == (3, 30, 40)
    assert target["boxes"].tolist() == [[1, 2, 11, 10], [30, 20, 40, 30]]
    assert target["labels"].tolist() == [1, 2]
    assert target["ignore_boxes"].tolist() == [[0, 0, 5, 5]]
    assert ds.counts.dropped_degenerate == 2 and ds.counts.clipped == 1 and ds.counts.ignore_regions == 1


def test_malformed_json_names_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DataError, match=r"broken.json: malformed JSON at line 2, column"):
        load_coco_json(str(path))


@pytest.mark.parametrize("images, anns, cats, words", [
    ([{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
     [{"id": 9, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}], None, "image_id 2"),
    ([{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
     [{"id": 9, "image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]}], None, "unknown category_id 5"),
    ([], [], None, "no images"),
    ([{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
     [{"id": 9, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1]}], None, "expected \\[x, y, width, height\\]"),
    ([{"id": 1, "file_name": "a.png", "width": 4, "height": 4}], [],
     [{"id": 1, "name": "car"}, {"id": 2, "name": "car"}], "categories\\[1\\] \\(id 2\\) repeats the name 'car'"),
])
def test_bad_annotations_get_clear_errors(tmp_path, images, anns, cats, words):
    path = write_coco(tmp_path, images, anns, cats)
    with pytest.raises(DataError, match=words) as err:
        load_coco_json(path)
    assert "ann.json" in str(err.value)


@pytest.mark.parametrize("content", [b"not an image at all", None])
def test_corrupt_or_truncated_image_is_named(tmp_path, content):
    (tmp_path / "img").mkdir()
    _write_png(tmp_path / "img" / "bad.png", 64, 64)
    raw = (tmp_path / "img" / "bad.png").read_bytes()
    (tmp_path / "img" / "bad.png").write_bytes(content if content is not None else raw[: len(raw) // 2])
    ann = write_coco(tmp_path, [{"id": 1, "file_name": "bad.png", "width": 64, "height": 64}], [])
    ds = CocoDetection(ann, str(tmp_path / "img"))
    with pytest.raises(DataError, match="bad.png: cannot decode image"):
        ds[0]


def test_missing_image_file_is_named(tmp_path):
    ann = write_coco(tmp_path, [{"id": 1, "file_name": "gone.png", "width": 8, "height": 8}], [])
    with pytest.raises(DataError, match="gone.png: no such file"):
        CocoDetection(ann, str(tmp_path))[0]


def test_dual_resolution_boxes_line_up(synth_root):
    ds = dataset_from_root(synth_root, "train")
    image, target = ds[0]
    batch = DualResolutionCollate(64, 2.0, 1.667)([(image, target)])
    s_img, t_img = batch.student_images[0], batch.teacher_images[0]
    assert t_img.shape[1:] == (2 * s_img.shape[1], 2 * s_img.shape[2])
    s_boxes, t_boxes = batch.student_targets[0]["boxes"], batch.teacher_targets[0]["boxes"]
    assert torch.allclose(t_boxes, 2 * s_boxes)
    scale = s_img.shape[1] / image.shape[1]
    assert torch.allclose(s_boxes, target["boxes"] * scale)
    # The pixels under a box agree across scales: compare box-mean colour at both resolutions.
    box = t_boxes[t_boxes[:, 2] - t_boxes[:, 0] >= 8][0]
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    t_mean = t_img[:, y0:y1, x0:x1].mean(dim=(1, 2))
    s_mean = s_img[:, y0 // 2:y1 // 2, x0 // 2:x1 // 2].mean(dim=(1, 2))
    assert torch.allclose(t_mean, s_mean, atol=0.08)


def test_dataset_reads_from_s3(s3, synth_root):
    prefix = f"s3://{s3['bucket']}/datasets/synth"
    storage.upload_dir(synth_root, prefix)
    ds = dataset_from_root(prefix, "val")
    local = dataset_from_root(synth_root, "val")
    image, target = ds[0]
    assert torch.equal(image, local[0][0]) and torch.equal(target["boxes"], local[0][1]["boxes"])


def test_visdrone_conversion_on_real_files(shared_data, tmp_path):
    src = shared_data / "visdrone_sample"
    coco = convert.convert_visdrone(str(src))
    assert len(coco["images"]) == 5
    assert [c["name"] for c in coco["categories"]][:4] == ["pedestrian", "people", "bicycle", "car"]
    objects = [a for a in coco["annotations"] if not a["iscrowd"]]
    crowd = [a for a in coco["annotations"] if a["iscrowd"]]
    categories = [int(line.split(",")[5]) for f in sorted((src / "annotations").iterdir())
                  for line in f.read_text().splitlines() if line.strip()]
    assert len(objects) == sum(1 for c in categories if 1 <= c <= 10)
    # Ignored regions (0) and "others" (11) become ignore regions, repeated for each of the 10 classes.
    assert len(crowd) == 10 * sum(1 for c in categories if c in (0, 11))
    out = tmp_path / "vd.json"
    out.write_text(json.dumps(coco))
    ds = CocoDetection(str(out), str(src / "images"))
    assert ds.counts.objects == len(objects) and len(ds[0][1]["boxes"]) > 0
    patched = convert.convert_visdrone(str(src), patches=4, images_out=str(tmp_path / "patches"))
    assert len(patched["images"]) == 20 and len(os.listdir(tmp_path / "patches")) == 20
    for img in patched["images"]:
        for ann in (a for a in patched["annotations"] if a["image_id"] == img["id"]):
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and x + w <= img["width"] + 1e-6 and y + h <= img["height"] + 1e-6
            assert w >= convert.SLIVER_MIN_SIDE and h >= convert.SLIVER_MIN_SIDE


def test_visdrone_line_with_wrong_field_count_names_file_and_line(shared_data, tmp_path):
    src = tmp_path / "vd"
    shutil.copytree(shared_data / "visdrone_sample", src)
    ann = sorted((src / "annotations").iterdir())[0]
    lines = ann.read_text().splitlines()
    lines[2] = "1,2,3,4,1,4"
    ann.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{ann.name}:3: expected 8 comma-separated fields"):
        convert.convert_visdrone(str(src))


def test_yolo_conversion_on_kit_ais_cars(shared_data, tmp_path):
    src = shared_data / "kit_ais_cars"
    coco = convert.convert_yolo(str(src), str(src / "aerial.names"))
    assert len(coco["images"]) == 65
    assert abs(len(coco["annotations"]) - 2593) <= 5
    out = tmp_path / "kit.json"
    out.write_text(json.dumps(coco))
    s = stats.dataset_stats(str(out))
    assert s["small"] / s["annotations"] > 0.8 and s["large"] == 0


def test_coco_tiny_loads_without_info_and_licenses(shared_data):
    ann = shared_data / "coco_tiny" / "annotations" / "instances_val2017.json"
    raw = json.loads(ann.read_text())
    assert "info" not in raw and "licenses" not in raw
    ds = CocoDetection(str(ann), str(shared_data / "coco_tiny" / "val2017"))
    assert len(ds) == 80 and ds.num_classes == 80
    image, target = ds[0]
    assert image.shape[0] == 3 and target["boxes"].shape[1] == 4
    assert ds.counts.ignore_regions >= 1  # crowd boxes kept as ignore regions


def test_cli_data_commands(tmp_path, capsys):
    from scalekd.cli import main

    out = tmp_path / "syn"
    assert main(["data", "synth", str(out), "--images", "4", "--seed", "1", "--size", "96"]) == 0
    stats_json = tmp_path / "stats.json"
    ann = out / "annotations" / "instances_train.json"
    assert main(["data", "stats", str(ann), "--images", str(out / "images"), "--json", str(stats_json)]) == 0
    data = json.loads(stats_json.read_text())
    assert {"images", "annotations", "small", "medium", "large"} <= set(data)
    assert data["missing_images"] == 0
    assert main(["data", "stats", str(tmp_path / "none.json")]) == 2
    assert "none.json: no such file" in capsys.readouterr().err


_IMAGE = {"id": 1, "file_name": "a.png", "width": 40, "height": 30}


@pytest.mark.parametrize("images, anns, words", [
    ([_IMAGE], [{"id": 9, "image_id": 1, "category_id": 1, "bbox": [10, 10, float("nan"), 8]}], "finite numbers"),
    ([_IMAGE], [{"id": 9, "image_id": 1, "category_id": 1, "bbox": [10, float("inf"), 4, 8]}], "finite numbers"),
    ([_IMAGE], [{"id": 9, "image_id": 1, "category_id": 1, "bbox": [10, "10", 4, 8]}], "finite numbers"),
    ([_IMAGE], [{"id": 9, "image_id": 1, "category_id": 1, "bbox": [10, None, 4, 8]}], "finite numbers"),
    ([_IMAGE], [{"id": 9, "image_id": 1, "category_id": 1, "bbox": [True, 1, 4, 8]}], "finite numbers"),
    ([{**_IMAGE, "width": float("nan")}], [], "width nan"),
    ([_IMAGE], [{"id": 9, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 8], "area": float("nan")}], "area nan"),
    ([_IMAGE, {**_IMAGE, "file_name": "b.png"}], [], "duplicate images ids 1"),
    ([_IMAGE], [{"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]},
                {"id": 3, "image_id": 1, "category_id": 2, "bbox": [9, 9, 4, 4]}], "duplicate annotations ids 3"),
])
def test_non_finite_numbers_and_duplicate_ids_are_refused_naming_the_file(tmp_path, images, anns, words):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}]}))
    with pytest.raises(DataError, match=words) as err:
        load_coco_json(str(path))
    assert "ann.json" in str(err.value)


def test_duplicate_category_ids_are_refused(tmp_path):
    path = write_coco(tmp_path, [_IMAGE], [], [{"id": 1, "name": "car"}, {"id": 1, "name": "bus"}])
    with pytest.raises(DataError, match="duplicate categories ids 1"):
        load_coco_json(path)


def test_ignore_without_iscrowd_is_an_ignore_region_in_loading_and_in_evaluation(tmp_path):
    from scalekd.eval.metrics import evaluate_detections

    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 5, 10, 10], "ignore": 1}]
    gt = load_coco_json(write_coco(tmp_path, [_IMAGE], anns))
    assert gt["annotations"][1]["iscrowd"] == 1
    perfect = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.9}]
    assert evaluate_detections(gt, perfect)["AP"] == pytest.approx(1.0)  # the ignored one is no missed object
    raw = json.loads((tmp_path / "ann.json").read_text())
    assert evaluate_detections(raw, perfect)["AP"] == pytest.approx(1.0)  # the same without our loader


@pytest.mark.parametrize("line", ["0 nan 0.5 0.1 0.1", "0 0.5 inf 0.1 0.1", "0 0.5 0.5 -inf 0.1"])
def test_yolo_non_finite_coordinates_are_refused_naming_file_and_line(tmp_path, line):
    _write_png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n" + line + "\n")
    (tmp_path / "names").write_text("car\n")
    with pytest.raises(DataError, match=r"a.txt:2: non-finite"):
        convert.convert_yolo(str(tmp_path), str(tmp_path / "names"))


@pytest.mark.parametrize("fields", ["10,10,nan,5,1,4,0,0", "inf,10,5,5,1,4,0,0"])
def test_visdrone_non_finite_boxes_are_refused_naming_file_and_line(fields):
    with pytest.raises(DataError, match=r"v.txt:7: non-finite"):
        convert.parse_visdrone_line(fields, "v.txt", 7)


def test_dataset_writers_never_replace_a_dataset_without_force(tmp_path, capsys):
    from scalekd.cli import main

    out = tmp_path / "syn"
    assert main(["data", "synth", str(out), "--images", "3", "--size", "96"]) == 0
    ann = out / "annotations" / "instances_train.json"
    before = ann.read_bytes()
    assert main(["data", "synth", str(out), "--images", "5", "--seed", "3", "--size", "96"]) == 2
    assert "--force" in capsys.readouterr().err and ann.read_bytes() == before  # nothing lost
    assert main(["data", "synth", str(out), "--images", "5", "--seed", "3", "--size", "96", "--force"]) == 0
    assert ann.read_bytes() != before
    (tmp_path / "afile").write_text("x")
    assert main(["data", "synth", str(tmp_path / "afile"), "--images", "3"]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "x"
    _write_png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "names").write_text("car\n")
    (tmp_path / "old.json").write_text("keep me")
    assert main(["data", "convert", "yolo", str(tmp_path), "--names", str(tmp_path / "names"),
                 "--out", str(tmp_path / "old.json")]) == 2
    assert (tmp_path / "old.json").read_text() == "keep me"


def test_a_16_bit_png_decodes_at_its_bit_depth(tmp_path):
    import numpy as np
    from PIL import Image

    from scalekd.data.coco import decode_image

    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 12), 32768, dtype=np.uint16)).save(path)
    image = decode_image(path.read_bytes(), str(path))
    assert image.shape == (3, 8, 12) and image.mean().item() == pytest.approx(0.5, abs=1e-3)  # was 0.998


def test_exif_orientation_is_applied_to_pixels_and_to_converted_sizes(tmp_path):
    import io as _io

    from PIL import Image

    from scalekd.data.coco import decode_image, oriented_size

    img = Image.new("RGB", (40, 20), (200, 10, 10))
    img.paste((10, 200, 10), (0, 0, 10, 20))  # a green stripe on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: the stripe ends up on top
    buf = _io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    (tmp_path / "r.jpg").write_bytes(buf.getvalue())
    decoded = decode_image(buf.getvalue(), "r.jpg")
    assert decoded.shape == (3, 40, 20)  # height 40, width 20, as displayed
    assert decoded[1, :8].mean() > 0.6 and decoded[1, -8:].mean() < 0.3  # green on top
    with Image.open(tmp_path / "r.jpg") as opened:
        assert oriented_size(opened) == (20, 40)
    (tmp_path / "r.txt").write_text("0 0.5 0.5 0.5 0.25\n")
    (tmp_path / "names").write_text("car\n")
    coco = convert.convert_yolo(str(tmp_path), str(tmp_path / "names"))
    assert (coco["images"][0]["width"], coco["images"][0]["height"]) == (20, 40)
    assert coco["annotations"][0]["bbox"] == pytest.approx([5.0, 15.0, 10.0, 10.0])


def test_yolo_drops_are_reported_and_a_conversion_keeping_nothing_fails(tmp_path):
    _write_png(tmp_path / "a.png")
    (tmp_path / "names").write_text("car\n")
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n0 20 15 8 6\n0 1.5 0.5 0.1 0.1\n")
    coco = convert.convert_yolo(str(tmp_path), str(tmp_path / "names"))
    report = coco["info"]["conversion"]
    assert report["kept"] == 1 and sum(report["dropped"].values()) == 2
    assert any("a.txt:2" in e and "pixels" in e for e in report["examples"])
    (tmp_path / "a.txt").write_text("0 20 15 8 6\n")  # pixel coordinates only: nothing would be kept
    with pytest.raises(DataError, match="no annotations kept .*1 coordinates outside"):
        convert.convert_yolo(str(tmp_path), str(tmp_path / "names"))


def test_the_standard_yolo_layout_images_and_labels_side_by_side(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    _write_png(tmp_path / "images" / "a.png")
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "names").write_text("car\n")
    coco = convert.convert_yolo(str(tmp_path), str(tmp_path / "names"))
    assert [im["file_name"] for im in coco["images"]] == ["a.png"] and len(coco["annotations"]) == 1


def test_visdrone_drops_are_reported(shared_data, tmp_path):
    src = tmp_path / "vd"
    shutil.copytree(shared_data / "visdrone_sample", src)
    first = sorted((src / "annotations").iterdir())[0]
    lines = first.read_text().splitlines()
    first.write_text("\n".join(lines + ["10,10,-5,5,1,4,0,0", "99999,99999,5,5,1,4,0,0"]) + "\n")
    report = convert.convert_visdrone(str(src))["info"]["conversion"]
    assert report["dropped"] == {"non-positive width or height": 1, "outside the image or a sliver after clipping": 1}


def test_yolo_patches_and_visdrone_patches_into_the_source_are_refused(tmp_path, capsys):
    from scalekd.cli import main

    _write_png(tmp_path / "a.png")
    (tmp_path / "names").write_text("car\n")
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    assert main(["data", "convert", "yolo", str(tmp_path), "--names", str(tmp_path / "names"), "--patches", "4",
                 "--out", str(tmp_path / "o.json")]) == 2
    assert "--patches" in capsys.readouterr().err and not (tmp_path / "o.json").exists()
    (tmp_path / "vd" / "images").mkdir(parents=True)
    (tmp_path / "vd" / "annotations").mkdir()
    assert main(["data", "convert", "visdrone", str(tmp_path / "vd"), "--patches", "4",
                 "--out", str(tmp_path / "vd" / "ann.json")]) == 2
    assert "--images-out" in capsys.readouterr().err
    (tmp_path / "patches").mkdir()
    (tmp_path / "patches" / "mine.png").write_bytes(b"keep")
    assert main(["data", "convert", "visdrone", str(tmp_path / "vd"), "--patches", "4", "--images-out",
                 str(tmp_path / "patches"), "--out", str(tmp_path / "ann.json")]) == 2
    assert "--force" in capsys.readouterr().err and (tmp_path / "patches" / "mine.png").read_bytes() == b"keep"


def test_missing_or_non_folder_sources_and_unaccepted_image_types_are_named(tmp_path, capsys):
    from scalekd.cli import main

    (tmp_path / "names").write_text("car\n")
    (tmp_path / "plain.txt").write_text("x")
    for src in (tmp_path / "nowhere", tmp_path / "plain.txt"):
        assert main(["data", "convert", "yolo", str(src), "--names", str(tmp_path / "names"),
                     "--out", str(tmp_path / "o.json")]) == 2
        assert "not a folder" in capsys.readouterr().err
    (tmp_path / "gif").mkdir()
    (tmp_path / "gif" / "a.gif").write_bytes(b"GIF89a")
    assert main(["data", "convert", "yolo", str(tmp_path / "gif"), "--names", str(tmp_path / "names"),
                 "--out", str(tmp_path / "o.json")]) == 2
    assert "accepted: .jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp" in capsys.readouterr().err
    assert main(["data", "convert", "visdrone", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.json")]) == 2
    assert "images/ and annotations/" in capsys.readouterr().err


def test_data_stats_refuses_a_nan_box(tmp_path, capsys):
    from scalekd.cli import main

    path = write_coco(tmp_path, [_IMAGE], [{"id": 1, "image_id": 1, "category_id": 1,
                                             "bbox": [10, 10, float("nan"), 8]}])
    assert main(["data", "stats", path]) == 2
    assert "finite numbers" in capsys.readouterr().err


def test_pipeline_scenes_keep_their_objects_pixel_sizes_at_any_scene_size():
    import numpy as np

    from scalekd.data.synth import render_scene

    def sides(size, object_scale):
        rng = np.random.RandomState(3)
        return [b[2] - b[0] for _ in range(20) for _, b in render_scene(rng, size, object_scale)[1]]

    scaled, kept = sides(128, None), sides(128, 1.0)
    assert np.median(scaled) < 0.7 * np.median(kept)  # by default a 128 px scene shrinks its objects by half
    small = [s for s in kept if s <= 24]
    assert small and min(small) >= 8  # with object_scale=1 the small ones stay 8-24 px, 4-12 at a 64 px student


def test_tiles_cover_a_wide_image_and_clip_boxes_into_each_tile_they_cross(tmp_path):
    import numpy as np
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    pixels = torch.arange(700 * 300 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(300, 700, 3)
    Image.fromarray(pixels.numpy()).save(src / "wide.png")
    coco = {"images": [{"id": 7, "file_name": "wide.png", "width": 700, "height": 300}],
            "categories": [{"id": 1, "name": "car"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 20, 10], "area": 200, "iscrowd": 0},
                # Across the seam of the first two tiles (x 0-320 and 190-510): in both, clipped in the first.
                {"id": 2, "image_id": 7, "category_id": 1, "bbox": [300, 50, 40, 20], "area": 800, "iscrowd": 0},
                {"id": 3, "image_id": 7, "category_id": 1, "bbox": [650, 200, 30, 30], "area": 900, "iscrowd": 1,
                 "ignore": 1}]}
    out = convert.tile_coco(coco, str(src), str(tmp_path / "tiles"), 320)
    assert [(im["width"], im["height"]) for im in out["images"]] == [(320, 300)] * 3
    assert {im["source_image_id"] for im in out["images"]} == {7}
    by_tile = {}
    for ann in out["annotations"]:
        by_tile.setdefault(ann["image_id"], []).append(ann)
    assert [a["bbox"] for a in by_tile[1]] == [[10, 10, 20, 10], [300, 50, 20, 20]]
    assert [a["bbox"] for a in by_tile[2]] == [[110, 50, 40, 20]]
    assert [(a["bbox"], a["iscrowd"], a.get("ignore")) for a in by_tile[3]] == [([270, 200, 30, 30], 1, 1)]
    with Image.open(tmp_path / "tiles" / "wide_t2.png") as tile:  # the last tile is flush with the right edge
        assert torch.equal(torch.from_numpy(np.array(tile)), pixels[:, 380:700])
    with pytest.raises(DataError, match="tile side"):
        convert.tile_coco(coco, str(src), str(tmp_path / "x"), 8)


def test_tiles_are_cut_upright_keep_sub_folders_and_an_unreadable_image_is_named(tmp_path):
    from PIL import Image

    src = tmp_path / "src"
    for folder in ("a", "b"):
        (src / folder).mkdir(parents=True)
    # EXIF orientation 6 (rotate 90 degrees): stored 40 x 100, shown 100 x 40, which is the size we record.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 100), (200, 10, 10)).save(src / "a" / "x.jpg", exif=exif)
    Image.new("RGB", (100, 40), (10, 200, 10)).save(src / "b" / "x.jpg")
    coco = {"images": [{"id": 1, "file_name": "a/x.jpg", "width": 100, "height": 40},
                       {"id": 2, "file_name": "b/x.jpg", "width": 100, "height": 40}],
            "categories": [{"id": 1, "name": "car"}], "annotations": []}
    out = convert.tile_coco(coco, str(src), str(tmp_path / "tiles"), 64)
    assert [im["file_name"] for im in out["images"]] == ["a/x_t0.jpg", "a/x_t1.jpg", "b/x_t0.jpg", "b/x_t1.jpg"]
    for name in ("a/x_t0.jpg", "b/x_t1.jpg"):
        with Image.open(tmp_path / "tiles" / name) as tile:
            assert tile.size == (64, 40)
    (src / "b" / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="x.jpg: cannot read image"):
        convert.tile_coco(coco, str(src), str(tmp_path / "again"), 64)


def test_yolo_conversion_into_tiles_and_bad_tile_requests_are_refused_losing_nothing(tmp_path, capsys):
    from PIL import Image

    from scalekd.cli import main

    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (700, 300)).save(src / "strip.png")
    (src / "strip.txt").write_text("0 0.45 0.5 0.1 0.1\n")  # x 280-350: across the first seam
    (tmp_path / "names").write_text("car\n")
    base = ["data", "convert", "yolo", str(src), "--names", str(tmp_path / "names")]
    assert main([*base, "--tile", "320", "--out", str(tmp_path / "tiles.json")]) == 0
    coco = json.loads((tmp_path / "tiles.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == ["strip_t0.png", "strip_t1.png", "strip_t2.png"]
    assert [a["image_id"] for a in coco["annotations"]] == [1, 2] and coco["info"]["conversion"]["kept"] == 1
    assert (tmp_path / "images" / "strip_t2.png").exists()
    capsys.readouterr()
    for bad, words in ((["--tile", "320", "--images-out", str(src)], "--images-out"),
                       (["--tile", "320", "--patches", "4"], "--tile"),
                       (["--tile", "8", "--images-out", str(tmp_path / "small")], "tile side")):
        assert main([*base, *bad, "--out", str(tmp_path / "bad.json")]) == 2
        assert words in capsys.readouterr().err and not (tmp_path / "bad.json").exists()
    assert sorted(os.listdir(src)) == ["strip.png", "strip.txt"] and not (tmp_path / "small").exists()


def test_holdout_split_gives_the_teacher_and_the_students_disjoint_source_images(tmp_path):
    """benchmarks/quality.py --holdout-teacher: no source image (all its tiles) in both halves, val unchanged."""
    from benchmarks.quality import holdout_roots

    root = tmp_path / "kit"
    (root / "images").mkdir(parents=True)
    images = [{"id": i + 1, "file_name": f"s{i // 3}_t{i % 3}.png", "width": 8, "height": 8,
               "source_image_id": i // 3} for i in range(12)]  # 4 source images, 3 tiles each
    annotations = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [1, 1, 3, 3], "area": 9, "iscrowd": 0}
                   for i in range(12)]
    (root / "annotations").mkdir()
    write_coco(root / "annotations", images, annotations, name="instances_train.json")
    write_coco(root / "annotations", images[:2], annotations[:2], name="instances_val.json")
    teacher, students = holdout_roots(str(root))
    halves = [json.loads((Path(r) / "annotations" / "instances_train.json").read_text()) for r in (teacher, students)]
    sources = [{im["source_image_id"] for im in half["images"]} for half in halves]
    assert len(sources[0]) == len(sources[1]) == 2 and not sources[0] & sources[1]
    assert sorted(im["id"] for half in halves for im in half["images"]) == list(range(1, 13))
    for half in halves:
        ids = {im["id"] for im in half["images"]}
        assert {a["image_id"] for a in half["annotations"]} == ids
    for r in (teacher, students):
        assert (Path(r) / "annotations" / "instances_val.json").read_text() == \
            (root / "annotations" / "instances_val.json").read_text()
        assert os.path.samefile(Path(r) / "images", root / "images")
    assert holdout_roots(str(root)) == (teacher, students)  # a second call reuses the split


def test_teacher_holdout_gives_each_stage_its_share_by_source_image(tmp_path):
    """data.teacher_holdout: the teacher's share and the students' are disjoint by source image, cover every image,
    keep their annotations and every category; an image keeps its role when images are added."""
    from scalekd.data.holdout import image_source, stage_images

    root = tmp_path / "tiles"
    (root / "annotations").mkdir(parents=True)
    images = [{"id": i + 1, "file_name": f"s{i // 3}_t{i % 3}.png", "width": 8, "height": 8,
               "source_image_id": f"photo{i // 3}"} for i in range(120)]  # 40 photographs, 3 tiles each
    images += [{"id": 200 + i, "file_name": f"own{i}.png", "width": 8, "height": 8} for i in range(10)]  # no source
    annotations = [{"id": im["id"], "image_id": im["id"], "category_id": 1 + im["id"] % 2, "bbox": [1, 1, 3, 3],
                    "area": 9, "iscrowd": 0} for im in images]
    write_coco(root / "annotations", images, annotations, name="instances_train.json")
    assert stage_images("teacher", 0.0) is None and stage_images("distill", 0) is None
    shares = {stage: dataset_from_root(str(root), "train", keep=stage_images(stage, 0.5))
              for stage in ("teacher", "warmup", "distill")}
    assert [im["id"] for im in shares["warmup"].images] == [im["id"] for im in shares["distill"].images]
    teacher_ids = {im["id"] for im in shares["teacher"].images}
    student_ids = {im["id"] for im in shares["distill"].images}
    assert not teacher_ids & student_ids and teacher_ids | student_ids == {im["id"] for im in images}
    sources = [{image_source(im) for im in shares[s].images} for s in ("teacher", "distill")]
    assert not sources[0] & sources[1]  # every tile of a photograph on one side
    assert 0.3 < len(sources[0]) / 50 < 0.7  # about half of the 50 sources (a fixed hash: the same every run)
    for dataset in shares.values():
        assert {a["image_id"] for a in dataset.data["annotations"]} == {im["id"] for im in dataset.images}
        assert dataset.num_classes == 2 and dataset.counts.objects == len(dataset.images)
    grown = images + [{"id": 500 + i, "file_name": f"new{i}.png", "width": 8, "height": 8} for i in range(30)]
    keep = stage_images("teacher", 0.5)
    assert {im["id"] for im in grown if keep(im)} & {im["id"] for im in images} == teacher_ids


def test_data_stats_shows_what_teacher_holdout_gives_each_role(synth_root, tmp_path, capsys):
    from scalekd.cli import main
    from scalekd.data.holdout import in_teacher_share

    ann = f"{synth_root}/annotations/instances_train.json"
    images = load_coco_json(ann)["images"]
    teacher = sum(in_teacher_share(im["id"], 0.5) for im in images)
    out_json = str(tmp_path / "stats.json")
    args = ["data", "stats", ann, "--preset", "tiny", "--set", "data.teacher_holdout=0.5", "--json", out_json]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"teacher  {teacher} images" in out and f"students {len(images) - teacher} images" in out
    held = json.loads(open(out_json).read())["teacher_holdout"]
    assert held["teacher"]["images"] + held["students"]["images"] == len(images)
    assert held["teacher"]["objects"] + held["students"]["objects"] == stats.dataset_stats(ann)["annotations"]
    assert main(["data", "stats", ann, "--preset", "tiny"]) == 0
    assert "teacher_holdout" not in capsys.readouterr().out  # off: not reported


_IMAGE = {"id": 1, "file_name": "a.png", "width": 64, "height": 48}
_BOX = {"id": 9, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "iscrowd": 0}


@pytest.mark.parametrize("image, ann, words", [
    ({}, {"iscrowd": "0"}, "has iscrowd '0'; expected true, false, 0 or 1"),
    ({}, {"iscrowd": 2}, "has iscrowd 2"),
    ({}, {"ignore": "yes"}, "has ignore 'yes'"),
    ({"id": "1"}, {"image_id": "1"}, "images\\[0\\] has id '1'; expected an integer"),
    ({}, {"image_id": [1]}, "has image_id \\[1\\]; expected an integer"),
    ({}, {"category_id": 1.0}, "has category_id 1.0; expected an integer"),
    ({}, {"id": "nine"}, "annotations\\[0\\] has id 'nine'"),
    ({}, {"id": True}, "annotations\\[0\\] has id True"),
    ({}, {"area": -1}, "has area -1"),
    ({}, {"bbox": [10**400, 0, 1, 1]}, "has bbox"),
    ({}, {"bbox": [1, 2, "3", 4]}, "has bbox"),
    ({"file_name": ""}, {}, "has file_name ''"),
    ({"width": "64"}, {}, "has width '64'"),
])
def test_every_coco_field_is_typed_at_load(tmp_path, image, ann, words):
    path = write_coco(tmp_path, [{**_IMAGE, **image}], [{**_BOX, **ann}])
    with pytest.raises(DataError, match=words) as err:
        load_coco_json(path)
    assert "ann.json" in str(err.value)


def test_a_category_without_an_integer_id_is_refused(tmp_path):
    path = write_coco(tmp_path, [_IMAGE], [_BOX], categories=[{"name": "car"}])
    with pytest.raises(DataError, match="categories\\[0\\] has id None; expected an integer"):
        load_coco_json(path)


def test_boxes_no_reader_can_use_are_dropped_once_for_training_stats_and_evaluation(tmp_path):
    from scalekd.data.stats import dataset_stats
    from scalekd.eval.metrics import evaluate_detections

    good = [[4, 4, 10, 10], [30, 20, 8, 8]]
    boxes = [*good, [30, 30, -10, -10], [5, 5, 0, 4], [70, 10, 5, 5], [-20, 10, 5, 5]]
    anns = [{**_BOX, "id": i + 1, "bbox": b, "iscrowd": False} for i, b in enumerate(boxes)]
    path = write_coco(tmp_path, [_IMAGE], anns)
    data = load_coco_json(path)
    assert [a["bbox"] for a in data["annotations"]] == good
    assert data["info"]["dropped_at_load"] == {"zero or negative size": 2, "outside its image": 2}
    assert dataset_stats(path)["annotations"] == 2 and dataset_stats(path)["degenerate_dropped"] == 4
    perfect = [{"image_id": 1, "category_id": 1, "bbox": b, "score": 0.9} for b in good]
    assert evaluate_detections(data, perfect)["AP"] == pytest.approx(1.0)  # no dropped box counts as missed


@pytest.mark.parametrize("bbox, words", [([1, 1, -2, 3], "negative width or height"),
                                         ([10**400, 1, 2, 3], "all finite numbers")])
def test_detections_are_typed_as_the_ground_truth_is(tmp_path, bbox, words):
    from scalekd.eval.metrics import evaluate_detections

    data = load_coco_json(write_coco(tmp_path, [_IMAGE], [_BOX]))
    with pytest.raises(DataError, match=words):
        evaluate_detections(data, [{"image_id": 1, "category_id": 1, "bbox": bbox, "score": 0.5}])


@pytest.mark.parametrize("kind", ["fifo", "folder", "utf16", "latin1"])
@pytest.mark.parametrize("which", ["label", "names"])
def test_a_label_or_names_file_that_is_not_a_regular_utf8_file_is_named(tmp_path, kind, which):
    """Every local read goes through one check: a FIFO would block the conversion for ever, a folder or another
    encoding used to fail with a message that named no file."""
    _write_png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "names").write_text("car\n")
    target = tmp_path / ("a.txt" if which == "label" else "names")
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
    else:
        text = "0 0.5 0.5 0.1 0.1 # vélo\n" if which == "label" else "vélo\n"
        target.write_bytes(text.encode("utf-16" if kind == "utf16" else "latin-1"))
    expected = {"fifo": "is a named pipe \\(FIFO\\), not a regular file", "folder": "is a folder, not a regular file",
                "utf16": "not UTF-8 text \\(it looks like UTF-16\\)", "latin1": "not UTF-8 text: byte"}[kind]
    with pytest.raises(storage.StorageError, match=f"{target.name}: {expected}"):
        convert.convert_yolo(str(tmp_path), str(tmp_path / "names"))


def test_a_byte_order_mark_is_not_part_of_the_first_class_name(tmp_path):
    _write_png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "names").write_bytes("car\n".encode("utf-8-sig"))
    assert convert.convert_yolo(str(tmp_path), str(tmp_path / "names"))["categories"][0]["name"] == "car"


def test_visdrone_rows_the_toolkit_ignores_score_0_become_ignore_regions():
    assert convert.parse_visdrone_line("10,10,5,5,0,4,0,0", "v.txt", 1) == ([10.0, 10.0, 5.0, 5.0], 4, False)
    assert convert.parse_visdrone_line("10,10,5,5,1,4,0,0", "v.txt", 1)[2] is True
    with pytest.raises(DataError, match="v.txt:3: score 7"):
        convert.parse_visdrone_line("10,10,5,5,7,4,0,0", "v.txt", 3)


def test_latest_is_the_newest_in_natural_order_and_every_data_flag_resolves_it(tmp_path, synth_root):
    import argparse

    from scalekd.cli import _resolve_data, build_parser
    from scalekd.data.coco import resolve_root

    for day in ("2026-9-30", "2026-10-01", "2026-10-1-fix"):
        shutil.copytree(synth_root, tmp_path / "drops" / day, ignore=shutil.ignore_patterns("images"))
    assert resolve_root(str(tmp_path / "drops" / "latest")).endswith("2026-10-1-fix")
    shutil.rmtree(tmp_path / "drops" / "2026-10-1-fix")
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    with_data = [name for name, sub in commands.items() if any("--data" in a.option_strings for a in sub._actions)]
    assert {"train-teacher", "warmup", "distill", "evaluate", "report", "export", "compare", "tune"} <= set(with_data)
    args = argparse.Namespace(data=str(tmp_path / "drops" / "latest"))
    _resolve_data(args)
    assert args.data == str(tmp_path / "drops" / "2026-10-01")


@pytest.mark.parametrize("name", ["../../outside/x.png", "/etc/passwd", "a/../../x.png", "..\\x.png", "a\0.png"])
def test_an_image_path_that_leaves_images_is_refused(tmp_path, name):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": name, "width": 9, "height": 9}],
                                "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    with pytest.raises(DataError, match=r"images\[0\].*file_name"):
        load_coco_json(str(path))


@pytest.mark.parametrize("high, expected", [(1.0, 0.5), (255.0, 0.5), (1000.0, None)])
def test_a_float_image_is_scaled_by_its_range_or_refused(high, expected):
    import io

    import numpy as np
    from PIL import Image

    from scalekd.data.coco import decode_image

    pixels = np.full((6, 8), high / 2, dtype=np.float32)
    pixels[0, 0] = high
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="F").save(buffer, format="TIFF")
    if expected is None:
        with pytest.raises(DataError, match=r"x.tif: a 32-bit float image with values in \[500, 1000\]"):
            decode_image(buffer.getvalue(), "x.tif")
        return
    image = decode_image(buffer.getvalue(), "x.tif")
    assert image.shape == (3, 6, 8) and image[0, 1, 1].item() == pytest.approx(expected)


def test_a_training_split_without_objects_is_refused(tmp_path, synth_root):
    from scalekd.config import load_config
    from scalekd.train.stage import StageRequest, training_images

    shutil.copytree(synth_root, tmp_path / "d", ignore=shutil.ignore_patterns("images"))
    path = tmp_path / "d" / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    path.write_text(json.dumps({**coco, "annotations": [{**a, "iscrowd": 1} for a in coco["annotations"]]}))
    cfg = load_config(preset="tiny", overrides=[f"data.root={tmp_path / 'd'}"])
    with pytest.raises(DataError, match="holds no objects"):
        training_images(StageRequest("teacher", cfg.to_dict(), str(tmp_path / "d"), str(tmp_path / "o")), cfg)


def _ultralytics(root, splits=("train", "val")):
    for split in splits:
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for stem in ("a", "b"):
            _write_png(root / "images" / split / f"{split}_{stem}.png")
            (root / "labels" / split / f"{split}_{stem}.txt").write_text("0 0.5 0.5 0.2 0.2\n")


def test_the_ultralytics_split_layout_converts_one_split_at_a_time_or_is_refused_by_name(tmp_path):
    _ultralytics(tmp_path / "set")
    (tmp_path / "names").write_text("car\n")
    with pytest.raises(DataError, match=r"one folder per split under images/ \(train, val\).*--split NAME"):
        convert.convert_yolo(str(tmp_path / "set"), str(tmp_path / "names"))
    for split in ("train", "val"):
        coco = convert.convert_yolo(str(tmp_path / "set"), str(tmp_path / "names"), split=split)
        assert [im["file_name"] for im in coco["images"]] == [f"{split}_a.png", f"{split}_b.png"]
        assert len(coco["annotations"]) == 2
        assert coco["info"]["conversion"]["not_converted"] == {
            "outside the folders converted (another split: --split NAME; or not part of the layout)": 4}
    with pytest.raises(DataError, match="--split test: .* holds the splits train, val"):
        convert.convert_yolo(str(tmp_path / "set"), str(tmp_path / "names"), split="test")


def test_every_source_file_is_in_the_output_or_in_the_report(tmp_path):
    """The rule behind each case: a file under the source is converted, or reported with its reason."""
    _write_png(tmp_path / "a.png")
    (tmp_path / "a.TXT").write_text("0 0.5 0.5 0.2 0.2\n")  # upper-case suffix: still a.png's label
    (tmp_path / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "c.gif").write_bytes(b"GIF89a")
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "sub").mkdir()
    _write_png(tmp_path / "sub" / "d.png")
    (tmp_path / "names").write_text("car\n")
    coco = convert.convert_yolo(str(tmp_path), str(tmp_path / "names"))
    assert len(coco["annotations"]) == 1
    report = coco["info"]["conversion"]["not_converted"]
    assert report == {"a label without an image": 1,
                      "not an image type we read (.gif; accepted: .jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp)": 1,
                      "not an image type we read (.md; accepted: .jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp)": 1,
                      "outside the folders converted (another split: --split NAME; or not part of the layout)": 1}
    converted = len(coco["images"]) + 2  # the image's label and the names file
    assert converted + sum(report.values()) == sum(1 for p in tmp_path.rglob("*") if p.is_file())


def test_one_label_for_two_images_is_refused(tmp_path):
    _write_png(tmp_path / "a.png")
    _write_png(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "names").write_text("car\n")
    with pytest.raises(DataError, match=r"a.txt: one label for 2 images \(a.jpg, a.png\)"):
        convert.convert_yolo(str(tmp_path), str(tmp_path / "names"))


def test_a_visdrone_image_without_its_annotation_file_is_reported(shared_data, tmp_path):
    src = tmp_path / "vd"
    shutil.copytree(shared_data / "visdrone_sample", src)
    image = sorted((src / "images").iterdir())[0]
    shutil.copy(image, src / "images" / ("unlabelled" + image.suffix))
    report = convert.convert_visdrone(str(src))["info"]["conversion"]
    assert report["not_converted"]["an image without its annotation file"] == 1
    assert report["not_converted_examples"][-1].startswith(str(src / "images" / "unlabelled"))


@pytest.mark.parametrize("args, words", [(["--size", "60000"], "--size 60000: a scene side from 64 to 4096 px"),
                                         (["--size", "32"], "--size 32"), (["--seed", "-1"], "--seed -1: an integer"),
                                         (["--images", "1"], "--images 1")])
def test_synth_refuses_sizes_and_seeds_it_cannot_draw_before_writing(tmp_path, capsys, args, words):
    from scalekd.cli import main

    assert main(["data", "synth", str(tmp_path / "s"), *args]) == 2
    assert words in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_an_image_that_claims_40000_by_40000_pixels_is_refused_by_name(tmp_path):
    """A PNG header claiming 1.6 G pixels: PIL's decompression-bomb guard, reported as one named line."""
    import struct
    import zlib

    from scalekd.data.coco import decode_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(png)
    (tmp_path / "bomb.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "names").write_text("car\n")
    with pytest.raises(DataError, match="bomb.png: .*decompression bomb"):
        decode_image(png, "bomb.png")
    with pytest.raises(DataError, match="bomb.png: .*decompression bomb"):
        convert.convert_yolo(str(tmp_path), str(tmp_path / "names"))

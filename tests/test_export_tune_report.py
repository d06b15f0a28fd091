"""Export parity on a tiny model, a tiny Ray Tune search, and the evaluation report with pictures."""

import glob
import json
import os
import shutil

import pytest
import torch

from scalekd.config import ConfigError, replace
from scalekd.export import ExportError, compare, export_model
from scalekd.train import checkpoint as ckpt
from scalekd.train.stage import StageRequest, run_stage
from scalekd.tune import TuneSpace, distill_overrides, results_table, rung_stops, run_tune


# Under pytest-xdist (`make test`): one worker trains the module's teacher and warm student once.
pytestmark = pytest.mark.xdist_group("trained")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_root):
    """Teacher and warm student after a few iterations (tiny preset)."""
    from scalekd.config import load_config

    cfg = load_config(preset="tiny", overrides=[f"data.root={synth_root}"])
    root = tmp_path_factory.mktemp("trained")
    for stage in ("teacher", "warmup"):
        run_stage(StageRequest(stage, cfg.to_dict(), synth_root, str(root / stage)))
    return cfg, root


def _spread_scores(uri: str, out: str) -> str:
    """The same model with a classifier whose scores are spread out, so parity compares real detections."""
    model, blob = ckpt.load_model(uri)
    torch.manual_seed(0)
    with torch.no_grad():
        for conv in model.head.classification_head.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.normal_(0, 0.1)
                conv.bias.zero_()
    return ckpt.save_model(model, ckpt.DetectorSpec(**blob["spec"]), out, blob["categories"], {"stage": "warmup"})


@pytest.mark.filterwarnings("error::UserWarning", "error::torch.jit.TracerWarning")  # known noise is silenced
def test_export_parity_torchscript_and_onnx(trained, tmp_path, synth_root):
    _cfg, root = trained
    model_uri = _spread_scores(str(root / "warmup" / "model.pt"), str(tmp_path / "spread"))
    card = export_model(model_uri, str(tmp_path / "export"), synth_root, images=3)
    assert sorted(os.listdir(tmp_path / "export")) == ["manifest.json", "model.onnx", "model.torchscript.pt",
                                                       "model_card.json"]
    parity = card["parity"]
    assert parity["detections_compared"] > 20
    assert parity["onnx_max_box_diff"] <= 0.05 and parity["torchscript_max_box_diff"] <= 0.05
    assert len(card["dataset"]["annotations_sha256"]) == 64 and card["versions"]["torch"].startswith("2.13")
    scripted = torch.jit.load(str(tmp_path / "export" / "model.torchscript.pt"))
    assert scripted is not None


def test_export_parity_of_an_fcos_p2_student(tiny_cfg, tmp_path, synth_root):
    """The demo and bench presets' student (FCOS, P2-P6): its post-processing differs from RetinaNet's
    (centre-ness times class score), so both exported formats are checked against eager on it too."""
    from scalekd.data.synth import CLASSES
    from scalekd.models.detectors import build_detector
    from scalekd.geometry import student_spec

    cfg = replace(tiny_cfg, model={"detector": "fcos", "student_min_level": 2, "fpn_channels": 64})
    spec = student_spec(cfg, len(CLASSES))
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    fresh = ckpt.save_model(build_detector(spec), spec, str(tmp_path / "fresh"), categories, {"stage": "warmup"})
    card = export_model(_spread_scores(fresh, str(tmp_path / "spread")), str(tmp_path / "export"), synth_root,
                        images=3)
    parity = card["parity"]
    assert parity["detections_compared"] > 20
    assert parity["onnx_max_box_diff"] <= 0.05 and parity["torchscript_max_box_diff"] <= 0.05


def test_parity_mismatch_fails_loudly():
    ref = {"boxes": [[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 3, 3]], "scores": [0.9, 0.5, 0.2], "labels": [1, 2, 1]}
    assert compare(ref, ref)["ok"] and compare(ref, ref)["count_compared"] == 2
    reordered = {k: v[::-1] for k, v in ref.items()}
    assert compare(ref, reordered)["ok"]
    assert not compare(ref, {**ref, "boxes": [[0, 0, 10, 10], [5, 5, 21, 20], [1, 1, 3, 3]]})["ok"]
    assert not compare(ref, {**ref, "scores": [0.9, 0.4, 0.2]})["ok"]
    assert not compare(ref, {**ref, "labels": [1, 1, 1]})["ok"]
    assert not compare(ref, {k: v[:2] for k, v in ref.items()})["ok"]


def test_export_refuses_a_non_model_file(tmp_path, synth_root):
    bad = tmp_path / "bad.pt"
    ckpt.save({"format": "something-else"}, str(bad))
    with pytest.raises(ckpt.CheckpointError, match="not a scalekd model file"):
        export_model(str(bad), str(tmp_path / "out"), synth_root)
    assert not (tmp_path / "out").exists()
    assert ExportError


def test_tiny_tune_search_writes_a_usable_best_config(trained, tmp_path, synth_root):
    cfg, root = trained
    out = str(tmp_path / "tune")
    space = TuneSpace(TuneSpace.around_paper(cfg).ranges, {"teacher_anchor": (0.0, 2.0)})
    best = run_tune(cfg, str(root / "teacher" / "model.pt"), str(root / "warmup" / "model.pt"), synth_root, out,
                    space, trials=2, rungs=2)
    assert best["trials"] == 2
    from scalekd.config import load_config

    tuned = load_config(os.path.join(out, "best.yaml"))
    assert tuned.distill.alpha == pytest.approx(best["best"]["alpha"])
    assert tuned.distill.csa.teacher_anchor == best["best"]["teacher_anchor"] in (0.0, 2.0)
    lo, hi = space.ranges["alpha"]
    assert lo <= tuned.distill.alpha <= hi
    rows = json.load(open(os.path.join(out, "results.json")))
    assert rows["metric"] == "AP_S"
    assert all(r["teacher_anchor"] in (0.0, 2.0) for r in rows["trials"])
    assert max(r["iteration"] for r in rows["trials"]) == cfg.train.distill_iterations  # the student's, all of them
    assert open(os.path.join(out, "results.md")).readline().startswith("| alpha | beta | gamma | teacher_anchor |")
    marker = str(tmp_path / "pwned")
    for experiment in glob.glob(os.path.join(out, "experiment", "*")):
        _planted_pickle(experiment, marker)
    again = run_tune(cfg, str(root / "teacher" / "model.pt"), str(root / "warmup" / "model.pt"), synth_root, out,
                     space, trials=2, rungs=2, resume=True)  # every trial ended: read from the record, nothing run
    assert not os.path.exists(marker)
    trial = lambda row: tuple(row[n] for n in space.names)
    assert sorted(map(trial, again["table"])) == sorted(map(trial, best["table"])) and again["AP_S"] == best["AP_S"]


def test_tune_rungs_split_the_students_iterations_after_the_assistants_warmup(tiny_cfg):
    cfg = replace(tiny_cfg, train={"distill_iterations": 300}, distill={"csa": {"warmup_iterations": 200}})
    assert rung_stops(cfg, 2) == [(350, 150), (500, 300)]
    assert rung_stops(replace(cfg, distill={"method": "fitnet"}), 3) == [(100, 100), (200, 200), (300, 300)]


@pytest.mark.parametrize("text, words", [
    ("alpha=0.1:0.01", "0 < low < high"), ("alpha=-1:2", "0 < low < high"), ("alpha=0.1:inf", "0 < low < high"),
    ("alpha=nan:1", "0 < low < high"), ("delta=0.1:1", "entries look like"), ("alpha=0.1", "entries look like"),
    ("alpha=a:b", "numbers"), ("teacher_anchor=a|b", "numbers"), ("teacher_anchor=1|", "numbers"),
    ("teacher_anchor=-1|5", "finite values >= 0"), ("teacher_anchor=nan|5", "finite values >= 0"),
    ("teacher_anchor=inf|5", "finite values >= 0"), ("teacher_anchor=5|5", "two or more"),
    ("alpha=0.1:1,alpha=0.2:2", "each name once"), ("alpha=0.1:1,alpha=1|2", "each name once"), ("", "at least one"),
])
def test_invalid_search_space_is_rejected(text, words):
    with pytest.raises(ConfigError, match=words):
        TuneSpace.parse(text)


def test_a_search_space_parses_ranges_and_choices_into_the_configs_own_fields(tiny_cfg):
    space = TuneSpace.parse("alpha=0.01:1, teacher_anchor=0|5")
    assert space.ranges == {"alpha": (0.01, 1.0)} and space.choices == {"teacher_anchor": (0.0, 5.0)}
    assert space.names == ("alpha", "teacher_anchor")
    tuned = replace(tiny_cfg, distill=distill_overrides({"alpha": 0.5, "teacher_anchor": 5.0, "other": 1}))
    assert (tuned.distill.alpha, tuned.distill.csa.teacher_anchor) == (0.5, 5.0)
    assert results_table([{"alpha": 0.5, "teacher_anchor": None, "AP_S": 0.25, "AP": 0.1, "iteration": 4}],
                         "AP_S", space.names).splitlines()[-1] == "| 0.5 | - | 25.00 | 10.00 | 4 |"


def test_a_search_space_the_config_refuses_fails_before_any_trial(tiny_cfg):
    """The teacher anchor has no teacher to anchor to in the no-teacher control: refused by the config's own rule."""
    control = replace(tiny_cfg, distill={"csa": {"keys_from": "student"}})
    space = TuneSpace.parse("teacher_anchor=0|5")
    space.validate(tiny_cfg)
    with pytest.raises(ConfigError, match="distill.csa.teacher_anchor"):
        space.validate(control)
    with pytest.raises(ConfigError, match="distill.csa.teacher_anchor"):
        run_tune(control, "t.pt", "s.pt", "data", "out", space)
    cross_head = TuneSpace.parse("cross_head_weight=0|1")
    assert replace(tiny_cfg, distill=distill_overrides({"cross_head_weight": 1.0})).distill.cross_head_weight == 1.0
    cross_head.validate(tiny_cfg)
    with pytest.raises(ConfigError, match="distill.cross_head_weight"):
        cross_head.validate(control)


def test_report_has_table_charts_and_drawn_examples(trained, tmp_path, synth_root):
    from scalekd.data.coco import dataset_from_root
    from scalekd.eval.evaluate import evaluate_models
    from scalekd.eval.report import write_report

    cfg, root = trained
    results = evaluate_models({"teacher": str(root / "teacher" / "model.pt"),
                               "student": str(root / "warmup" / "model.pt")}, synth_root, cfg)
    assert results[0].input_size == 2 * results[1].input_size
    assert results[0].parameters > results[1].parameters and results[1].images_per_s > 0
    paths = write_report(results, dataset_from_root(synth_root, "val"), str(tmp_path / "report"))
    from PIL import Image

    for name in ("ap_by_size.png", "pr_curves.png", "examples.png"):
        with Image.open(paths[name]) as img:
            assert img.width > 200 and img.height > 100
    text = open(paths["report.md"]).read()
    assert "| teacher |" in text and "| student |" in text and "AP_S" in text
    metrics = json.load(open(paths["metrics.json"]))["models"]
    assert [m["model"] for m in metrics] == ["teacher", "student"]
    wrong = replace(cfg, model={"detector": "fcos"})
    assert wrong.model.detector == "fcos"


def test_a_model_is_not_evaluated_on_a_dataset_with_other_categories(trained, tmp_path, synth_root):
    from scalekd.data.coco import DataError, dataset_from_root
    from scalekd.eval.evaluate import evaluate_model

    cfg, root = trained
    ann = json.loads(open(f"{synth_root}/annotations/instances_val.json").read())
    ann["categories"] = [{**c, "name": c["name"] + "_other"} for c in ann["categories"]]  # same ids, other classes
    other = tmp_path / "other"
    (other / "annotations").mkdir(parents=True)
    (other / "annotations" / "instances_val.json").write_text(json.dumps(ann))
    os.symlink(f"{synth_root}/images", other / "images")
    with pytest.raises(DataError, match="trained on categories") as err:
        evaluate_model("m", str(root / "warmup" / "model.pt"), dataset_from_root(str(other), "val"), cfg)
    assert "disc_other" in str(err.value) and "'disc'" in str(err.value)


def test_distill_refuses_a_teacher_or_student_trained_on_other_classes(trained, tmp_path, synth_root):
    """The same ids under other names: distilling would stamp the dataset's names on a student that learnt others."""
    from scalekd.data.coco import DataError

    cfg, root = trained
    other = tmp_path / "other"
    shutil.copytree(synth_root, other, ignore=shutil.ignore_patterns("images"))
    os.symlink(f"{synth_root}/images", other / "images")
    for split in ("train", "val"):
        path = other / "annotations" / f"instances_{split}.json"
        ann = json.loads(path.read_text())
        path.write_text(json.dumps({**ann, "categories": [{**c, "name": c["name"] + "_other"}
                                                          for c in ann["categories"]]}))
    renamed = {}
    for stage in ("teacher", "warmup"):  # the same weights, stamped with the other dataset's names
        model, blob = ckpt.load_model(str(root / stage / "model.pt"))
        categories = [{**c, "name": c["name"] + "_other"} for c in blob["categories"]]
        renamed[stage] = ckpt.save_model(model, ckpt.DetectorSpec(**blob["spec"]), str(tmp_path / stage),
                                         categories, {"stage": stage})
    for teacher, student, wrong in ((renamed["teacher"], str(root / "warmup" / "model.pt"), "warmup"),
                                    (str(root / "teacher" / "model.pt"), renamed["warmup"], "teacher")):
        request = StageRequest("distill", replace(cfg, data={"root": str(other)}).to_dict(), str(other),
                               str(tmp_path / "d"), teacher=teacher, student_init=student)
        with pytest.raises(DataError, match=f"{wrong}/model.pt was trained on categories .* distill with it"):
            run_stage(request)
    assert not (tmp_path / "d" / "model.pt").exists()


@pytest.mark.parametrize("metrics, images, words", [
    ("missing.json", 4, "missing.json"), ("bad.json", 4, "not valid JSON"), (None, 0, "--images 0"),
])
def test_export_checks_every_argument_before_writing_anything(trained, tmp_path, synth_root, capsys, metrics,
                                                              images, words):
    from scalekd.cli import main

    _cfg, root = trained
    (tmp_path / "bad.json").write_text("{not json")
    args = ["export", "--model", str(root / "warmup" / "model.pt"), "--data", synth_root,
            "--out", str(tmp_path / "out"), "--images", str(images)]
    if metrics:
        args += ["--metrics", str(tmp_path / metrics)]
    assert main(args) == 2
    assert words in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["S3://bucket/export", "s4://bucket/export", " s3://bucket/export"])
def test_export_refuses_a_malformed_out_uri_before_exporting(synth_root, capsys, out):
    from scalekd.cli import main

    assert main(["export", "--model", "never-read.pt", "--data", synth_root, "--out", out]) == 2
    assert "use s3://bucket/key or a local path" in capsys.readouterr().err


def _planted_pickle(folder: str, marker: str) -> None:
    """A tuner.pkl in ``folder`` that would create ``marker`` when unpickled."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (marker, "w"))

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tuner.pkl"), "wb") as f:
        pickle.dump(Payload(), f)


def test_a_search_found_in_the_output_is_refused_or_resumed_from_json_never_unpickled(tiny_cfg, tmp_path):
    from scalekd import search_record
    from scalekd.tune import TuneRequest

    space = TuneSpace.around_paper(tiny_cfg)
    out = str(tmp_path / "shared")
    marker = os.path.join(out, "pwned")
    _planted_pickle(os.path.join(out, "experiment", "scalekd-tune"), marker)
    with pytest.raises(ConfigError, match="no search to resume"):
        run_tune(tiny_cfg, "t.pt", "s.pt", "data", out, space, resume=True)
    request = TuneRequest(tiny_cfg.to_dict(), "t.pt", "s.pt", "data", out, dict(space.ranges), {}, trials=2)
    plan = search_record.start_or_resume(request, seed=0)
    assert len(plan) == 2 and all(space.ranges[n][0] <= v <= space.ranges[n][1] for p in plan for n, v in p.items())
    with pytest.raises(ConfigError, match="already holds a search.*--resume"):
        run_tune(tiny_cfg, "t.pt", "s.pt", "data", out, space, trials=2)
    narrower = TuneSpace({"alpha": (0.01, 0.02)})
    with pytest.raises(ConfigError, match="differs in ranges"):
        run_tune(tiny_cfg, "t.pt", "s.pt", "data", out, narrower, trials=2, resume=True)
    with pytest.raises(ConfigError, match="differs in teacher, trials"):
        run_tune(tiny_cfg, "other.pt", "s.pt", "data", out, space, trials=3, resume=True)
    assert not os.path.exists(marker)


def _cli_tune(args: list[str], env: dict, timeout: int = 600):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "scalekd.cli", "tune", "--preset", "tiny", *args],
                          env={**os.environ, "SCALEKD_NO_PROGRESS": "1", **env}, capture_output=True, text=True,
                          timeout=timeout)


def test_a_search_in_s3_resumes_on_another_machine_from_its_record(trained, s3_server, tmp_path, synth_root):
    """A search whose second trial was cut short after its first rung is resumed from another machine (another
    local cache): the ended trial is kept as it was, the other continues from its rung record and checkpoint."""
    cfg, root = trained
    bucket, client = s3_server["bucket"], s3_server["client"]
    env = {"AWS_ENDPOINT_URL": s3_server["endpoint"], "AWS_ACCESS_KEY_ID": s3_server["key"],
           "AWS_SECRET_ACCESS_KEY": s3_server["secret"], "AWS_DEFAULT_REGION": "us-east-1"}
    args = ["--data", synth_root, "--teacher", str(root / "teacher" / "model.pt"), "--student",
            str(root / "warmup" / "model.pt"), "--out", f"s3://{bucket}/tune-resume", "--trials", "2", "--rungs", "2"]
    done = _cli_tune(args, {**env, "SCALEKD_CACHE_DIR": str(tmp_path / "machine-a")})
    assert done.returncode == 0, done.stderr[-3000:]
    cut = "tune-resume/trials/trial-001/"
    for name in ("ended.json", "rungs/2.json", "summary.json", "model.pt"):  # as if the search died mid-rung 2
        client.delete_object(Bucket=bucket, Key=cut + name)
    elsewhere = {**env, "SCALEKD_CACHE_DIR": str(tmp_path / "machine-b")}
    refused = _cli_tune(args, elsewhere)
    assert refused.returncode == 2 and "already holds a search" in refused.stderr, refused.stderr[-2000:]
    done = _cli_tune([*args, "--resume"], elsewhere)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(client.get_object(Bucket=bucket, Key="tune-resume/results.json")["Body"].read())
    trials = {t["trial"]: t for t in results["trials"]}
    assert sorted(trials) == [0, 1]
    assert all(t["iteration"] == cfg.train.distill_iterations for t in trials.values()), trials
    assert (trials[0]["attempts"], trials[0]["restored_after_rung"]) == (1, 0)  # kept, not run again
    assert (trials[1]["attempts"], trials[1]["restored_after_rung"]) == (2, 1), trials[1]


def test_a_trial_trains_on_ray_train_workers_with_workers(trained, tmp_path, synth_root):
    """``--workers 2``: each trial drives a TorchTrainer of two workers (one CPU each) and evaluates its model."""
    cfg, root = trained
    out = tmp_path / "tune"
    done = _cli_tune(["--data", synth_root, "--teacher", str(root / "teacher" / "model.pt"), "--student",
                      str(root / "warmup" / "model.pt"), "--out", str(out), "--trials", "1", "--rungs", "1",
                      "--workers", "2"], {})
    assert done.returncode == 0, done.stderr[-3000:]
    trial = json.load(open(out / "results.json"))["trials"][0]
    assert trial["iteration"] == cfg.train.distill_iterations
    assert json.load(open(out / "trials" / "trial-000" / "summary.json"))["workers"] == 2
    assert (out / "trials" / "trial-000" / "ray_result.json").exists()  # Ray Train ran the stage


def test_a_trial_whose_worker_dies_is_restarted_from_its_last_rung_and_the_search_completes(trained, tmp_path,
                                                                                          synth_root):
    """Every trial's worker process dies once, part way through its second rung (the tests' fault injection, as a
    lost node or a preempted pod would): Tune restarts it from its rung checkpoint, its stage resumes from its own
    checkpoint, and every trial reports all its rungs."""
    import subprocess
    import sys

    cfg, root = trained
    out = str(tmp_path / "tune")
    env = {**os.environ, "SCALEKD_FAULT_AT_ITERATION": "5", "SCALEKD_NO_PROGRESS": "1"}  # rung 2 ends at 6
    done = subprocess.run([sys.executable, "-m", "scalekd.cli", "tune", "--preset", "tiny", "--data", synth_root,
                           "--teacher", str(root / "teacher" / "model.pt"), "--student",
                           str(root / "warmup" / "model.pt"), "--out", out, "--trials", "2", "--rungs", "2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = json.load(open(os.path.join(out, "results.json")))["trials"]
    assert len(trials) == 2
    assert all(t["iteration"] == cfg.train.distill_iterations and t["restored_after_rung"] == 1 for t in trials)
    assert all(t["attempts"] == 2 for t in trials), trials  # the first run and the restarted one
    for trial_dir in glob.glob(os.path.join(out, "trials", "*")):
        assert os.path.exists(os.path.join(trial_dir, ".fault-injected"))  # each died once
        assert json.load(open(os.path.join(trial_dir, "summary.json")))["resumed_from"] > 0


def test_a_trial_larger_than_this_machine_is_refused_naming_the_flag():
    from scalekd.config import ConfigError
    from scalekd.tune import _check_trial_fits

    _check_trial_fits(2, False, {"CPU": 2.0})
    with pytest.raises(ConfigError, match="--cpus-per-trial.*2 CPUs, 0 GPUs"):
        _check_trial_fits(4, False, {"CPU": 2.0})
    with pytest.raises(ConfigError, match="--gpu"):
        _check_trial_fits(1, True, {"CPU": 2.0})


@pytest.mark.parametrize("record", ["{", "[]", '{"version": 1}', '{"version": 1, "identity": {}, "trials": []}',
                                    "RECORD_WITH_A_BAD_TRIAL", "RECORD_WITH_A_MISSING_TRIAL"])
def test_a_damaged_search_record_is_refused_by_name_on_resume(tiny_cfg, tmp_path, record):
    from scalekd import search_record
    from scalekd.tune import TuneRequest

    space = TuneSpace.around_paper(tiny_cfg)
    out = str(tmp_path / "search")
    search_record.start_or_resume(TuneRequest(tiny_cfg.to_dict(), "t.pt", "s.pt", "data", out, dict(space.ranges),
                                              {}, trials=2), seed=0)
    uri = os.path.join(out, search_record.SEARCH_FILE)
    good = json.load(open(uri))
    if record == "RECORD_WITH_A_BAD_TRIAL":
        good["trials"][1]["alpha"] = "0.1; rm -rf"
        record = json.dumps(good)
    elif record == "RECORD_WITH_A_MISSING_TRIAL":
        good["trials"].pop()
        record = json.dumps(good)
    with open(uri, "w") as f:
        f.write(record)
    with pytest.raises(ConfigError, match="not a search record this version reads"):
        run_tune(tiny_cfg, "t.pt", "s.pt", "data", out, space, trials=2, resume=True)

"""Training stages: real local Ray with 2 CPU workers, resume, a worker killed mid-run, NaN, S3."""

import json
import os
import subprocess
import sys

import pytest
import torch

from scalekd import storage
from scalekd.config import load_config, replace
from scalekd.models.detectors import backbone_parameters, build_detector
from scalekd.train import checkpoint as ckpt
from scalekd.train.schedule import lr_factor
from scalekd.geometry import student_spec
from scalekd.train.hooks import POISON_ENV
from scalekd.train.stage import StageRequest, TrainingError, run_stage


def _cli(*args, env=None, check=True, cwd=None):
    full_env = dict(os.environ, SCALEKD_NO_PROGRESS="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "scalekd.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=600, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"scalekd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _summary(out) -> dict:
    return json.loads(open(os.path.join(out, "summary.json")).read())


def test_tiny_pipeline_on_two_ray_workers_end_to_end(synth_root, tmp_path):
    # Relative paths, as a user types them: Ray's workers run elsewhere and must still find them. The teacher and
    # warm student in one plain process (the distill stage is the one with every input a path).
    common = ["--preset", "tiny", "--data", os.path.relpath(synth_root, tmp_path)]
    _cli("train-teacher", *common, "--out", "teacher", "--no-ray", cwd=tmp_path)
    _cli("warmup", *common, "--out", "warmup", "--no-ray", cwd=tmp_path)
    proc = _cli("distill", *common, "--workers", "2", "--out", "distill", "--teacher", "teacher/model.pt",
                "--student", "warmup/model.pt", cwd=tmp_path)
    # The local Ray serves the State API that Ray Train's placement-group safety net polls (else it warns every
    # few seconds that it cannot see the controller, and could not free a dead controller's resources).
    assert "Failed to query Ray Train Controller actor state" not in proc.stdout + proc.stderr
    teacher, warm, distilled = (_summary(tmp_path / s) for s in ("teacher", "warmup", "distill"))
    assert teacher["workers"] == warm["workers"] == 1 and distilled["workers"] == 2
    ray_result = json.loads(open(tmp_path / "distill" / "ray_result.json").read())  # Ray Train's own record
    assert ray_result["checkpoint"] and ray_result["metrics"]["iteration"] == distilled["iterations"]
    # The teacher is built for, and trained at, twice the student's resolution.
    assert teacher["spec"]["min_size"] == 2 * warm["spec"]["min_size"] == 128
    lines = [json.loads(line) for line in open(tmp_path / "distill" / "metrics.jsonl")]
    tiny = load_config(preset="tiny")  # the assistant's warm-up iterations come before the student's 4
    assert lines[-1]["iteration"] == tiny.distill.csa.warmup_iterations + 4
    assert "kd/feat" in lines[-1] and "assistant/classification" in lines[-1]
    assert os.listdir(tmp_path / "distill" / "tensorboard")
    _model, blob = ckpt.load_model(str(tmp_path / "distill" / "model.pt"))
    assert blob["spec"]["backbone"] == "mobilenet_v2" and "distiller" not in blob
    # The student's file holds the student alone: its keys are exactly a plain student's.
    assert set(blob["state_dict"]) == set(build_detector(ckpt.DetectorSpec(**blob["spec"])).state_dict())


def test_worker_killed_mid_run_is_restored_from_the_last_checkpoint(synth_root, tmp_path):
    out = tmp_path / "warmup"
    _cli("warmup", "--preset", "tiny", "--data", synth_root, "--workers", "2", "--out", str(out),
         "--set", "train.warmup_iterations=6", "--set", "scaling.max_failures=2",
         env={"SCALEKD_FAULT_AT_ITERATION": "3"})
    assert (out / ".fault-injected").exists()  # a worker really died at iteration 3
    summary = _summary(out)
    assert summary["iterations"] == 6 and summary["resumed_from"] == 2  # checkpoint at 2 (interval 2)
    iterations = [json.loads(line)["iteration"] for line in open(out / "metrics.jsonl")]
    assert iterations[:3] == [1, 2, 3] and iterations[3:] == [3, 4, 5, 6]


def test_stopped_stage_resumes_at_the_saved_iteration(synth_root, tmp_path):
    out = tmp_path / "teacher"
    args = ["train-teacher", "--preset", "tiny", "--data", synth_root, "--out", str(out), "--no-ray",
            "--set", "train.teacher_iterations=5"]
    first = _cli(*args, env={"SCALEKD_FAULT_AT_ITERATION": "3"}, check=False)
    assert first.returncode != 0 and not (out / "model.pt").exists()
    assert ckpt.latest_checkpoint(str(out)).endswith("iter_0000002.pt")
    _cli(*args)
    assert _summary(out)["resumed_from"] == 2 and _summary(out)["iterations"] == 5
    again = _cli(*args)  # a finished stage is not run again
    assert json.loads(again.stdout)["resumed_from"] == 2


def test_assistant_warmup_runs_before_the_students_full_budget(tiny_cfg, tmp_path):
    root = tiny_cfg.data.root
    cfg = replace(tiny_cfg, train={"log_interval": 1, "checkpoint_interval": 100},
                  distill={"csa": {"head": "own", "warmup_iterations": 2}})
    run_stage(StageRequest("teacher", cfg.to_dict(), root, str(tmp_path / "teacher")))
    run_stage(StageRequest("warmup", cfg.to_dict(), root, str(tmp_path / "warm")))
    out = tmp_path / "distill"
    summary = run_stage(StageRequest("distill", cfg.to_dict(), root, str(out),
                                     teacher=str(tmp_path / "teacher" / "model.pt"),
                                     student_init=str(tmp_path / "warm" / "model.pt")))
    assert summary["iterations"] == 2 + cfg.train.distill_iterations
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assistant_only = [line for line in lines if "kd/cls" not in line]
    assert [line["iteration"] for line in assistant_only] == [1, 2]
    assert all("assistant/classification" in line and "det/classification" not in line for line in assistant_only)
    # The student's learning-rate schedule counts the student's iterations only.
    t = cfg.train
    expected = [t.lr * lr_factor(max(0, line["iteration"] - 2), t.distill_iterations, t.lr_warmup_iterations,
                                 t.lr_steps, t.lr_gamma) for line in lines]
    assert [line["lr"] for line in lines] == pytest.approx(expected)


def test_a_stage_run_twice_with_one_seed_trains_the_same_weights(tiny_cfg, tmp_path):
    """Flips drew from Python's `random`, which nothing seeded: two runs of one seed differed (on KIT by 2.6 AP_S).
    Python's stream is set differently before each run, so only what train.seed decides may agree."""
    import random

    cfg = replace(tiny_cfg, data={"hflip_prob": 0.5}, train={"warmup_iterations": 3})
    weights = []
    for python_seed, train_seed, name in ((1, 0, "a"), (2, 0, "b"), (1, 1, "other_seed")):
        random.seed(python_seed)
        run_stage(StageRequest("warmup", replace(cfg, train={"seed": train_seed}).to_dict(), cfg.data.root,
                               str(tmp_path / name)))
        weights.append(ckpt.load_model(str(tmp_path / name / "model.pt"))[0].state_dict())
    same, other = weights[0], weights[1]
    assert all(torch.equal(same[k], other[k]) for k in same)
    assert not all(torch.equal(same[k], weights[2][k]) for k in same)  # the seed does decide something


def _untrained_start_models(cfg, tmp_path) -> dict[str, str]:
    """A teacher and a warm student as a distill stage reads them, without training either (the tests here are
    about what the stage does with them)."""
    from scalekd.geometry import teacher_spec

    with open(f"{cfg.data.root}/annotations/instances_{cfg.data.train_split}.json") as f:
        categories = json.load(f)["categories"]  # the dataset's: a distill stage checks them
    models = {}
    for role, spec in (("teacher", teacher_spec(cfg, 4)), ("warm", student_spec(cfg, 4))):
        models[role] = ckpt.save_model(build_detector(spec), spec, str(tmp_path / role), categories, {})
    return models


def test_every_variant_of_a_distill_stage_trains_its_student_on_the_same_batches_and_flips(tiny_cfg, tmp_path,
                                                                                            monkeypatch):
    """Batches and flips drew from torch's global stream after build_stage had drawn from it for SDF and the
    assistant, and an assistant warm-up used up batches first: variants of one seed trained on different data, so
    "paired by seed" paired nothing. The student's i-th batch may depend on the seed alone."""
    from scalekd.train import loop

    seen: dict[str, list[torch.Tensor]] = {}
    step = loop._step

    def recording(stage, request, batch, iteration, assistant_warmup, autocast):
        if iteration >= assistant_warmup:  # the student's iterations
            seen.setdefault(os.path.basename(request.out), []).append(torch.cat([im.flatten() for im in
                                                                                  batch.student_images]))
        return step(stage, request, batch, iteration, assistant_warmup, autocast)

    monkeypatch.setattr(loop, "_step", recording)
    models = _untrained_start_models(tiny_cfg, tmp_path)
    base = replace(tiny_cfg, data={"hflip_prob": 0.5}, train={"distill_iterations": 4, "batch_size": 3})
    variants = {"plain": {"distill": {"method": "none"}}, "od": {"distill": {"method": "od"}},
                "scalekd": {"distill": {"csa": {"head": "own", "warmup_iterations": 2}}},
                "other_seed": {"train": {"seed": base.train.seed + 1}, "distill": {"method": "none"}}}
    for name, change in variants.items():
        cfg = replace(base, **change)
        run_stage(StageRequest("distill", cfg.to_dict(), cfg.data.root, str(tmp_path / name),
                               teacher=models["teacher"], student_init=models["warm"]))
    assert all(len(batches) == 4 for batches in seen.values())
    for name in ("od", "scalekd"):
        assert all(torch.equal(a, b) for a, b in zip(seen["plain"], seen[name])), name
    assert not all(torch.equal(a, b) for a, b in zip(seen["plain"], seen["other_seed"]))


def test_a_frozen_teacher_start_assistant_without_sdf_trains_the_student_exactly_as_od(tiny_cfg, tmp_path):
    """The assistant starts as the teacher's scale-aligned predictions; frozen and without SDF, the ScaleKD step
    hands the student OD's targets. On KIT such a student trailed OD by 4.6-15.2 AP_S per seed, which turned out to
    be the batches alone (they were not paired): with paired batches the two runs are one run."""
    models = _untrained_start_models(tiny_cfg, tmp_path)
    base = replace(tiny_cfg, data={"hflip_prob": 0.5}, train={"distill_iterations": 4})
    weights = []
    for name, distill in (("od", {"method": "od"}),
                          ("frozen", {"sdf": {"enabled": False}, "csa": {"lr": 0.0, "warmup_iterations": 0},
                                      "cross_head_weight": 0.0})):  # the default's cross-head terms are not OD's
        cfg = replace(base, distill=distill)
        run_stage(StageRequest("distill", cfg.to_dict(), cfg.data.root, str(tmp_path / name),
                               teacher=models["teacher"], student_init=models["warm"]))
        weights.append(ckpt.load_model(str(tmp_path / name / "model.pt"))[0].state_dict())
    start = ckpt.load_model(models["warm"])[0].state_dict()
    assert not all(torch.equal(weights[0][k], start[k]) for k in start)  # the student did train
    for k in start:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-5, atol=1e-6, msg=k)


def test_backbone_frozen_during_the_window_then_trained(tiny_cfg, tmp_path):
    torch.manual_seed(tiny_cfg.train.seed)
    initial = build_detector(student_spec(tiny_cfg, 4))
    start = [p.detach().clone() for p in backbone_parameters(initial)]
    frozen_cfg = replace(tiny_cfg, train={"warmup_iterations": 2, "freeze_backbone_iterations": 2})
    run_stage(StageRequest("warmup", frozen_cfg.to_dict(), tiny_cfg.data.root, str(tmp_path / "frozen")))
    model, _ = ckpt.load_model(str(tmp_path / "frozen" / "model.pt"))
    assert all(torch.equal(a, b) for a, b in zip(start, backbone_parameters(model)))
    head_before = initial.head.classification_head.cls_logits.weight
    assert not torch.equal(head_before, model.head.classification_head.cls_logits.weight)
    thawed_cfg = replace(tiny_cfg, train={"warmup_iterations": 4, "freeze_backbone_iterations": 2})
    run_stage(StageRequest("warmup", thawed_cfg.to_dict(), tiny_cfg.data.root, str(tmp_path / "thawed")))
    model, _ = ckpt.load_model(str(tmp_path / "thawed" / "model.pt"))
    assert not all(torch.equal(a, b) for a, b in zip(start, backbone_parameters(model)))


def test_poisoned_batch_stops_with_a_named_error_and_keeps_the_last_good_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv(POISON_ENV, "3")
    out = str(tmp_path / "teacher")
    cfg = replace(tiny_cfg, train={"teacher_iterations": 6})
    with pytest.raises(TrainingError, match=r"iteration 3: loss term 'det/\w+' is nan") as err:
        run_stage(StageRequest("teacher", cfg.to_dict(), tiny_cfg.data.root, out))
    assert "iter_0000002.pt" in str(err.value)
    state = ckpt.load(ckpt.latest_checkpoint(out))
    assert state["iteration"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values()
                                           if v.is_floating_point())
    assert not os.path.exists(os.path.join(out, "model.pt"))


def test_checkpoints_and_models_round_trip_through_s3(s3, tiny_cfg, tmp_path):
    out = f"s3://{s3['bucket']}/runs/warmup"
    cfg = replace(tiny_cfg, train={"warmup_iterations": 4})
    run_stage(StageRequest("warmup", cfg.to_dict(), tiny_cfg.data.root, out))
    uris = list(storage.list_uris(out))
    assert f"{out}/model.pt" in uris and f"{out}/checkpoints/iter_0000004.pt" in uris
    assert f"{out}/metrics.jsonl" in uris
    _model, blob = ckpt.load_model(f"{out}/model.pt")
    state = ckpt.load(f"{out}/checkpoints/iter_0000004.pt")
    assert all(torch.equal(state["model"][k], v) for k, v in blob["state_dict"].items())
    with pytest.raises(storage.StorageError, match="no such object"):
        ckpt.load_model(f"{out}/nope.pt")


def test_checkpoint_of_another_architecture_is_refused_naming_both(tiny_cfg, tmp_path):
    cfg = replace(tiny_cfg, train={"warmup_iterations": 1})
    run_stage(StageRequest("warmup", cfg.to_dict(), tiny_cfg.data.root, str(tmp_path / "w")))
    other = replace(tiny_cfg, model={"detector": "fcos"})
    with pytest.raises(ckpt.CheckpointError, match="retinanet/mobilenet_v2.*fcos/mobilenet_v2"):
        ckpt.load_model(str(tmp_path / "w" / "model.pt"), expect=student_spec(other, 4))


@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated", bytes(range(256)) * 40, b""])
def test_truncated_or_random_model_files_are_refused_without_unsafe_advice(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ckpt.CheckpointError, match="not a scalekd model or checkpoint file") as err:
        ckpt.load_model(str(path))
    assert "weights_only" not in str(err.value) and len(str(err.value)) < 300


def test_weights_that_do_not_fit_their_stored_spec_get_one_line(tiny_cfg, tmp_path):
    cfg = replace(tiny_cfg, train={"warmup_iterations": 1})
    run_stage(StageRequest("warmup", cfg.to_dict(), tiny_cfg.data.root, str(tmp_path / "w")))
    blob = ckpt.load(str(tmp_path / "w" / "model.pt"))
    blob["spec"]["fpn_channels"] = 64  # the weights are FPN 32
    ckpt.save(blob, str(tmp_path / "altered.pt"))
    with pytest.raises(ckpt.CheckpointError, match="do not fit its stored spec") as err:
        ckpt.load_model(str(tmp_path / "altered.pt"))
    assert len(str(err.value)) < 500


def test_a_finished_stage_is_reused_only_for_the_same_inputs(tiny_cfg, tmp_path):
    from scalekd.train.keys import inputs_key

    out = str(tmp_path / "warmup")
    request = StageRequest("warmup", tiny_cfg.to_dict(), tiny_cfg.data.root, out)
    first = run_stage(request)
    model_bytes = open(os.path.join(out, "model.pt"), "rb").read()
    # Where and how robustly it runs are not inputs: a rerun that changes only those reuses the stage.
    elsewhere = replace(tiny_cfg, scaling={"ray_address": "http://head:8265", "max_failures": 5},
                        train={"log_interval": 3})
    assert run_stage(StageRequest("warmup", elsewhere.to_dict(), tiny_cfg.data.root, out)) == first
    assert open(os.path.join(out, "model.pt"), "rb").read() == model_bytes
    other = replace(tiny_cfg, train={"lr": 0.003})
    assert inputs_key(StageRequest("warmup", other.to_dict(), tiny_cfg.data.root, out)) != first["inputs_key"]
    with pytest.raises(TrainingError, match="from other inputs"):
        run_stage(StageRequest("warmup", other.to_dict(), tiny_cfg.data.root, out))
    assert open(os.path.join(out, "model.pt"), "rb").read() == model_bytes  # nothing was overwritten


def test_one_dataset_spelled_two_ways_shares_its_stages(tiny_cfg, tmp_path):
    import hashlib

    from scalekd.train.keys import inputs_key, stage_inputs_config

    root = tiny_cfg.data.root
    respelled = os.path.join(root, "..", os.path.basename(root))

    def request(data_root, out, **train):
        cfg = replace(tiny_cfg, data={"root": data_root}, train=train)
        return StageRequest("warmup", cfg.to_dict(), data_root, out)

    assert inputs_key(request(root, "x")) == inputs_key(request(respelled, "x"))
    out = str(tmp_path / "warmup")
    run_stage(request(root, out))
    model_bytes = open(os.path.join(out, "model.pt"), "rb").read()
    # Keys written before the location left them hashed the root as it was spelled: rewrite the stage's key so.
    config = stage_inputs_config("warmup", request(root, out).config, location=True)
    assert config["data"]["root"] == root
    earlier = hashlib.sha256(json.dumps({"stage": "warmup", "config": config}, sort_keys=True).encode())
    earlier.update(open(os.path.join(root, "annotations", f"instances_{tiny_cfg.data.train_split}.json"), "rb").read())
    earlier.update(b"--")
    summary = json.load(open(os.path.join(out, "summary.json")))
    summary["inputs_key"] = earlier.hexdigest()
    json.dump(summary, open(os.path.join(out, "summary.json"), "w"))
    assert run_stage(request(respelled, out))["inputs_key"] == earlier.hexdigest()  # reused, not retrained
    with pytest.raises(TrainingError, match="from other inputs"):
        run_stage(request(respelled, out, lr=0.003))
    assert open(os.path.join(out, "model.pt"), "rb").read() == model_bytes


def test_settings_a_stage_never_reads_do_not_retire_it(tiny_cfg):
    from scalekd.train.keys import inputs_key

    def key(stage, cfg):
        return inputs_key(StageRequest(stage, cfg.to_dict(), tiny_cfg.data.root, "unused"))

    distill_change = replace(tiny_cfg, distill={"beta": 0.7, "csa": {"starts_as": "teacher"}},
                             train={"distill_iterations": 9})
    for stage in ("teacher", "warmup"):
        assert key(stage, distill_change) == key(stage, tiny_cfg)
    assert key("teacher", replace(tiny_cfg, train={"warmup_iterations": 9})) == key("teacher", tiny_cfg)
    assert key("distill", replace(tiny_cfg, train={"teacher_iterations": 9})) == key("distill", tiny_cfg)
    # What a stage does read still counts.
    assert key("distill", distill_change) != key("distill", tiny_cfg)
    assert key("teacher", replace(tiny_cfg, train={"teacher_iterations": 9})) != key("teacher", tiny_cfg)
    assert key("warmup", replace(tiny_cfg, train={"freeze_backbone_iterations": 9})) != key("warmup", tiny_cfg)
    # ATSS's k is read only by the ATSS assigner: a config without ATSS keys as if k did not exist.
    without_k = tiny_cfg.to_dict()
    del without_k["experimental"]["atss_topk"]
    assert inputs_key(StageRequest("teacher", without_k, tiny_cfg.data.root, "unused")) == key("teacher", tiny_cfg)
    assert key("teacher", replace(tiny_cfg, experimental={"atss_topk": 1})) == key("teacher", tiny_cfg)
    atss = replace(tiny_cfg, experimental={"assigner": "atss"})
    assert key("teacher", replace(atss, experimental={"atss_topk": 1})) != key("teacher", atss)
    # The assistant head's own rate, a nested setting: absent or null keys the same; a value counts.
    without_head_lr = tiny_cfg.to_dict()
    del without_head_lr["distill"]["csa"]["head_lr"]
    assert inputs_key(StageRequest("distill", without_head_lr, tiny_cfg.data.root, "unused")) == key("distill",
                                                                                                    tiny_cfg)
    assert key("distill", replace(tiny_cfg, distill={"csa": {"head_lr": 0.0}})) != key("distill", tiny_cfg)
    without_anchor = tiny_cfg.to_dict()
    del without_anchor["distill"]["csa"]["teacher_anchor"]
    assert inputs_key(StageRequest("distill", without_anchor, tiny_cfg.data.root, "unused")) == key("distill",
                                                                                                   tiny_cfg)
    assert key("distill", replace(tiny_cfg, distill={"csa": {"teacher_anchor": 0.5}})) != key("distill", tiny_cfg)


def test_teacher_holdout_trains_each_stage_on_its_share_and_keys_it(tiny_cfg, tmp_path):
    """data.teacher_holdout=0.5: the teacher trains on its share, the warm-up on the rest; the setting is an input
    of every stage (absent keys as 0); a share that leaves a stage no image is a named error, nothing written."""
    from scalekd.data.coco import DataError, dataset_from_root
    from scalekd.data.holdout import in_teacher_share
    from scalekd.train.keys import inputs_key

    held = replace(tiny_cfg, data={"teacher_holdout": 0.5})
    images = dataset_from_root(tiny_cfg.data.root, "train").images
    teacher_share = sum(in_teacher_share(im["id"], 0.5) for im in images)
    assert 0 < teacher_share < len(images)
    trained = {stage: run_stage(StageRequest(stage, held.to_dict(), tiny_cfg.data.root, str(tmp_path / stage),
                                             stop_at=1))["train_images"] for stage in ("teacher", "warmup")}
    assert trained == {"teacher": teacher_share, "warmup": len(images) - teacher_share}

    def key(stage, config):
        return inputs_key(StageRequest(stage, config, tiny_cfg.data.root, "unused"))

    without = tiny_cfg.to_dict()
    del without["data"]["teacher_holdout"]
    for stage in ("teacher", "warmup", "distill"):
        assert key(stage, without) == key(stage, tiny_cfg.to_dict()) != key(stage, held.to_dict())
    nearly_all = replace(tiny_cfg, data={"teacher_holdout": 0.999999})
    with pytest.raises(DataError, match="leaves the warmup stage none of the training images"):
        run_stage(StageRequest("warmup", nearly_all.to_dict(), tiny_cfg.data.root, str(tmp_path / "none")))
    assert not os.path.exists(tmp_path / "none" / "model.pt")


def test_a_checkpoint_from_other_inputs_is_not_resumed(tiny_cfg, tmp_path):
    out = str(tmp_path / "teacher")
    run_stage(StageRequest("teacher", tiny_cfg.to_dict(), tiny_cfg.data.root, out, stop_at=2))
    other = replace(tiny_cfg, train={"lr": 0.003})
    with pytest.raises(TrainingError, match="other inputs"):
        run_stage(StageRequest("teacher", other.to_dict(), tiny_cfg.data.root, out))
    assert ckpt.latest_checkpoint(out).endswith("iter_0000002.pt")


def test_the_starting_models_are_inputs_of_the_distill_stage(tiny_cfg, tmp_path):
    from scalekd.train.keys import inputs_key

    root = tiny_cfg.data.root
    teacher = run_stage(StageRequest("teacher", tiny_cfg.to_dict(), root, str(tmp_path / "t")))
    assert teacher["iterations"] == tiny_cfg.train.teacher_iterations
    run_stage(StageRequest("warmup", tiny_cfg.to_dict(), root, str(tmp_path / "w")))
    other_teacher = replace(tiny_cfg, train={"teacher_iterations": 2})
    run_stage(StageRequest("teacher", other_teacher.to_dict(), root, str(tmp_path / "t2")))
    warm = str(tmp_path / "w" / "model.pt")
    keys = {inputs_key(StageRequest("distill", tiny_cfg.to_dict(), root, str(tmp_path / "d"),
                                    teacher=str(tmp_path / t / "model.pt"), student_init=warm)) for t in ("t", "t2")}
    assert len(keys) == 2


def test_a_setting_added_later_keys_at_its_old_value_as_if_absent(tiny_cfg):
    from scalekd.train.keys import inputs_key, stage_inputs_config

    def key(config: dict) -> str:
        return inputs_key(StageRequest("warmup", config, tiny_cfg.data.root, "unused"))

    before_box_loss = tiny_cfg.to_dict()
    del before_box_loss["experimental"]["box_loss"]
    assert key(before_box_loss) == key(tiny_cfg.to_dict())
    assert key(replace(tiny_cfg, experimental={"box_loss": "giou"}).to_dict()) != key(tiny_cfg.to_dict())
    # CrossKD's section, added later, is read by CrossKD alone (or beside ScaleKD with cross-head terms): a ScaleKD
    # stage without them keys as if it were absent.
    def distill_key(config: dict) -> str:
        return inputs_key(StageRequest("distill", config, tiny_cfg.data.root, "unused"))

    no_cross_head = replace(tiny_cfg, distill={"cross_head_weight": 0.0})
    before_crosskd = no_cross_head.to_dict()
    del before_crosskd["distill"]["crosskd"]
    assert distill_key(before_crosskd) == distill_key(no_cross_head.to_dict())
    crosskd = replace(tiny_cfg, distill={"method": "crosskd"})
    assert distill_key(crosskd.to_dict()) != distill_key(
        replace(crosskd, distill={"crosskd": {"head_index": 2}}).to_dict())
    # The cross-head weight, added later at 0: 0 keys as the stages finished before it existed; above 0 it reads
    # CrossKD's section too.
    before_cross_head = no_cross_head.to_dict()
    del before_cross_head["distill"]["cross_head_weight"]
    del before_cross_head["distill"]["crosskd"]
    old_stage_config = stage_inputs_config("distill", before_cross_head)  # a stage from before the field
    assert stage_inputs_config("distill", no_cross_head.to_dict()) == old_stage_config
    cross_head = replace(tiny_cfg, distill={"cross_head_weight": 2.0})
    assert distill_key(cross_head.to_dict()) != distill_key(no_cross_head.to_dict())
    assert distill_key(cross_head.to_dict()) != distill_key(
        replace(cross_head, distill={"crosskd": {"head_index": 2}}).to_dict())
    # "auto" (the default) keys as the weight it resolves to: 2 where the terms can be formed, 0 (absent)
    # elsewhere; a dict written without the field runs at the default, so it keys as the default does.
    auto = replace(tiny_cfg, distill={"cross_head_weight": "auto"})
    assert auto == tiny_cfg
    assert distill_key(auto.to_dict()) == distill_key(cross_head.to_dict())
    without_field = tiny_cfg.to_dict()
    del without_field["distill"]["cross_head_weight"]
    assert distill_key(without_field) == distill_key(cross_head.to_dict())
    auto_control = replace(auto, distill={"csa": {"keys_from": "student"}})
    assert distill_key(auto_control.to_dict()) == distill_key(
        replace(no_cross_head, distill={"csa": {"keys_from": "student"}}).to_dict())


def test_a_plain_distill_stage_needs_no_teacher(tiny_cfg, tmp_path):
    from scalekd.train.stage import build_stage

    warm = ckpt.save_model(build_detector(student_spec(tiny_cfg, 4)), student_spec(tiny_cfg, 4), str(tmp_path), [],
                           {})
    plain = replace(tiny_cfg, distill={"method": "none"})
    stage = build_stage(StageRequest("distill", plain.to_dict(), plain.data.root, "unused", student_init=warm),
                        plain, 4, torch.device("cpu"), 1)
    assert stage.distiller.teacher is None
    with pytest.raises(TrainingError, match="needs --teacher"):
        build_stage(StageRequest("distill", tiny_cfg.to_dict(), tiny_cfg.data.root, "unused", student_init=warm),
                    tiny_cfg, 4, torch.device("cpu"), 1)


def test_the_training_loop_steps_and_leaves_the_rest_to_hooks_reading_no_environment():
    import inspect

    from scalekd.train import loop

    for function in (loop.train, loop._step):
        source = inspect.getsource(function)
        assert "environ" not in source and "getenv" not in source, function.__name__
    assert "hook.before_step" in inspect.getsource(loop.train)


def test_a_worker_group_this_machine_cannot_hold_is_refused_instead_of_waiting_forever(synth_root, tmp_path):
    need = 4 * (os.cpu_count() or 1)
    proc = _cli("train-teacher", "--preset", "tiny", "--data", synth_root, "--out", str(tmp_path / "t"),
                "--workers", "4", "--set", f"scaling.cpus_per_worker={os.cpu_count()}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"needs {need} CPUs" in proc.stderr and "--ray-address" in proc.stderr
    assert not (tmp_path / "t" / "model.pt").exists()


@pytest.mark.parametrize("field, value", [("fpn_channels", 1 << 20), ("min_size", 10 ** 9), ("num_classes", -3),
                                          ("backbone", "resnet1000"), ("anchor_scale", float("nan")),
                                          ("fpn_channels", True), ("negative_iou", 0.9)])
def test_a_model_file_whose_spec_is_out_of_range_is_refused_before_anything_is_built(tiny_cfg, tmp_path, monkeypatch,
                                                                                     field, value):
    cfg = replace(tiny_cfg, train={"warmup_iterations": 1})
    run_stage(StageRequest("warmup", cfg.to_dict(), tiny_cfg.data.root, str(tmp_path / "w")))
    blob = ckpt.load(str(tmp_path / "w" / "model.pt"))
    blob["spec"][field] = value
    ckpt.save(blob, str(tmp_path / "altered.pt"))
    monkeypatch.setattr(ckpt, "build_detector", lambda spec: pytest.fail("built a model from an altered spec"))
    with pytest.raises(ckpt.CheckpointError, match=f"out of range .*{field}=") as err:
        ckpt.load_model(str(tmp_path / "altered.pt"))
    assert len(str(err.value)) < 400


def test_a_huge_fpn_width_is_refused_in_the_config():
    from scalekd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.fpn_channels.*to 2048"):
        load_config(preset="tiny", overrides=["model.fpn_channels=1048576"])

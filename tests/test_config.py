import pytest

from scalekd.config import PRESETS, ConfigError, config_from_dict, load_config
from scalekd.storage import StorageError


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_load_and_round_trip_through_yaml(preset):
    cfg = load_config(preset=preset)
    again = load_config(text=cfg.to_yaml())
    assert again == cfg


def test_overrides_and_paper_defaults():
    cfg = load_config(preset="tiny", overrides=["distill.alpha=0.02", "model.detector=faster_rcnn"])
    assert cfg.loss_weights() == (0.02, 0.5, 0.2)  # beta, gamma: the paper's two-stage values
    assert load_config().loss_weights() == (0.01, 0.2, 0.05)
    assert load_config(preset="tiny").teacher_size == 2 * load_config(preset="tiny").data.student_size


@pytest.mark.parametrize("override, field, words", [
    ("distill.alpha=-0.1", "distill.alpha", "non-negative"),
    ("data.student_size=100", "data.student_size", "multiple of 32"),
    ("data.student_size=65", "data.student_size", "multiple of 32"),
    ("data.val_split=../../etc", "data.val_split", "a plain name"),
    ("data.train_split=/abs/train", "data.train_split", "a plain name"),
    ("model.detector=yolo", "model.detector", "retinanet"),
    ("train.batch_size=0", "train.batch_size", ">= 1"),
    ("distill.csa.heads=3", "distill.csa.heads", "multiple"),
    ("experimental.teacher_sdf=ema", "experimental.teacher_sdf", "shared or frozen"),
    ("train.lr_steps=[0.9,0.5]", "train.lr_steps", "increasing"),
    ("data.teacher_scale=1.3", "data.teacher_scale", "multiple of 32"),
    ("data.teacher_holdout=1.0", "data.teacher_holdout", "[0, 1)"),
    ("data.teacher_holdout=-0.5", "data.teacher_holdout", "[0, 1)"),
    ("data.teacher_holdout=.nan", "data.teacher_holdout", "finite"),
    ("data.teacher_holdout=half", "data.teacher_holdout", "number"),
    ("distill.kd_ramp_iterations=-1", "distill.kd_ramp_iterations", ">= 0"),
    ("distill.kd_ramp_iterations=2.5", "distill.kd_ramp_iterations", "integer"),
    ("distill.kd_ramp_iterations=ten", "distill.kd_ramp_iterations", "integer"),
    ("distill.csa.starts_as=assistant", "distill.csa.starts_as", "student or teacher"),
    ("model.detector=fcos model.fpn_channels=48", "model.fpn_channels", "multiple of 32"),
    # A teacher start needs the teacher's P_{l+1} head to predict on the student's anchors: each condition alone.
    ("distill.csa.starts_as=teacher distill.csa.head=shared", "distill.csa.starts_as", "head=own"),
    ("distill.csa.starts_as=teacher model.detector=faster_rcnn", "distill.csa.starts_as", "one-stage"),
    ("distill.csa.starts_as=teacher distill.pairing=same_level", "distill.csa.starts_as", "scale_aligned"),
    ("distill.csa.starts_as=teacher data.teacher_scale=3", "distill.csa.starts_as", "teacher_scale=2"),
])
def test_invalid_values_name_the_field(override, field, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=override.split(" "))
    assert err.value.path == field
    assert field in str(err.value) and words in str(err.value)


def test_unknown_keys_and_wrong_types_are_rejected_with_dotted_path():
    with pytest.raises(ConfigError, match="distill.sdf.dilation'"):
        config_from_dict({"distill": {"sdf": {"dilation": [1, 2]}}})
    with pytest.raises(ConfigError, match="train.iterations"):
        load_config(overrides=["train.iterations=5"])
    with pytest.raises(ConfigError, match="'train.batch_size' = 'four'"):
        load_config(text="train:\n  batch_size: four\n")
    with pytest.raises(ConfigError, match="true or false"):
        load_config(overrides=["experimental.csa_recompute=1"])


def test_yaml_is_safe_loaded(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(str(path))


@pytest.mark.parametrize("written", ["1e-3", "1E-3", "+1e-3", "1.0e-3"])
def test_numbers_in_exponent_form_are_numbers_in_overrides_and_files(written):
    assert load_config(overrides=[f"distill.alpha={written}"]).distill.alpha == pytest.approx(1e-3)
    assert load_config(text=f"distill:\n  alpha: {written}\n").distill.alpha == pytest.approx(1e-3)


@pytest.mark.parametrize("override,field", [
    ("distill.alpha=.inf", "distill.alpha"), ("train.lr=.nan", "train.lr"), ("train.lr=-.inf", "train.lr"),
    ("data.student_size=1000000000000", "data.student_size"), ("data.teacher_scale=1e9", "data.teacher_scale"),
])
def test_non_finite_and_absurd_numbers_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=[override])


def test_a_key_given_twice_is_an_error_not_last_wins():
    with pytest.raises(ValueError, match="duplicate key 'alpha'"):
        load_config(text="distill:\n  alpha: 0.1\n  alpha: 0.2\n")


def test_a_malformed_override_value_names_the_flag():
    with pytest.raises(ConfigError, match="distill.alpha"):
        load_config(overrides=["distill.alpha=[1, 2"])


def test_a_config_path_that_is_a_folder_or_binary_is_named(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(str(tmp_path))
    with pytest.raises(StorageError, match="bin.yaml: not UTF-8 text: byte 128"):
        load_config(str(tmp_path / "bin.yaml"))


def test_the_assistant_starts_as_the_teacher_only_where_the_teachers_head_fits_the_students_anchors():
    assert load_config(preset="bench").assistant_starts_as_teacher
    for overrides in (["model.detector=faster_rcnn"], ["distill.recipe=paper"], ["distill.csa.head=shared"],
                      ["distill.csa.keys_from=student"], ["distill.csa.starts_as=student"],
                      ["data.teacher_scale=3"]):
        assert not load_config(preset="bench", overrides=overrides).assistant_starts_as_teacher, overrides


def test_yaml_merge_keys_merge_and_duplicate_keys_are_still_refused():
    from scalekd.config import parse_yaml

    text = "distill:\n  crosskd: &weights {weight: 2.0}\n  csa:\n    <<: *weights\n"
    assert parse_yaml(text)["distill"]["csa"] == {"weight": 2.0}
    assert parse_yaml("a: &b {x: 1, y: 2}\nc:\n  <<: *b\n  y: 3\n")["c"] == {"x": 1, "y": 3}
    with pytest.raises(Exception, match="duplicate key 'x'"):
        parse_yaml("x: 1\nx: 2\n")


def test_workers_0_on_the_command_line_is_checked_not_ignored(tmp_path, capsys):
    from scalekd.cli import main

    assert main(["train-teacher", "--preset", "tiny", "--workers", "0", "--out", str(tmp_path / "t")]) == 2
    assert not (tmp_path / "t").exists()
    assert "scaling.workers" in capsys.readouterr().err


def test_each_preset_is_a_yaml_file_of_values_whose_settings_reach_the_config():
    import pathlib

    import yaml

    folder = pathlib.Path(__file__).resolve().parent.parent / "scalekd" / "presets"
    assert {p.stem for p in folder.glob("*.yaml")} == set(PRESETS) == {"tiny", "demo", "bench", "paper"}
    for path in folder.glob("*.yaml"):
        lines = path.read_text().splitlines()
        assert all(not line.lstrip().startswith("#") for line in lines[2:]), f"{path.name}: notes go to docs"
        resolved = load_config(preset=path.stem).to_dict()
        for section, values in yaml.safe_load(path.read_text()).items():
            for key, value in values.items():
                got = resolved[section][key]
                if isinstance(value, dict):
                    assert {k: got[k] for k in value} == value, (path.name, section, key)
                else:
                    assert got == (list(value) if isinstance(value, list) else value), (path.name, section, key)

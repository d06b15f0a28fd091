"""benchmarks/cost.py: which recipe it measures. Its tables are only comparable if the command in the README still
measures what it measured when they were written (the first tables without --preset, a preset's recipe with it)."""

from benchmarks.cost import _parser, cost_config
from scalekd.config import load_config


def _measured(*argv):
    return cost_config(_parser().parse_args(list(argv)))


def test_without_a_preset_it_measures_the_first_tables_recipe():
    cfg = _measured()
    assert (cfg.data.student_size, cfg.model.detector, cfg.model.fpn_channels) == (256, "retinanet", 256)
    assert (cfg.model.student_backbone, cfg.model.teacher_backbone) == ("mobilenet_v2", "resnet18")
    assert cfg.model.anchor_scale == 2.0 and cfg.train.channels_last is True


def test_a_preset_is_measured_as_it_trains_and_model_flags_override_only_where_given():
    bench = load_config(preset="bench")
    cfg = _measured("--preset", "bench")
    assert (cfg.data.student_size, cfg.model.detector, cfg.model.fpn_channels, cfg.model.anchor_scale) == (
        bench.data.student_size, bench.model.detector, bench.model.fpn_channels, bench.model.anchor_scale)
    assert cfg.distill == bench.distill  # the recipe under measurement is the preset's, not the first tables'

    narrowed = _measured("--preset", "bench", "--fpn", "32", "--nchw")
    assert narrowed.model.fpn_channels == 32 and narrowed.train.channels_last is False
    assert narrowed.model.detector == bench.model.detector and narrowed.data.student_size == bench.data.student_size

"""benchmarks/headline.py: the paired interval its verdicts quote (per-seed paired intervals), and quality.py
printing those verdicts."""

import pytest

from benchmarks.headline import renamed, rows, verdicts
from scalekd.eval.paired import paired_interval


def test_the_paired_interval_is_the_mean_plus_minus_t_standard_errors():
    low, high = paired_interval([1.0, 2.0, 3.0])  # mean 2, sample sd 1, 3 seeds: t(0.975, 2) = 4.303
    assert (low, high) == pytest.approx((2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5))
    assert paired_interval([1.5, 1.5]) == pytest.approx((1.5, 1.5))  # seeds that agree: no width
    assert paired_interval([4.0]) is None  # one seed says nothing about the spread


def _seeds(values):
    return {"per_seed": [{"seed": s, "AP_S": v, "AP_M": v, "params": 1} for s, v in enumerate(values)]}


def test_a_verdict_met_on_the_mean_says_when_its_interval_does_not_resolve_it():
    close = verdicts({"scalekd": _seeds([12.0, 12.1, 11.9]), "scalekd_no_teacher": _seeds([10.0, 10.0, 10.0]),
                      "plain": _seeds([5.0, 5.0, 5.0])})
    spread = verdicts({"scalekd": _seeds([20.0, 10.0, 6.0]), "scalekd_no_teacher": _seeds([10.0, 10.0, 10.0]),
                       "plain": _seeds([5.0, 5.0, 5.0])})
    control = "beats the no-teacher control on AP_S by >= 1.0"
    assert close[control].startswith("MET") and close[control].endswith(", resolved")
    assert spread[control].startswith("MET") and spread[control].endswith("not resolved")  # mean +2, seeds -4..+10


def test_a_plain_student_with_no_small_object_found_gets_a_verdict_not_a_division_by_zero():
    # VisDrone's sample: every student at AP_S 0 (a report once crashed here after 77 min of training).
    plain_target = "beats plain on AP_S by >= 2.0 (or 15%), every seed"
    tie = verdicts({"scalekd": _seeds([0.0]), "plain": _seeds([0.0])})
    assert tie[plain_target].startswith("NOT MET: +0.00 (plain's AP_S is 0: no relative gain)")
    # 15% of nothing is no margin: a gain under 2.0 over a zero plain is not met, 2.0 or more is.
    assert verdicts({"scalekd": _seeds([1.5]), "plain": _seeds([0.0])})[plain_target].startswith("NOT MET")
    assert verdicts({"scalekd": _seeds([2.5]), "plain": _seeds([0.0])})[plain_target].startswith("MET")


def test_a_validation_set_without_small_objects_leaves_the_ap_s_targets_not_assessed_instead_of_raising():
    # quality.py leaves out a metric COCO could not compute (-1: no object of that size), so AP_S may be missing.
    no_small = {"per_seed": [{"seed": 0, "AP": 30.0, "AP_M": 40.0, "params": 1}]}
    lines = verdicts({"scalekd": no_small, "plain": no_small, "scalekd_no_teacher": no_small, "od": no_small})
    for target in ("beats plain on AP_S by >= 2.0 (or 15%), every seed",
                   "beats the no-teacher control on AP_S by >= 1.0", "beats od on AP_S"):
        assert lines[target].startswith("not assessed (no seed where both have the metric")
    assert lines["AP_M within 1 point of plain; identical parameters"].startswith("MET: AP_M +0.00")


def test_quality_hands_the_verdicts_its_per_seed_metrics_and_the_control_is_not_judged_against_itself():
    from benchmarks.quality import headline_variants

    def run(ap_s):  # quality.py's per-run metrics: fractions, -1 where COCO has no object of a size
        return {"AP": 0.3, "AP50": 0.5, "AP75": 0.3, "AP_S": ap_s, "AP_M": 0.4, "AP_L": -1.0, "params": 7}

    runs = {"scalekd": [run(0.40), run(0.42)], "scalekd_no_teacher": [run(0.35), run(0.36)]}
    variants = headline_variants([3, 4], runs)
    assert variants["scalekd"]["per_seed"][1] == {"seed": 4, "AP": 30.0, "AP50": 50.0, "AP75": 30.0, "AP_S": 42.0,
                                                  "AP_M": 40.0, "params": 7}
    control = "beats the no-teacher control on AP_S by >= 1.0"
    assert verdicts(variants)[control].startswith("MET: +5.50, per seed [5.0, 6.0]")
    assert control not in verdicts(variants, "scalekd_no_teacher")


def test_the_table_pairs_every_student_with_ours_but_not_the_teacher():
    table = {r["variant"]: r for r in rows({"teacher": _seeds([80.0, 81.0]), "warm": _seeds([20.0, 22.0]),
                                            "scalekd": _seeds([50.0, 53.0])})}
    assert table["warm"]["scalekd AP_S minus this, per seed"] == "+30.00, +31.00"
    assert "95% interval" not in table["teacher"] and "95% interval" not in table["scalekd"]


def test_beating_a_baseline_needs_the_interval_above_zero_not_a_positive_mean():
    plain = _seeds([5.0, 5.0, 5.0])
    tie = verdicts({"scalekd": _seeds([10.5, 9.0, 11.0]), "od": _seeds([10.0, 10.0, 10.0]), "plain": plain})
    win = verdicts({"scalekd": _seeds([11.0, 11.2, 10.9]), "od": _seeds([10.0, 10.0, 10.0]), "plain": plain})
    loss = verdicts({"scalekd": _seeds([9.0, 9.5, 10.1]), "od": _seeds([10.0, 10.0, 10.0]), "plain": plain})
    assert tie["beats od on AP_S"].startswith("NOT SHOWN")  # mean +0.17, seeds -1.0..+1.0
    assert win["beats od on AP_S"].startswith("MET") and win["beats od on AP_S"].endswith(", resolved")
    assert loss["beats od on AP_S"].startswith("NOT MET")
    assert tie["beats fitnet on AP_S"] == "not assessed (not run)"


def test_renaming_swaps_names_together_keeps_the_numbers_records_it_and_drops_stale_verdicts():
    doc = {"protocol": "p", "variants": {"scalekd": _seeds([70.0]), "scalekd_crosskd": _seeds([72.0])},
           "verdict": {"old": "MET"}, "verdict_scalekd_crosskd": {"old": "MET"}}
    out = renamed(doc, {"scalekd": "scalekd_no_cross_head", "scalekd_crosskd": "scalekd"}, "pilot.json")
    assert out["variants"] == {"scalekd_no_cross_head": _seeds([70.0]), "scalekd": _seeds([72.0])}
    assert out["renamed"] == [{"source": "pilot.json",
                               "renames": {"scalekd": "scalekd_no_cross_head", "scalekd_crosskd": "scalekd"}}]
    assert not any(key.startswith("verdict") for key in out) and out["protocol"] == "p"
    with pytest.raises(SystemExit, match="no variant od"):
        renamed(doc, {"od": "x"}, "pilot.json")
    with pytest.raises(SystemExit, match="share a name"):
        renamed(doc, {"scalekd_crosskd": "scalekd"}, "pilot.json")


@pytest.mark.integration
def test_merging_a_headline_adds_seeds_run_the_same_way_and_refuses_others_before_training(tmp_path, monkeypatch):
    import json

    import benchmarks.common
    import benchmarks.quality as quality

    monkeypatch.setattr(benchmarks.common, "RESULTS", str(tmp_path))
    monkeypatch.setattr(quality, "RESULTS", str(tmp_path))

    def call(seeds, *extra, started):
        args = quality._parser().parse_args(["--variants", "plain", "--headline", "h.json", "--merge-headline",
                                             "--seeds", *map(str, seeds), *extra])
        args.started = started
        return args

    def run(ap_s):
        return {"AP": 0.3, "AP50": 0.5, "AP75": 0.3, "AP_S": ap_s, "AP_M": 0.4, "AP_L": -1.0, "params": 7}

    quality.write_headline(call([0, 1], started="a"), {"plain": [run(0.40), run(0.41)]}, 100.0)
    # A --set that the preset already holds is the same run: it merges.
    same = call([2], "--set", "model.detector=fcos", started="b")
    assert quality.mergeable_headline(same, "synth") is not None
    quality.write_headline(same, {"plain": [run(0.42)]}, 50.0)
    doc = json.loads((tmp_path / "h.json").read_text())
    assert [r["seed"] for r in doc["variants"]["plain"]["per_seed"]] == [0, 1, 2]
    assert doc["wall_s"] == 150 and [c["wall_s"] for c in doc["calls"]] == [100, 50]
    before = (tmp_path / "h.json").read_text()
    with pytest.raises(SystemExit, match=r"train\.distill_iterations"):
        quality.mergeable_headline(call([3], "--set", "train.distill_iterations=900", started="c"), "synth")
    with pytest.raises(SystemExit, match="warm_model"):
        quality.mergeable_headline(call([3], "--warm-model", "w.pt", started="c"), "synth")
    assert (tmp_path / "h.json").read_text() == before  # nothing lost


def sys_args(args) -> list[str]:
    return ["--variants", *args.variants, "--headline", args.headline, "--merge-headline"]


def test_merging_refuses_seeds_run_on_other_numerics_and_files_that_do_not_say(tmp_path, monkeypatch):
    """The same seed on another vector ISA trains another teacher and student (AVX2 vs AVX-512: the FCOS warm
    student's AP_S 58.16 vs 61.19), so pairing seeds across machines compares unlike runs."""
    import json

    import benchmarks.common
    import benchmarks.quality as quality

    monkeypatch.setattr(benchmarks.common, "RESULTS", str(tmp_path))
    monkeypatch.setattr(quality, "RESULTS", str(tmp_path))
    args = quality._parser().parse_args(["--variants", "plain", "--headline", "h.json", "--merge-headline"])
    args.started = "a"
    run = {"AP": 0.3, "AP50": 0.5, "AP75": 0.3, "AP_S": 0.4, "AP_M": 0.4, "AP_L": -1.0, "params": 7}
    quality.write_headline(args, {"plain": [run] * 3}, 10.0)
    doc = json.loads((tmp_path / "h.json").read_text())
    assert doc["machine"]["isa"] == benchmarks.common.numerics()["isa"] and "cpu" in doc["machine"]
    assert quality.mergeable_headline(args, "synth") is not None
    other = {**benchmarks.common.numerics(), "isa": "elsewhere", "cpu_capability": "elsewhere"}
    monkeypatch.setattr(quality, "numerics", lambda: other)
    with pytest.raises(SystemExit, match=r"machine\.isa: .* there, 'elsewhere' here"):
        quality.mergeable_headline(args, "synth")
    monkeypatch.setattr(quality, "numerics", benchmarks.common.numerics)
    # The weight layout train.channels_last=auto picks by timing changes the numerics too: the resolved layout pairs
    # calls, not the setting (NCHW gave an FCOS warm student AP_S 54.64 where channels_last gave 58.16).
    layout = doc["machine"]["channels_last"]
    assert isinstance(layout, bool) and "channels_last" not in doc["config"]["train"]
    assert quality.mergeable_headline(
        quality._parser().parse_args([*sys_args(args), "--set", f"train.channels_last={str(layout).lower()}"]),
        "synth") is not None
    monkeypatch.setattr(quality, "use_channels_last", lambda setting, device: not layout)
    with pytest.raises(SystemExit, match=rf"machine\.channels_last: {layout} there, {not layout} here"):
        quality.mergeable_headline(args, "synth")
    monkeypatch.undo()
    monkeypatch.setattr(benchmarks.common, "RESULTS", str(tmp_path))
    monkeypatch.setattr(quality, "RESULTS", str(tmp_path))
    for field in ("isa", "cpu_capability"):
        del doc["machine"][field]  # a file written before the numerics were stored
    (tmp_path / "h.json").write_text(json.dumps(doc))
    with pytest.raises(SystemExit, match=r"machine\.isa: None there"):
        quality.mergeable_headline(args, "synth")

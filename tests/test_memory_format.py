"""train.channels_last=auto: measured once per machine key, cached, remeasured when the key changes."""

import json

import pytest
import torch

from scalekd.config import ConfigError, load_config
from scalekd.train import memory_format


@pytest.fixture
def timed(monkeypatch, tmp_path):
    monkeypatch.setenv("SCALEKD_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_step(channels_last: bool, steps: int = 4) -> float:
        calls.append(channels_last)
        return 0.8 if channels_last else 1.0  # channels_last faster on this "machine"

    monkeypatch.setattr(memory_format, "yardstick_step_seconds", fake_step)
    return calls


def test_auto_measures_once_and_caches_per_machine(timed, tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    assert memory_format.use_channels_last("auto", cpu) is True
    assert memory_format.use_channels_last("auto", cpu) is True
    assert timed == [False, True]  # both layouts timed once, then read from the cache
    cached = json.loads((tmp_path / "channels_last.json").read_text())
    (entry,) = cached.values()
    assert entry == {"channels_last": True, "nchw_s": 1.0, "channels_last_s": 0.8}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # another ISA is another machine
    memory_format.use_channels_last("auto", cpu)
    assert len(timed) == 4 and len(json.loads((tmp_path / "channels_last.json").read_text())) == 2


def test_explicit_settings_and_gpus_need_no_measurement(timed, tmp_path):
    assert memory_format.use_channels_last(False, torch.device("cpu")) is False
    assert memory_format.use_channels_last(True, torch.device("cpu")) is True
    assert memory_format.use_channels_last("auto", torch.device("cuda")) is True
    assert timed == []


def test_a_damaged_cache_is_measured_again(timed, tmp_path):
    (tmp_path / "channels_last.json").write_text("{not json")
    assert memory_format.use_channels_last("auto", torch.device("cpu")) is True
    assert timed == [False, True]


@pytest.mark.parametrize("value", ["maybe", "1", "null", "AUTO"])
def test_channels_last_accepts_true_false_or_auto_only(value):
    assert load_config().train.channels_last == "auto"
    with pytest.raises(ConfigError, match="train.channels_last"):
        load_config(overrides=[f"train.channels_last={value}"])


def test_the_layout_probe_leaves_the_callers_random_stream_alone():
    """The probe runs inside the first stage on a machine, after that stage seeded torch: reseeding there made the
    stage's data order and initial weights depend on whether the cache existed."""
    torch.manual_seed(3)
    before = torch.get_rng_state()
    memory_format.yardstick_step_seconds(False, steps=1)
    assert torch.equal(before, torch.get_rng_state())

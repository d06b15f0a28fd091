"""Outputs are whole or absent, and one run at a time holds an output folder (scalekd.outputs), locally and on S3."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest

from scalekd import outputs, storage


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3['bucket']}/outputs/{request.node.name.replace('[', '-').rstrip(']')}"


def test_a_second_run_on_a_held_output_is_refused_by_name(out):
    refused = pytest.raises(storage.StorageError, match=r"is held by another run \(stage teacher, process \d+")
    with outputs.held(out, "stage teacher"), refused, outputs.held(out, "stage warmup"):
        pass
    with outputs.held(out, "stage warmup"):  # released: free again
        pass
    assert not storage.exists(storage.join(out, outputs.LEASE_NAME))


def test_a_run_that_lost_its_lease_to_another_fails_naming_it_and_leaves_the_other_lease(out, monkeypatch):
    monkeypatch.setenv("SCALEKD_LEASE_S", "0.3")  # renewed every 0.1 s
    lease = storage.join(out, outputs.LEASE_NAME)
    other = {"host": "other-pod", "pid": 7, "what": "stage teacher", "since": 1.0, "renewed": time.time() + 3600}
    lost = pytest.raises(outputs.LeaseLost, match=r"another run \(stage teacher, process 7 on other-pod\)")
    with lost, outputs.held(out, "stage warmup"):
        storage.write_json(lease, other)  # the other run took it over as lapsed (this one had stalled)
        time.sleep(0.5)  # renewals meanwhile: none may overwrite the other's lease
    assert json.loads(storage.read_text(lease))["host"] == "other-pod"
    refused = pytest.raises(storage.StorageError, match="is held by another run")  # and it still holds the output
    with refused, outputs.held(out, "stage warmup"):
        pass


def test_a_lease_left_by_a_dead_process_or_never_renewed_is_taken_over(out, monkeypatch, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lease = storage.join(out, outputs.LEASE_NAME)
    storage.write_json(lease, {"host": socket.gethostname(), "pid": int(dead.stdout), "what": "stage teacher",
                               "since": 0, "renewed": time.time()})
    with outputs.held(out, "stage teacher"):
        pass
    assert "lapsed" in caplog.text
    storage.write_json(lease, {"host": "another-pod", "pid": 1, "what": "stage teacher", "since": 0,
                               "renewed": time.time() - 400})
    with outputs.held(out, "stage teacher"):  # not renewed for more than the lease (120 s)
        pass


@pytest.mark.integration
def test_a_stage_run_on_an_output_another_run_holds_is_refused_and_writes_nothing(tmp_path, synth_root):
    """Seeds 1 and 2 given the same --out: while one run holds the folder (here this test, renewing its lease from
    its own thread as a stage does), the command says who holds it instead of both exiting 0."""
    out = tmp_path / "teacher"
    env = {**os.environ, "SCALEKD_NO_PROGRESS": "1"}
    args = [sys.executable, "-m", "scalekd.cli", "train-teacher", "--preset", "tiny", "--data", synth_root,
            "--out", str(out), "--no-ray"]
    with outputs.held(str(out), "stage teacher"):
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "is held by another run (stage teacher" in second.stderr, second.stderr
        assert sorted(p.name for p in out.iterdir()) == [outputs.LEASE_NAME]
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)  # released: it runs
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["stage"] == "teacher"
    assert not (out / outputs.LEASE_NAME).exists()


def test_an_interrupted_whole_write_leaves_the_previous_output_as_it_was(out, monkeypatch):
    outputs.write_whole(out, {"model.onnx": b"old model", "model_card.json": b'{"v": "old"}'})
    real = storage.write_bytes

    def full_disk(uri, data):
        if uri.endswith("model_card.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(uri, data)

    monkeypatch.setattr(storage, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        outputs.write_whole(out, {"model.onnx": b"new model", "model_card.json": b'{"v": "new"}'})
    monkeypatch.setattr(storage, "write_bytes", real)
    if storage.is_s3(out):  # objects are written one by one: the missing manifest says it is not whole
        with pytest.raises(storage.StorageError, match="not whole"):
            outputs.check_whole(out)
    else:  # built aside: the old folder is untouched and nothing new is left beside it
        assert outputs.check_whole(out) == ["model.onnx", "model_card.json"]
        assert storage.read_bytes(storage.join(out, "model.onnx")) == b"old model"
        assert sorted(os.listdir(os.path.dirname(out))) == ["out"]
    outputs.write_whole(out, {"model.onnx": b"new model", "model_card.json": b'{"v": "new"}'})
    assert outputs.check_whole(out) == ["model.onnx", "model_card.json"]
    assert storage.read_bytes(storage.join(out, "model.onnx")) == b"new model"


def test_of_two_runs_that_both_saw_no_lease_on_s3_only_one_takes_it(s3, monkeypatch):
    """The race itself, made certain: both runs read "no lease"; the other run's write lands between our read and
    ours. The create-if-absent write (If-None-Match) then fails, and we read the winner and are refused."""
    out = f"s3://{s3['bucket']}/outputs/race"
    lease = storage.join(out, outputs.LEASE_NAME)
    real_read = storage.read_s3_with_etag
    calls = []

    def read_then_lose_the_race(uri):
        calls.append(uri)
        if len(calls) == 1:
            storage.write_json(lease, {"host": "other-pod", "pid": 7, "what": "stage teacher", "since": 1.0,
                                       "renewed": time.time()})
            return None  # what we saw before the other run wrote
        return real_read(uri)

    monkeypatch.setattr(storage, "read_s3_with_etag", read_then_lose_the_race)
    refused = pytest.raises(storage.StorageError, match=r"held by another run \(stage teacher, process 7 on other-pod")
    with refused, outputs.held(out, "stage warmup"):
        pass
    assert json.loads(storage.read_text(lease))["host"] == "other-pod"  # theirs, not overwritten


def test_a_lapsed_s3_lease_is_replaced_only_if_it_is_still_the_one_read(s3, monkeypatch):
    out = f"s3://{s3['bucket']}/outputs/takeover"
    lease = storage.join(out, outputs.LEASE_NAME)
    storage.write_json(lease, {"host": "gone-pod", "pid": 1, "what": "stage teacher", "since": 0.0, "renewed": 0.0})
    real_write = storage.write_s3_if
    raced = []

    def another_takes_it_first(uri, data, etag):
        if not raced:  # a second run replaced the lapsed lease after we read it
            raced.append(True)
            storage.write_json(lease, {"host": "fast-pod", "pid": 2, "what": "stage teacher", "since": 2.0,
                                       "renewed": time.time()})
        return real_write(uri, data, etag)

    monkeypatch.setattr(storage, "write_s3_if", another_takes_it_first)
    with pytest.raises(storage.StorageError, match="process 2 on fast-pod"), outputs.held(out, "stage warmup"):
        pass

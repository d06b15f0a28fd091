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

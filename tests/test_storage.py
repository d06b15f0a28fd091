import json
import os

import pytest

from scalekd import storage


def test_local_atomic_write_keeps_old_content_when_a_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "a" / "model.pt"
    storage.write_bytes(str(target), b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        storage.write_bytes(str(target), b"new" * 1000)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert os.listdir(target.parent) == ["model.pt"]  # no half-written temp file left behind


def test_local_read_missing_file_names_it(tmp_path):
    with pytest.raises(storage.StorageError, match="missing.json: no such file"):
        storage.read_bytes(str(tmp_path / "missing.json"))


def test_s3_round_trip_list_exists_delete(s3):
    base = f"s3://{s3['bucket']}/roundtrip"
    storage.write_bytes(f"{base}/x/1.bin", b"one")
    storage.write_text(f"{base}/x/2.txt", "two")
    assert storage.read_bytes(f"{base}/x/1.bin") == b"one"
    assert storage.read_text(f"{base}/x/2.txt") == "two"
    assert list(storage.list_uris(base)) == [f"{base}/x/1.bin", f"{base}/x/2.txt"]
    assert storage.exists(f"{base}/x/1.bin") and not storage.exists(f"{base}/x/3.bin")
    storage.delete(f"{base}/x/1.bin")
    assert not storage.exists(f"{base}/x/1.bin")


def test_s3_cache_is_validated_by_size_and_etag(s3):
    uri = f"s3://{s3['bucket']}/cache/obj.bin"
    storage.write_bytes(uri, b"first version")
    path = storage.cached_path(uri)
    assert open(path, "rb").read() == b"first version"
    storage.write_bytes(uri, b"second, longer version")
    assert storage.read_bytes(uri, cache=True) == b"second, longer version"


def test_s3_upload_dir_mirrors_a_folder_tree(s3, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    storage.upload_dir(str(src), f"s3://{s3['bucket']}/dirs/run1")
    prefix = f"s3://{s3['bucket']}/dirs/run1"
    assert sorted(storage.list_uris(prefix)) == [f"{prefix}/a.txt", f"{prefix}/sub/b.txt"]
    assert storage.read_text(f"{prefix}/sub/b.txt") == "b"


def test_s3_missing_key_and_bucket_errors(s3):
    with pytest.raises(storage.StorageError, match="no such object") as err:
        storage.read_bytes(f"s3://{s3['bucket']}/nope/missing.json")
    assert "s3://scalekd-test/nope/missing.json" in str(err.value)
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.read_bytes("s3://no-such-bucket/x.json")


def test_wrong_credentials_are_named_without_printing_the_secret(s3, monkeypatch):
    storage.write_text(f"s3://{s3['bucket']}/creds/ok.txt", "ok")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    storage.configure()
    with pytest.raises(storage.StorageError, match="rejected the credentials") as err:
        storage.read_text(f"s3://{s3['bucket']}/creds/ok.txt")
    assert "definitely-wrong-secret" not in str(err.value) and s3["secret"] not in str(err.value)


@pytest.mark.parametrize("userinfo", ["", "user:hunter2secret@"])
def test_unreachable_endpoint_is_named_without_its_credentials(monkeypatch, userinfo):
    from tests.s3server import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{userinfo}127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage.configure()
    with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint") as err:
        storage.read_bytes("s3://bucket/key.json")
    storage.configure()
    assert "hunter2secret" not in str(err.value)
    assert "http://127.0.0.1:" in str(err.value)  # the credentials were taken out of the URL at the edge


@pytest.mark.parametrize("uri", ["s4://probe/ann.json", "S3://bucket/key", "http://host/x.json", "gs://b/k",
                                 "s3:/bucket/x", "s3:bucket/x", "s3:///key", "s3://", "file:///tmp/x", "file:x",
                                 " s3://b/k", "s3://b/k ", "runs/out\n", "\truns/out"])
def test_anything_that_looks_like_a_uri_but_is_not_one_is_refused_not_written_locally(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(storage.StorageError, match="use s3://bucket/key or a local path"):
        storage.write_text(uri, "{}")
    with pytest.raises(storage.StorageError, match="use s3://bucket/key or a local path"):
        storage.read_text(uri)
    assert not any(tmp_path.iterdir())  # nothing written under a folder named like the scheme


@pytest.mark.parametrize("uri, s3", [("s3://bucket", True), ("s3://bucket/k/x.json", True), ("runs/x", False),
                                     ("/abs/path", False), ("./a:b", False), ("", False)])
def test_the_accepted_forms(uri, s3):
    assert storage.is_s3(uri) is s3


def test_synth_refuses_a_malformed_s3_uri_before_writing_anything(tmp_path, monkeypatch, capsys):
    from scalekd.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["data", "synth", "s3:/bucket/x", "--images", "2"]) == 2
    err = capsys.readouterr().err
    assert "s3:/bucket/x" in err and "use s3://bucket/key or a local path" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("url", ["http://key:Sup3r@Secret@host:9000/x", "http://key:p%40ss@host", "http://u@host"])
def test_credentials_are_redacted_whole_even_with_an_at_sign_inside(url):
    redacted = storage.redact(url)
    assert redacted.startswith("http://***@host") and "Sup3r" not in redacted and "Secret" not in redacted


@pytest.mark.parametrize("url, clean, key, secret", [
    ("http://key:Sup3r@Secret@host:9000/x", "http://host:9000/x", "key", "Sup3r@Secret"),
    ("https://k%40y:p%2Fss@minio.example.com", "https://minio.example.com", "k@y", "p/ss"),
    ("http://host:9000", "http://host:9000", None, None)])
def test_an_endpoint_is_split_once_into_a_clean_url_and_credentials(url, clean, key, secret):
    got, credentials = storage.split_credentials(url)
    assert got == clean and (credentials == (key, secret) if key else credentials is None)


def _forget_keys(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


def test_a_config_endpoint_keeps_the_clean_url_and_the_credentials_only_in_memory(monkeypatch):
    from scalekd.config import load_config

    _forget_keys(monkeypatch)
    cfg = load_config(preset="tiny", overrides=["storage.endpoint_url=http://admin:PW@x@host:9000"])
    assert cfg.storage.endpoint_url == "http://host:9000" and "PW@x" not in cfg.to_yaml()
    assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]) == ("admin", "PW@x")


def test_the_environment_endpoint_is_cleaned_before_a_ray_job_or_library_reads_it(monkeypatch):
    from scalekd.train.ray_runner import job_runtime_env

    _forget_keys(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://key:Sup3r@Secret@host:9000")
    storage.adopt_environment()
    env = job_runtime_env()["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == "http://host:9000" and "Sup3r" not in json.dumps(env)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "Sup3r@Secret"


def test_credentials_in_a_ray_address_are_refused_without_being_shown():
    from scalekd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN") as info:
        load_config(preset="tiny", overrides=["scaling.ray_address=http://u:Hunter2@head:8265"])
    assert "Hunter2" not in str(info.value)


def test_every_log_record_has_its_credentials_redacted(caplog):
    import logging

    record = logging.LogRecord("botocore", logging.DEBUG, "x", 1, "endpoint %s", ("http://k:Sup3r@Secret@h",), None)
    storage.RedactingFilter().filter(record)
    assert record.getMessage() == "endpoint http://***@h"


def test_json_we_write_never_holds_nan(tmp_path):
    path = tmp_path / "m.json"
    storage.write_json(str(path), {"AP": float("nan"), "rows": [float("inf"), 1.5], "ok": 2})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"AP": None, "rows": [None, 1.5], "ok": 2}


@pytest.mark.integration
def test_an_endpoint_that_never_answers_fails_within_the_budget_logging_each_retry(monkeypatch, caplog):
    import logging
    import socket
    import time

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts connections (the kernel does), never answers
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
        monkeypatch.setenv("SCALEKD_S3_READ_TIMEOUT", "0.5")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
        monkeypatch.setenv("SCALEKD_S3_BUDGET_S", "10")
        storage.configure()
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="scalekd.storage"), \
                pytest.raises(storage.StorageError, match="did not answer \\(3 attempts"):
            storage.read_bytes("s3://bucket/key.json")
        assert time.monotonic() - started < 8  # 3 x 0.5 s reads + 0.5 + 1 s backoff, not 390 s
        retries = [r for r in caplog.records if "retrying" in r.getMessage()]
        assert len(retries) == 2 and all("s3://bucket/key.json" in r.getMessage() for r in retries)
    finally:
        silent.close()
        storage.configure()


def _trickling_server(what: str):
    """A loopback HTTP server that answers 200 and then trickles: one header line, or one body byte, every 0.3 s
    (each wait is far under the read timeout, so only a deadline on the whole transfer ends it)."""
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def serve(conn):
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            if what == "body":  # an S3 server's answer (x-amz- headers) whose body never ends
                conn.sendall(b"x-amz-request-id: 1\r\nContent-Length: 1000000\r\n\r\n")
            while True:
                time.sleep(0.3)
                conn.sendall(b"x" if what == "body" else b"X-Slow: 1\r\n")
        except OSError:
            pass

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server


@pytest.mark.integration
@pytest.mark.parametrize("what", ["headers", "body"])
@pytest.mark.parametrize("call", ["read_bytes", "cached_path", "write_bytes"])
def test_a_trickling_endpoint_is_given_up_at_the_budget_naming_the_uri(monkeypatch, what, call):
    import time

    server = _trickling_server(what)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
        monkeypatch.setenv("SCALEKD_S3_BUDGET_S", "2")
        storage.configure()
        started = time.monotonic()
        with pytest.raises(storage.StorageError, match=r"s3://bucket/slow.bin: the S3 transfer did not finish "
                                                       r"within [23] s \(SCALEKD_S3_BUDGET_S"):
            args = (b"data",) if call == "write_bytes" else ()
            getattr(storage, call)("s3://bucket/slow.bin", *args)
        assert time.monotonic() - started < 5  # 2 s, plus 1 s for the 1 MB the body claims
    finally:
        server.close()
        storage.configure()


def test_bad_timeout_settings_are_named(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SCALEKD_S3_READ_TIMEOUT", "soon")
    storage.configure()
    with pytest.raises(storage.StorageError, match="SCALEKD_S3_READ_TIMEOUT"):
        storage.read_bytes("s3://bucket/key.json")
    storage.configure()


def test_files_we_write_get_the_ordinary_umask_mode_not_0600(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    storage.write_text(str(tmp_path / "a.json"), "{}")
    (tmp_path / "src").write_text("x")
    storage.upload_file(str(tmp_path / "src"), str(tmp_path / "b" / "copy"))
    for path in (tmp_path / "a.json", tmp_path / "b" / "copy"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


def test_a_web_server_at_the_endpoint_is_named_not_blamed_on_the_file(monkeypatch):
    """A wrong port that serves a web page answers 200 with HTML; the JSON reader must not call it a bad file."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html><body>Sign in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
        storage.configure()
        with pytest.raises(storage.StorageError, match=r"answered like a web server, not S3 \(text/html"):
            storage.read_text("s3://bucket/annotations/instances_train.json")
    finally:
        server.shutdown()
        storage.configure()

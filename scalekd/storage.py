"""URIs for every artifact: local paths and ``s3://bucket/key`` on any S3-compatible endpoint.

Writes are atomic: a local file is written beside its target and renamed over it; an S3 object is
visible only once its PUT (or multipart upload) completes. Reads of S3 objects can go through a local
cache that is validated against the object's size and ETag on every read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

_settings = {"endpoint_url": "", "region": ""}
_clients: dict = {}
_lock = threading.Lock()


class StorageError(RuntimeError):
    """An artifact could not be read or written; the message names the URI and what to do."""


class NoSuchObject(StorageError):
    """The S3 object (or key) is not there."""


class PreconditionFailed(StorageError):
    """A conditional S3 write found the object other than the condition said (created, or changed, meanwhile)."""


def configure(endpoint_url: str = "", region: str = "") -> None:
    """Set the S3 endpoint used when AWS_ENDPOINT_URL is not set (from the config's storage section; credentials
    in it are adopted, see ``adopt_endpoint``)."""
    _settings.update(endpoint_url=adopt_endpoint(endpoint_url), region=region)
    _clients.clear()


# Anything that starts like a scheme ("s3:", "file:", "S3:") is a URI, never a local path.
_SCHEME_LIKE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_S3 = re.compile(r"^s3://[^/\s]+(/|$)")
# userinfo runs to the last "@" before the host: a password may hold "@" itself.
_CREDENTIALS = re.compile(r"(?<=://)[^/\s]*@")


def is_s3(uri: str) -> bool:
    """The one URI parser: True for ``s3://bucket[/key]``, False for a local path. Everything else that looks like
    either is refused with the accepted forms named, never written as a local folder named after it: other schemes
    (``S3://``, ``s4://``, ``file:``), malformed ``s3:`` forms (``s3:/b``, ``s3:b``, ``s3:///k``, ``s3://``), and
    leading or trailing whitespace."""
    if uri != uri.strip():
        raise StorageError(f"{redact(uri)!r}: leading or trailing whitespace; {_ACCEPTED}")
    match = _SCHEME_LIKE.match(uri)
    if match is None:
        return False
    if _S3.match(uri):
        return True
    scheme = match.group(1)
    if scheme == "s3":
        raise StorageError(f"{redact(uri)}: not an S3 URI (no bucket after s3://); {_ACCEPTED}")
    hint = " (the scheme is lower-case: s3://)" if scheme.lower() == "s3" else ""
    raise StorageError(f"{redact(uri)}: unsupported URI scheme '{scheme}:'{hint}; {_ACCEPTED}")


_ACCEPTED = "use s3://bucket/key or a local path (./name for a local name with a colon)"


def finite(obj):
    """``obj`` with every NaN or infinite float replaced by None (JSON has no NaN; we never write one)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = None) -> str:
    """Strict JSON of ``obj``: non-finite numbers become null (``finite``), never NaN/Infinity."""
    return json.dumps(finite(obj), indent=indent, allow_nan=False) + "\n"


def redact(url: str) -> str:
    """``url`` with any ``user:password@`` part replaced by ``***@``: for every URL we print or log."""
    return _CREDENTIALS.sub("***@", url)


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """The one parser of an endpoint's user-info: (the URL without it, (access key, secret) or None). The
    user-info runs to the last "@" before the path, so a password may hold "@"; both parts are %-decoded."""
    from urllib.parse import unquote

    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/\s]*)@(.*)$", url)
    if match is None:
        return url, None
    key, _, secret = match.group(2).partition(":")
    return match.group(1) + match.group(3), (unquote(key), unquote(secret))


def adopt_endpoint(url: str) -> str:
    """``url`` without its credentials, which go to this process's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (in
    memory: child processes such as a local Ray's workers inherit them, nothing writes them). The edge where an
    endpoint enters (the CLI, the config) calls this once, so configs, models, cards, summaries, Ray job
    environments and log lines only ever see the clean URL. Credentials in the URL win over the variables."""
    clean, credentials = split_credentials(url)
    if credentials is not None:
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = credentials
        _clients.clear()
    return clean


def adopt_environment() -> None:
    """AWS_ENDPOINT_URL with credentials in it becomes the clean URL plus the two key variables, before any
    library (botocore logs the variables it reads at DEBUG) or child process sees it."""
    url = os.environ.get("AWS_ENDPOINT_URL", "")
    if url and split_credentials(url)[1] is not None:
        os.environ["AWS_ENDPOINT_URL"] = adopt_endpoint(url)


class RedactingFilter(logging.Filter):
    """Belt and braces for every log record (ours and the libraries'): credentials in a URL become ``***@``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _CREDENTIALS.search(message):
            record.msg, record.args = redact(message), None
        return True


def absolute(uri: str) -> str:
    """A local path made absolute (s3:// URIs and "" unchanged): for work handed to processes that run in
    another working directory (Ray Train workers, Ray Tune trials)."""
    return uri if not uri or is_s3(uri) else os.path.abspath(uri)


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


@dataclass(frozen=True)
class S3Path:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Path:
        rest = uri[len("s3://"):]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise StorageError(f"{uri}: an S3 URI needs a bucket, like s3://bucket/key")
        return cls(bucket, key)


def _endpoint() -> str | None:
    adopt_environment()
    return os.environ.get("AWS_ENDPOINT_URL") or _settings["endpoint_url"] or None


def _client():
    endpoint = _endpoint()
    key = (endpoint, os.environ.get("AWS_ACCESS_KEY_ID"), _settings["region"])
    with _lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config as BotoConfig

            # One attempt per call here: _s3_call retries, logs each retry and keeps to a total time budget.
            boto_cfg = BotoConfig(retries={"max_attempts": 1, "mode": "standard"},
                                  connect_timeout=_env_number("SCALEKD_S3_CONNECT_TIMEOUT", 5.0),
                                  read_timeout=_env_number("SCALEKD_S3_READ_TIMEOUT", 20.0),
                                  s3={"addressing_style": "path"})
            region = _settings["region"] or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            # A fresh session each time: the default one caches credentials read from the environment.
            session = boto3.session.Session()
            _clients[key] = session.client("s3", endpoint_url=endpoint, region_name=region, config=boto_cfg)
        return _clients[key]


def arrow_filesystem():
    """A pyarrow S3 filesystem on the same endpoint and timeouts as our boto3 client, credentials from the
    environment: Ray Train's and Ray Tune's ``RunConfig(storage_filesystem=...)`` for any S3-compatible server."""
    from urllib.parse import urlparse

    from pyarrow import fs

    kwargs: dict = {"region": _settings["region"] or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                    "connect_timeout": _env_number("SCALEKD_S3_CONNECT_TIMEOUT", 5.0),
                    "request_timeout": _env_number("SCALEKD_S3_READ_TIMEOUT", 20.0),
                    "retry_strategy": fs.AwsStandardS3RetryStrategy(
                        max_attempts=int(_env_number("AWS_MAX_ATTEMPTS", 5, "number of attempts")))}
    endpoint = _endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc.rsplit("@", 1)[-1], scheme=parsed.scheme or "https",
                      force_virtual_addressing=False)
    # No keys passed in: Ray pickles this filesystem into the state it writes to the bucket (tuner.pkl, the search's
    # state files), so it reads them from each node's environment (the AWS default chain) instead.
    return fs.S3FileSystem(**kwargs)


def _s3_error(uri: str, exc: Exception, attempts: int = 1, elapsed: float = 0.0) -> StorageError:
    """Turn a boto error into one sentence naming the URI and the fix (never the credentials)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

    if isinstance(exc, ReadTimeoutError):
        return StorageError(f"{uri}: the S3 endpoint {redact(_endpoint() or '(AWS default)')} accepted the "
                            f"connection but did not answer ({attempts} attempts, {elapsed:.0f} s); check the "
                            "server, or raise SCALEKD_S3_READ_TIMEOUT / SCALEKD_S3_BUDGET_S")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{uri}: cannot reach the S3 endpoint {redact(_endpoint() or '(AWS default)')}; "
                            "check AWS_ENDPOINT_URL / storage.endpoint_url and that the server is up")
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            return NoSuchObject(f"{uri}: no such object; check the path, or run the stage that writes it")
        if code == "NoSuchBucket":
            bucket = S3Path.parse(uri).bucket
            return StorageError(f"{uri}: bucket '{bucket}' does not exist; create it or fix the URI")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
            return StorageError(f"{uri}: the S3 server rejected the credentials ({code}); check "
                                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's policy")
        if code in ("PreconditionFailed", "412"):
            return PreconditionFailed(f"{uri}: changed by another writer since it was read (S3 {code})")
        return StorageError(f"{uri}: S3 error {code}: {exc.response.get('Error', {}).get('Message', '')}")
    return StorageError(f"{uri}: {type(exc).__name__}: {redact(str(exc))}")


def _env_number(name: str, default: float, what: str = "number of seconds") -> float:
    """A positive finite number from the environment (a timeout, budget or attempt count), else ``default``."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise StorageError(f"{name}={raw!r}: expected a positive {what}") from None
    if not (math.isfinite(value) and value > 0):
        raise StorageError(f"{name}={raw!r}: expected a positive {what}")
    return value


def _transient(exc: Exception) -> bool:
    """Worth another attempt: the network or an overloaded server, not a wrong key, bucket or credential."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout", "InternalError")
    return isinstance(exc, (ConnectionError, HTTPClientError))


def _s3_call(uri: str, fn, *, transfer_bytes: int = 0, **kwargs):
    """``fn(**kwargs)`` with bounded retries: up to AWS_MAX_ATTEMPTS (5) attempts with exponential backoff, all
    within SCALEKD_S3_BUDGET_S (60 s) of the first, plus one second per SCALEKD_S3_MIN_RATE bytes (1 MB) of a
    transfer of known size, so that a large model is not cut off on a slow but working link; each retry logged at
    INFO with the URI (connect and read timeouts: SCALEKD_S3_CONNECT_TIMEOUT 5 s, SCALEKD_S3_READ_TIMEOUT 20 s).
    Then a StorageError naming both."""
    from botocore.exceptions import BotoCoreError, ClientError

    attempts = max(1, int(_env_number("AWS_MAX_ATTEMPTS", 5, "number of attempts")))
    budget = _env_number("SCALEKD_S3_BUDGET_S", 60.0) + \
        transfer_bytes / _env_number("SCALEKD_S3_MIN_RATE", 1e6, "number of bytes per second")
    started = time.monotonic()
    last_error = None
    for attempt in range(1, attempts + 1):
        try:
            return _by_deadline(uri, started + budget, budget, lambda: fn(**kwargs))
        except _DeadlineExpired as expired:  # an earlier attempt's error says more than "too slow"
            raise (_s3_error(uri, last_error, attempt, time.monotonic() - started) if last_error is not None
                   else expired) from None
        except (ClientError, BotoCoreError) as exc:
            last_error = exc
            elapsed = time.monotonic() - started
            delay = min(0.5 * 2 ** (attempt - 1), 8.0)
            if not _transient(exc) or attempt == attempts or elapsed + delay >= budget:
                raise _s3_error(uri, exc, attempt, elapsed) from None
            log.info("S3 %s: %s on attempt %d/%d; retrying in %.1f s (%.0f s of the %.0f s budget used)", uri,
                     type(exc).__name__, attempt, attempts, delay, elapsed, budget)
            time.sleep(delay)
    raise AssertionError("unreachable")


class _DeadlineExpired(StorageError):
    """The total time budget ran out during an attempt."""


def _by_deadline(uri: str, deadline: float, budget: float, fn):
    """``fn()`` in a helper thread, given up at ``deadline``. Socket timeouts bound each wait for a byte, not a
    transfer: a server that trickles a header line or a byte every few seconds would hold a call for ever. The
    abandoned thread is a daemon; its client is dropped so that later calls get fresh connections."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="scalekd-s3", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    if worker.is_alive():
        with _lock:
            _clients.clear()
        endpoint = redact(_endpoint() or "(AWS default)")
        raise _DeadlineExpired(
            f"{uri}: the S3 transfer did not finish within {budget:.3g} s (SCALEKD_S3_BUDGET_S, plus 1 s per "
            f"SCALEKD_S3_MIN_RATE bytes of a transfer of known size); the endpoint {endpoint} is answering too "
            "slowly or not at all; check the server, or raise those for a slow link")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def read_bytes(uri: str, cache: bool = False) -> bytes:
    if is_s3(uri):
        if cache:
            with open(cached_path(uri), "rb") as f:
                return f.read()
        p = S3Path.parse(uri)
        client = _client()  # the body is read inside the retried call: a stalled read is retried too
        return _s3_call(uri, lambda: _s3_body(uri, client.get_object(Bucket=p.bucket, Key=p.key)))
    with open(regular_file(uri), "rb") as f:
        return f.read()


def read_s3_with_etag(uri: str) -> tuple[bytes, str] | None:
    """An S3 object's bytes and ETag (for a conditional write back), or None when there is none."""
    p = S3Path.parse(uri)
    client = _client()
    try:
        return _s3_call(uri, lambda: (lambda r: (_s3_body(uri, r), r["ETag"]))(
            client.get_object(Bucket=p.bucket, Key=p.key)))
    except NoSuchObject:
        return None


def write_s3_if(uri: str, data: bytes, etag: str | None) -> str:
    """Write an S3 object only if it still has ``etag``, or (None) does not exist yet; its new ETag.
    PreconditionFailed when another writer came first. A server without conditional writes ignores the condition:
    callers that depend on it read back what they wrote."""
    p = S3Path.parse(uri)
    condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    response = _s3_call(uri, _client().put_object, transfer_bytes=len(data), Bucket=p.bucket, Key=p.key, Body=data,
                        **condition)
    return response["ETag"]


def _s3_body(uri: str, response: dict) -> bytes:
    """The object's bytes, once its answer is known to come from an S3 server: a web server at the endpoint (a
    wrong port, a login page) answers 200 with HTML, which would otherwise be blamed on the file we read."""
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    if not any(name.lower().startswith("x-amz-") for name in headers):
        kind = headers.get("content-type", "no content type")
        raise StorageError(f"{uri}: the endpoint {redact(_endpoint() or '(AWS default)')} answered like a web server, "
                           f"not S3 ({kind}, no x-amz- headers); check AWS_ENDPOINT_URL / storage.endpoint_url")
    return response["Body"].read()


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def regular_file(path: str) -> str:
    """``path``, once known to be a regular file: every local read goes through here, so a FIFO (which would block
    for ever), a device (endless) or a folder is refused by name before it is opened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise StorageError(f"{path}: no such file; check the path, or run the stage that writes it") from None
    except NotADirectoryError:
        raise StorageError(f"{path}: a parent of this path is a file, not a folder") from None
    for test, kind in _KINDS:
        if test(mode):
            raise StorageError(f"{path}: is {kind}, not a regular file; give a file")
    return path


def read_text(uri: str) -> str:
    """UTF-8 text (a leading byte-order mark is dropped); other encodings are refused naming the file and the byte."""
    data = read_bytes(uri)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        hint = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise StorageError(f"{uri}: not UTF-8 text{hint}: byte {exc.start} is {data[exc.start:exc.start + 1]!r}; "
                           "save it as UTF-8") from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The mode an ordinary open() would give: mkstemp's 0600 would keep a serving pod running as another user from
# reading the models and exports we write.
_FILE_MODE = 0o666 & ~_umask()


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old content or the new, never a part."""
    if is_s3(uri):
        p = S3Path.parse(uri)
        _s3_call(uri, _client().put_object, transfer_bytes=len(data), Bucket=p.bucket, Key=p.key, Body=data)
        return
    if os.path.isdir(uri):
        raise StorageError(f"{uri}: is a folder; give a file path to write")
    directory = os.path.dirname(os.path.abspath(uri))
    try:
        os.makedirs(directory, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StorageError(f"{uri}: a parent of this path is a file, not a folder") from None
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, uri)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj) -> None:
    write_text(uri, json_text(obj, indent=2))


def upload_file(local_path: str, uri: str) -> None:
    """Copy a local file to ``uri`` atomically (multipart for large files on S3)."""
    if is_s3(uri):
        p = S3Path.parse(uri)
        _s3_call(uri, _client().upload_file, transfer_bytes=os.path.getsize(local_path), Filename=local_path,
                 Bucket=p.bucket, Key=p.key)
        return
    if os.path.abspath(local_path) == os.path.abspath(uri):
        return
    directory = os.path.dirname(os.path.abspath(uri))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        os.chmod(tmp, _FILE_MODE)
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, uri)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def exists(uri: str) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        p = S3Path.parse(uri)
        try:
            _client().head_object(Bucket=p.bucket, Key=p.key)
            return True
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _s3_error(uri, exc) from None
    return os.path.exists(uri)


def list_uris(prefix: str) -> Iterator[str]:
    """Every object (or file, recursively) under ``prefix``, sorted."""
    if is_s3(prefix):
        p = S3Path.parse(prefix)
        key_prefix = p.key.rstrip("/") + "/" if p.key else ""
        paginator = _client().get_paginator("list_objects_v2")
        out = []
        pages = _s3_call(prefix, lambda: list(paginator.paginate(Bucket=p.bucket, Prefix=key_prefix)))
        for page in pages:
            out += [f"s3://{p.bucket}/{o['Key']}" for o in page.get("Contents", [])]
        yield from sorted(out)
        return
    if not os.path.isdir(prefix):
        return
    found = []
    for root, _, files in os.walk(prefix):
        found += [os.path.join(root, f) for f in files if not f.startswith(".tmp-")]
    yield from sorted(found)


def delete(uri: str) -> None:
    if is_s3(uri):
        p = S3Path.parse(uri)
        _s3_call(uri, _client().delete_object, Bucket=p.bucket, Key=p.key)
    elif os.path.exists(uri):
        os.remove(uri)


def cache_dir() -> str:
    return os.environ.get("SCALEKD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "scalekd")


def cached_path(uri: str) -> str:
    """A local path holding ``uri``'s bytes; S3 objects are cached, checked by size and ETag."""
    if not is_s3(uri):
        if not os.path.exists(uri):
            raise StorageError(f"{uri}: no such file; check the path")
        return uri
    p = S3Path.parse(uri)
    head = _s3_call(uri, _client().head_object, Bucket=p.bucket, Key=p.key)
    size, etag = int(head["ContentLength"]), str(head.get("ETag", "")).strip('"')
    endpoint_tag = hashlib.sha1((_endpoint() or "aws").encode()).hexdigest()[:8]
    local = os.path.join(cache_dir(), "s3", endpoint_tag, p.bucket, p.key)
    meta_path = local + ".meta.json"
    if os.path.exists(local) and os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("size") == size and meta.get("etag") == etag and os.path.getsize(local) == size:
                return local
        except (OSError, ValueError):
            pass
    body = _s3_call(uri, lambda: _s3_body(uri, _client().get_object(Bucket=p.bucket, Key=p.key)),
                    transfer_bytes=size)
    write_bytes(local, body)
    write_text(meta_path, json.dumps({"size": size, "etag": etag}))
    return local


def upload_dir(local_dir: str, prefix: str) -> None:
    for path in list_uris(local_dir):
        upload_file(path, join(prefix, os.path.relpath(path, local_dir)))

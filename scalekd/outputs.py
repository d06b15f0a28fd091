"""An output folder is held by one run at a time, and a multi-file output is whole or absent.

Two runs given the same ``--out`` (seeds 1 and 2 by mistake) used to both exit 0 while the folder held one of them;
an export that ran out of disk half-way left a new model beside the old card. Here:

- ``held(out)``: a lease file ``OUT/.scalekd-lease.json`` (local or S3) naming the holder (host, process, what it
  runs); a second run is refused by name. The holder renews it every ``lease_s / 3`` seconds from a daemon thread, so
  a lease left by a crashed run lapses after ``lease_s`` (default 120 s, ``SCALEKD_LEASE_S``), at once when its
  process is gone from this host, and a retried pod (another host name) waits at most one lease.
- ``write_whole(out, files)``: locally, the files are written into a folder beside ``out`` and swapped in by two
  renames (the old folder is kept until the new one is in place); on S3, every object is written and then
  ``manifest.json`` last, naming each file with its size and SHA-256: a reader that finds the manifest missing or
  disagreeing knows the export is not whole (``check_whole``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

from scalekd import storage

log = logging.getLogger(__name__)
LEASE_NAME = ".scalekd-lease.json"
MANIFEST = "manifest.json"


def _lease_seconds() -> float:
    return storage._env_number("SCALEKD_LEASE_S", 120.0)


class LeaseLost(storage.StorageError):
    """Another run took over an output while this run held it."""


@contextlib.contextmanager
def held(out: str, what: str) -> Iterator[None]:
    """Hold ``out`` for this run (``what``: e.g. "stage teacher") or refuse with who holds it. A run that stalled
    past its lease may find another run took the output over as lapsed: it then fails at the end (LeaseLost,
    naming the other run) instead of exiting 0, and leaves the other run's lease in place."""
    uri = storage.join(out, LEASE_NAME)
    lease_s = _lease_seconds()
    me = {"host": socket.gethostname(), "pid": os.getpid(), "what": what, "since": time.time()}
    _take(out, uri, me, lease_s)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(uri, me, lease_s, stop), name="scalekd-lease", daemon=True)
    renewer.start()
    other = None
    try:
        yield
    finally:
        stop.set()
        renewer.join(timeout=5)
        other = _other_holder(uri, me)
        if other is None:
            with contextlib.suppress(storage.StorageError, OSError):
                storage.delete(uri)
    if other is not None:
        raise LeaseLost(f"{out}: another run ({other.get('what')}, process {other.get('pid')} on "
                        f"{other.get('host')}) took this output over while this run held it (this run had not "
                        f"renewed its lease within {lease_s:g} s, SCALEKD_LEASE_S); the two runs' files may be "
                        "mixed: check the output, or run again with another --out")


def _other_holder(uri: str, me: dict) -> dict | None:
    """The lease's holder when it names another run; None when it is ours, absent or unreadable."""
    try:
        holder = _read(uri)
    except (storage.StorageError, OSError):
        return None
    if holder is None or "host" not in holder or _is(holder, me):
        return None
    return holder


def _take(out: str, uri: str, me: dict, lease_s: float) -> None:
    if storage.is_s3(uri):
        return _take_s3(out, uri, me, lease_s)
    holder = _read(uri)
    _refuse_unless_lapsed(out, uri, holder, lease_s)
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    if holder is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(uri)
    try:  # O_EXCL: of two runs starting together, one creates the file and the other is refused
        fd = os.open(uri, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return _take(out, uri, me, lease_s)
    with os.fdopen(fd, "w") as f:
        json.dump({**me, "renewed": time.time()}, f)


def _take_s3(out: str, uri: str, me: dict, lease_s: float) -> None:
    """Create the lease only if there is none (If-None-Match), or replace a lapsed one only if it is still the one
    read (If-Match): of two runs starting together exactly one writes it, the other reads the winner and is refused."""
    current = storage.read_s3_with_etag(uri)
    holder = _parse(current[0]) if current is not None else None
    if current is not None and holder is not None and _is(holder, me):
        me["etag"] = current[1]  # a retried create that had succeeded: the lease is already ours
        return
    _refuse_unless_lapsed(out, uri, holder, lease_s)
    try:
        me["etag"] = storage.write_s3_if(uri, _lease_bytes(me), current[1] if current is not None else None)
    except storage.PreconditionFailed:
        return _take_s3(out, uri, me, lease_s)  # another run wrote it between our read and our write
    time.sleep(0.2)  # a server that ignores the conditions: the last writer wins, so check who did
    winner = _read(uri)
    if winner is None or not _is(winner, me):
        raise storage.StorageError(f"{uri}: another run took this output at the same moment; give another --out")


def _refuse_unless_lapsed(out: str, uri: str, holder: dict | None, lease_s: float) -> None:
    if holder is not None and not _lapsed(holder, lease_s):
        raise storage.StorageError(
            f"{out} is held by another run ({holder.get('what')}, process "
            f"{holder.get('pid')} on {holder.get('host')}, renewed {time.time() - holder.get('renewed', 0):.0f} s "
            f"ago); wait for it or give another --out. A lease nobody renews lapses after {lease_s:g} s "
            f"(SCALEKD_LEASE_S); to take it at once, delete {uri}")
    if holder is not None:
        log.warning("%s: taking over the lease of %s (process %s on %s), which lapsed", uri, holder.get("what"),
                    holder.get("pid"), holder.get("host"))


def _is(holder: dict, me: dict) -> bool:
    return (holder.get("host"), holder.get("pid"), holder.get("since")) == (me["host"], me["pid"], me["since"])


def _lease_bytes(me: dict) -> bytes:
    return storage.json_text({k: v for k, v in me.items() if k != "etag"} | {"renewed": time.time()}).encode()


def _parse(data: bytes) -> dict:
    try:
        holder = json.loads(data)
    except ValueError:
        holder = None
    return holder if isinstance(holder, dict) else {"what": "unreadable lease", "renewed": 0.0}


def _read(uri: str) -> dict | None:
    try:
        return _parse(storage.read_bytes(uri)) if storage.exists(uri) else None
    except storage.StorageError:
        return {"what": "unreadable lease", "renewed": 0.0}  # a torn or foreign file: lapsed


def _lapsed(holder: dict, lease_s: float) -> bool:
    if time.time() - float(holder.get("renewed", 0.0)) > lease_s:
        return True
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True  # its process is gone from this host
        except PermissionError:
            return False
    return False


def _renew(uri: str, me: dict, lease_s: float, stop: threading.Event) -> None:
    """Renew the lease while it is ours: a run that stalled past the lease may have lost it to another, which
    then keeps it (``held`` fails this run at the end)."""
    while not stop.wait(lease_s / 3):
        try:
            if storage.is_s3(uri):
                me["etag"] = storage.write_s3_if(uri, _lease_bytes(me), me.get("etag"))
            elif _other_holder(uri, me) is not None:
                raise storage.PreconditionFailed(uri)
            else:
                storage.write_json(uri, {**me, "renewed": time.time()})
        except storage.PreconditionFailed:
            log.error("%s: another run took over this output's lease after ours lapsed; this run no longer holds "
                      "it, its writes may mix with the other's, and it will fail at its end", uri)
            return
        except (storage.StorageError, OSError) as exc:  # the next renewal may succeed; the lease says how old it is
            log.warning("%s: could not renew the lease (%s)", uri, exc)


def write_whole(out: str, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> bytes) as the whole content of ``out``: readers see the old set or the new one."""
    if storage.is_s3(out):
        stale = set(storage.list_uris(out)) - {storage.join(out, n) for n in [*files, MANIFEST]}
        with contextlib.suppress(storage.StorageError):
            storage.delete(storage.join(out, MANIFEST))  # from here until the end, the output reads as not whole
        for name, data in files.items():
            storage.write_bytes(storage.join(out, name), data)
        for uri in sorted(stale):
            if not uri.endswith(LEASE_NAME):
                storage.delete(uri)
        storage.write_json(storage.join(out, MANIFEST), _manifest(files))
        return
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.new-", dir=parent)
    try:
        for name, data in {**files, MANIFEST: json.dumps(_manifest(files), indent=2).encode()}.items():
            storage.write_bytes(os.path.join(staging, name), data)
        os.chmod(staging, 0o777 & ~storage._umask())
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: str, out: str) -> None:
    lease = os.path.join(out, LEASE_NAME)
    if os.path.exists(lease):  # the run's own lease moves with the folder it guards
        os.replace(lease, os.path.join(staging, LEASE_NAME))
    old = None
    if os.path.exists(out):
        old = f"{staging}.old"
        os.rename(out, old)
    os.rename(staging, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _manifest(files: dict[str, bytes]) -> dict:
    return {"files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                      for name, data in sorted(files.items())}}


def check_whole(out: str) -> list[str]:
    """The files of a whole output (its manifest's names, each checked for size and digest); raises StorageError
    naming what is missing or differs."""
    try:
        manifest = json.loads(storage.read_text(storage.join(out, MANIFEST)))["files"]
    except (storage.StorageError, ValueError, KeyError):
        raise storage.StorageError(f"{out}: no valid {MANIFEST}; the output is not whole (written by an "
                                   "interrupted run?): write it again") from None
    for name, entry in manifest.items():
        data = storage.read_bytes(storage.join(out, name))
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise storage.StorageError(f"{storage.join(out, name)} is not the file {MANIFEST} names; the output "
                                       "is not whole: write it again")
    return sorted(manifest)

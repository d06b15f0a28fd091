"""No credential reaches a file or a log: the README's own-data chain, with the S3 credentials given only inside the
endpoint URL (the environment and the config), at -v, then every file it wrote and all it printed are searched."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.test_docs import _own_data_script, _yolo_split


def _written_files(s3, workdir: Path) -> dict[str, bytes]:
    """Every file under the working folder and every object in the bucket, by name."""
    files = {str(p): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    client = s3["client"]
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"]):
        for item in page.get("Contents", []):
            files[f"s3://{s3['bucket']}/{item['Key']}"] = client.get_object(Bucket=s3["bucket"],
                                                                             Key=item["Key"])["Body"].read()
    return files


def test_credentials_in_the_endpoint_url_reach_no_file_and_no_log_line(s3, synth_root, tmp_path):
    import json

    root = Path(synth_root)
    for split, name in (("train", "YOLO_TRAIN"), ("val", "YOLO_VAL")):
        _yolo_split(root / "annotations" / f"instances_{split}.json", root / "images", tmp_path / name)
    categories = json.loads((root / "annotations" / "instances_train.json").read_text())["categories"]
    (tmp_path / "classes.names").write_text("\n".join(c["name"] for c in categories) + "\n")
    host = s3["endpoint"].split("://", 1)[1]
    url = f"http://{s3['key']}:{s3['secret']}@{host}"
    script = _own_data_script(s3, tmp_path).replace("scalekd ", "scalekd -v ")
    # Its own prefix: the README quickstart's test writes the same run names to the same bucket.
    script = script.replace(f"s3://{s3['bucket']}/", f"s3://{s3['bucket']}/secrets-test/")
    for command in ("train-teacher", "warmup", "distill", "report"):
        script = script.replace(f"scalekd -v {command} ", f"scalekd -v {command} --set storage.endpoint_url={url} ")
    script += f"scalekd -v config --preset tiny --set storage.endpoint_url={url}\n"
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_ENDPOINT_URL=url, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               SCALEKD_NO_PROGRESS="1")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=600)
    # The credentials work only from the URL: nothing else here holds them, so a chain that ran used them.
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"endpoint_url: http://{host}" in proc.stdout
    secret = s3["secret"].encode()
    leaks = [name for name, data in _written_files(s3, tmp_path).items() if secret in data]
    assert not leaks, f"the secret is in {leaks}"
    for line in (proc.stdout + proc.stderr).splitlines():
        assert s3["secret"] not in line, line
    assert re.search(r"DEBUG (botocore|urllib3)", proc.stderr), "-v did not reach the libraries' debug logs"

"""Loader throughput: images/s decoded and dual-resolution collated from local disk, and from a real
SeaweedFS S3 server with and without the local cache, against what training consumes.

    python benchmarks/loader.py [--images 200] [--train-it-per-s 1.0 --batch 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import table, write_json
from scalekd import storage
from scalekd.data.coco import dataset_from_root
from scalekd.data.synth import ensure_synthetic
from scalekd.data.transforms import DualResolutionCollate
from tests.s3server import SeaweedS3


def throughput(root: str, images: int, cache: bool, batch: int) -> float:
    ds = dataset_from_root(root, "train", cache=cache)
    collate = DualResolutionCollate(128, 2.0, 1.667)
    n = min(images, len(ds))
    start = time.perf_counter()
    for i in range(0, n, batch):
        collate([ds[j] for j in range(i, min(n, i + batch))])
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--train-it-per-s", type=float, default=None,
                    help="training iterations/s to compare against (default: the demo's distill summary)")
    args = ap.parse_args()
    local = ensure_synthetic("runs/bench/synth256-loader", args.images + args.images // 4, seed=1, size=256)
    it_per_s = args.train_it_per_s
    summary = Path("runs/demo/distill-scalekd/summary.json")
    if it_per_s is None and summary.exists():
        import json

        it_per_s = json.loads(summary.read_text())["it_per_s"]
    rows, results = [], {}
    results["local"] = throughput(local, args.images, cache=False, batch=args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SCALEKD_CACHE_DIR"] = os.path.join(tmp, "cache")
        with SeaweedS3(Path(tmp) / "s3", "bench-key", "bench-secret-value", "bench") as endpoint:
            os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench-key",
                              AWS_SECRET_ACCESS_KEY="bench-secret-value")
            storage.configure()
            remote = "s3://bench/synth"
            storage.upload_dir(local, remote)
            results["s3_no_cache"] = throughput(remote, args.images, cache=False, batch=args.batch)
            results["s3_cache_cold"] = throughput(remote, args.images, cache=True, batch=args.batch)
            results["s3_cache_warm"] = throughput(remote, args.images, cache=True, batch=args.batch)
    consumed = it_per_s * args.batch if it_per_s else None
    for name, value in results.items():
        rows.append({"source": name, "images/s": f"{value:.1f}",
                     "x training need": f"{value / consumed:.1f}" if consumed else "n/a"})
    print(table(rows, ["source", "images/s", "x training need"]))
    if consumed:
        print(f"training consumes {consumed:.1f} images/s ({it_per_s:.2f} it/s x batch {args.batch}); "
              "target: loader >= 5x")
    print(write_json("loader.json", {"images_per_s": results, "training_images_per_s": consumed,
                                     "batch": args.batch}))


if __name__ == "__main__":
    main()

"""What a training stage does around its steps, as hooks the loop calls: the backbone freeze of the warm-up, metrics
(JSONL, TensorBoard, the orchestrator's report), the progress bar, checkpoints, and the tests' fault injection.

The loop (``train/loop.py``) only steps; each hook sees every step through ``before_step`` and ``after_step``. The
test-only faults are read from the environment once, when a stage builds its hooks, never in the loop itself.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable

from torch import nn

from scalekd import storage
from scalekd.data.transforms import DualBatch
from scalekd.models.detectors import backbone_parameters

FAULT_ENV = "SCALEKD_FAULT_AT_ITERATION"  # tests: the last worker dies after this iteration, once per output
POISON_ENV = "SCALEKD_POISON_AT_ITERATION"  # tests: this iteration's first image becomes NaN


class LoopHook:
    """Called by the loop on rank-local state; ``done`` counts finished iterations (iteration + 1)."""

    def before_step(self, iteration: int, batch: DualBatch) -> None:
        """Before the step of ``iteration`` (from 0) on its batch."""

    def after_step(self, done: int, terms: dict) -> None:
        """After the step (and the scheduler's) with the step's unweighted terms."""

    def after_train(self) -> None:
        """After the last iteration of this run."""


class MetricsLog:
    """JSONL (with each line's wall-clock time) and TensorBoard events, written locally and mirrored to the stage's
    output URI. A run resumed on another machine (a lost node) continues the S3 copy instead of replacing it."""

    def __init__(self, out: str, enabled: bool):
        self.out, self.enabled = out, enabled
        if not enabled:
            return
        self.local = out if not storage.is_s3(out) else tempfile.mkdtemp(prefix="scalekd-logs-")
        os.makedirs(self.local, exist_ok=True)
        self.jsonl_path = os.path.join(self.local, "metrics.jsonl")
        remote = storage.join(out, "metrics.jsonl")
        if storage.is_s3(out) and storage.exists(remote):
            with open(self.jsonl_path, "wb") as f:
                f.write(storage.read_bytes(remote))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(os.path.join(self.local, "tensorboard"))

    def write(self, iteration: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl_path, "a") as f:
            f.write(storage.json_text({"iteration": iteration, "time": round(time.time(), 3), **values}))
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, iteration)

    def flush(self) -> None:
        if not self.enabled:
            return
        self.tb.flush()
        if storage.is_s3(self.out):
            storage.upload_dir(self.local, self.out)

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self.tb.close()


def rounded(terms: dict) -> dict:
    return {k: round(float(v), 6) for k, v in terms.items()}


class BackboneFreeze(LoopHook):
    """The warm-up's first ``iterations``: the student's backbone frozen, then trained."""

    def __init__(self, model: nn.Module, iterations: int):
        self.model, self.iterations, self.frozen = model, iterations, False

    def before_step(self, iteration: int, batch: DualBatch) -> None:
        want_frozen = iteration < self.iterations
        if want_frozen != self.frozen:
            for p in backbone_parameters(self.model):
                p.requires_grad_(not want_frozen)
        self.frozen = want_frozen


class Metrics(LoopHook):
    """Rank 0, every ``interval`` iterations and at the end: the terms with the learning rate and throughput, to
    the metrics log and the orchestrator's ``report`` (Ray Train); ``last`` keeps the latest line."""

    def __init__(self, log: MetricsLog, report: Callable[[dict], None] | None, interval: int, span: tuple[int, int],
                 images_per_step: int, learning_rate: Callable[[], float]):
        self.log, self.report, self.interval = log, report, interval
        (self.start, self.end), self.images_per_step, self.learning_rate = span, images_per_step, learning_rate
        self.t0 = time.perf_counter()
        self.last: dict = {}
        self.logged_at = -1  # the iteration of ``last``

    def after_step(self, done: int, terms: dict) -> None:
        if done % self.interval and done != self.end:
            return
        elapsed = time.perf_counter() - self.t0
        values = rounded(terms)
        values.update(lr=self.learning_rate(), it_per_s=round((done - self.start) / elapsed, 4),
                      images_per_s=round((done - self.start) * self.images_per_step / elapsed, 3))
        self.log.write(done, values)
        if self.report is not None:
            self.report({"iteration": done, **values})
        self.last, self.logged_at = values, done


class Progress(LoopHook):
    """Rank 0: a progress bar on stderr with the latest total loss (off with SCALEKD_NO_PROGRESS=1)."""

    def __init__(self, stage: str, span: tuple[int, int], metrics: Metrics):
        from tqdm import tqdm

        self.metrics = metrics
        self.bar = tqdm(total=span[1], initial=span[0], desc=stage, unit="it", file=sys.stderr, mininterval=2.0,
                        dynamic_ncols=True, disable=os.environ.get("SCALEKD_NO_PROGRESS") == "1")

    def after_step(self, done: int, terms: dict) -> None:
        if self.metrics.logged_at == done:
            self.bar.set_postfix(loss=f"{self.metrics.last.get('loss/total', 0.0):.3f}")
        self.bar.update(1)

    def after_train(self) -> None:
        self.bar.close()


class Checkpoints(LoopHook):
    """Every ``interval`` iterations before the end (the end's checkpoint is the stage's own)."""

    def __init__(self, save: Callable[[int, dict], None], interval: int, end: int):
        self.save, self.interval, self.end = save, interval, end

    def after_step(self, done: int, terms: dict) -> None:
        if done % self.interval == 0 and done != self.end:
            self.save(done, rounded(terms))


class FaultInjection(LoopHook):
    """The tests' faults, named by environment variables read once here: a NaN image at one iteration (POISON_ENV)
    and, on the last rank, a worker that dies after one (FAULT_ENV), once per output (a marker file)."""

    def __init__(self, out: str, rank: int, last_rank: bool, poison_at: int, fault_at: int):
        self.out, self.rank, self.last_rank = out, rank, last_rank
        self.poison_at, self.fault_at = poison_at, fault_at

    @classmethod
    def from_environment(cls, out: str, rank: int, world: int) -> FaultInjection | None:
        poison_at, fault_at = (int(os.environ.get(name, "-1")) for name in (POISON_ENV, FAULT_ENV))
        if poison_at < 0 and fault_at < 0:
            return None
        return cls(out, rank, rank == world - 1, poison_at, fault_at)

    def before_step(self, iteration: int, batch: DualBatch) -> None:
        if iteration == self.poison_at:
            batch.student_images[0] = batch.student_images[0] * float("nan")
            if batch.teacher_images:
                batch.teacher_images[0] = batch.teacher_images[0] * float("nan")

    def after_step(self, done: int, terms: dict) -> None:
        marker = storage.join(self.out, ".fault-injected")
        if done == self.fault_at and self.last_rank and not storage.exists(marker):
            storage.write_text(marker, f"worker {self.rank} killed at iteration {done}\n")
            os._exit(17)

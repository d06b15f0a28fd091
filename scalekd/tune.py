"""Ray Tune over the loss weights alpha, beta, gamma (and the assistant's ``teacher_anchor``): each trial a short
distillation from the warm student, reporting a validation metric (AP_S by default) at each rung for ASHA to stop
weak trials.

Distillation losses can sit orders of magnitude above or below the detection loss on a new dataset;
this search is the documented answer (docs/method.md, "Loss scales"). ``teacher_anchor`` (not in the paper) is in the
space because whether it pays depends on the data (docs/results.md: it helps on KIT AIS cars and costs on the
synthetic set), so a user settles it on their own validation set; ``cross_head_weight`` (CrossKD's cross-head terms
beside ScaleKD's, not in the paper) is there too, as its best value differs between datasets (docs/results.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

from scalekd import search_record, storage
from scalekd.config import Config, ConfigError, replace

log = logging.getLogger(__name__)
# A trial whose worker dies (a lost node, a preempted pod) is restarted this often, from its last reported rung.
TRIAL_RETRIES = 2
TRIAL_DRIVER_MEMORY = 256 * 2**20  # bytes Ray reserves for a trial that drives Ray Train workers
WEIGHTS = ("alpha", "beta", "gamma")
# What a search may vary, and where each lives under ``distill``.
SEARCHABLE = {"alpha": ("alpha",), "beta": ("beta",), "gamma": ("gamma",), "teacher_anchor": ("csa", "teacher_anchor"),
              "cross_head_weight": ("cross_head_weight",)}


@dataclass(frozen=True)
class TuneSpace:
    """Log-uniform ranges (low, high) and finite choices (values sampled uniformly), per searchable name."""

    ranges: dict
    choices: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> TuneSpace:
        """``alpha=0.001:0.1`` is a log-uniform range, ``teacher_anchor=0|1|5`` a choice; comma-separated."""
        ranges, choices = {}, {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            name, _, bounds = item.partition("=")
            low, sep, high = bounds.partition(":")
            if name not in SEARCHABLE or not (sep or "|" in bounds):
                raise ConfigError(f"tune.space.{name or '?'}", item, "entries look like alpha=0.001:0.1 (log-uniform) "
                                  f"or teacher_anchor=0|5 (a choice), for {', '.join(SEARCHABLE)}")
            if name in ranges or name in choices:
                raise ConfigError(f"tune.space.{name}", item, "each name once")
            try:
                if sep:
                    ranges[name] = (float(low), float(high))
                else:
                    choices[name] = tuple(float(v) for v in bounds.split("|"))
            except ValueError:
                raise ConfigError(f"tune.space.{name}", bounds, "numbers: low:high, or a|b|c") from None
        space = cls(ranges, choices)
        space.validate()
        return space

    @classmethod
    def around_paper(cls, cfg: Config, factor: float = 4.0) -> TuneSpace:
        """Each weight from its paper value / factor to x factor."""
        return cls({n: (v / factor, v * factor) for n, v in zip(WEIGHTS, cfg.loss_weights())})

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.ranges, *self.choices)

    def validate(self, cfg: Config | None = None) -> None:
        """The space's own shape; with ``cfg``, also that every choice makes a valid config (e.g. no teacher anchor
        for the no-teacher control), so a bad search fails here, not in its trials."""
        if not self.names:
            raise ConfigError("tune.space", self.ranges, f"at least one of {', '.join(SEARCHABLE)}")
        for name, (low, high) in self.ranges.items():
            if not (low > 0 and high > low and math.isfinite(high)):
                raise ConfigError(f"tune.space.{name}", [low, high],
                                  "a log-uniform range needs 0 < low < high (finite)")
        for name, values in self.choices.items():
            if len(set(values)) < 2 or not all(math.isfinite(v) and v >= 0 for v in values):
                raise ConfigError(f"tune.space.{name}", list(values), "a choice of two or more finite values >= 0")
        if cfg is not None:
            for name, values in (*self.ranges.items(), *self.choices.items()):
                for value in values:  # a range's two ends, every choice
                    replace(cfg, distill=distill_overrides({name: value}))


def distill_overrides(params: dict) -> dict:
    """The ``distill`` section's overrides for the searched names among ``params`` (nested where they live)."""
    out: dict = {}
    for name, path in SEARCHABLE.items():
        if name in params and params[name] is not None:
            section = out
            for key in path[:-1]:
                section = section.setdefault(key, {})
            section[path[-1]] = params[name]
    return out


def rung_stops(cfg: Config, rungs: int) -> list[tuple[int, int]]:
    """Per rung: (the distill stage's iteration to stop at, the student's iterations done by then). The stage
    first runs the assistant alone (``csa.warmup_iterations``), so the rungs split the student's iterations that
    follow it: a rung inside the assistant's warm-up would score the unchanged warm student."""
    from scalekd.train.stage import stage_iterations

    student, assistant = stage_iterations(cfg, "distill")
    done = [max(1, student * rung // rungs) for rung in range(1, rungs + 1)]
    return [(assistant + d, d) for d in done]


def _trial(params: dict) -> None:
    """One trial: distil in rungs from the warm student, report validation metrics after each (and the node it
    ran on). A restarted trial (a lost node, a preempted pod, a resumed search) skips the rungs its record holds,
    and its stage resumes from its own last checkpoint."""
    import ray
    from ray import tune

    from scalekd.config import config_from_dict
    from scalekd.data.coco import dataset_from_root
    from scalekd.eval.evaluate import evaluate_model

    base, index = params["_base"], params["trial"]
    searched = base["plan"][index]
    cfg = replace(config_from_dict(base["config"]), distill=distill_overrides(searched))
    out = search_record.trial_out(base["out"], index)
    val = dataset_from_root(base["data"], cfg.data.val_split)
    node_id = ray.get_runtime_context().get_node_id()
    restored = len(search_record.rung_reports(out))
    attempt = _record_attempt(out, node_id)
    for rung, (stop, student_iterations) in enumerate(rung_stops(cfg, base["rungs"]), 1):
        if rung <= restored:
            continue
        _distil_to(cfg, base, out, stop)
        result = evaluate_model("trial", storage.join(out, "model.pt"), val, cfg, speed_images=1)
        report = {**result.metrics, "iteration": student_iterations, "node_id": node_id,
                  "restored_after_rung": restored, "attempts": attempt, **searched}
        search_record.record_rung(out, rung, report)
        tune.report(report)


def _distil_to(cfg: Config, base: dict, out: str, stop: int) -> None:
    """The trial's distillation up to iteration ``stop``: in this process, or with ``scaling.workers`` > 1 on that
    many Ray Train workers (a TorchTrainer inside the trial, as Ray documents Train within Tune)."""
    from scalekd.train.stage import StageRequest, run_stage

    request = StageRequest("distill", cfg.to_dict(), base["data"], out, teacher=base["teacher"],
                           student_init=base["student"], stop_at=stop)
    if cfg.scaling.workers > 1:
        from scalekd.train.ray_runner import run_with_ray_train

        run_with_ray_train(request, cfg)
    else:
        run_stage(request)


def _record_attempt(trial_out: str, node_id: str) -> int:
    """This run of a trial: 1, or 2 and on after it was restarted (a lost node, a preempted pod, a resumed
    search). Each run is recorded under the trial's folder (``attempts/N.json``: the node it ran on, when it
    started), so a search's results say which trials were restarted and where they ran."""
    folder = storage.join(trial_out, "attempts")
    attempt = sum(1 for uri in storage.list_uris(folder) if uri.endswith(".json")) + 1
    storage.write_json(storage.join(folder, f"{attempt}.json"), {"node_id": node_id, "started": time.time()})
    return attempt


@dataclass(frozen=True)
class TuneRequest:
    """A search, as plain data: what ``scalekd tune`` asks for, and what a Ray job on a cluster receives."""

    config: dict
    teacher: str
    student: str
    data: str
    out: str
    ranges: dict
    choices: dict
    trials: int = 8
    metric: str = "AP_S"
    rungs: int = 2
    cpus_per_trial: int = 1
    resume: bool = False


def run_tune(cfg: Config, teacher: str, student: str, data: str, out: str, space: TuneSpace, trials: int = 8,
             metric: str = "AP_S", rungs: int = 2, cpus_per_trial: int = 1, resume: bool = False) -> dict:
    """Run the search, or with ``resume`` continue the one under ``out``; writes results.json, results.md and
    best.yaml under ``out``. With ``scaling.ray_address`` the search runs as a Ray job on that cluster, its trials
    on the cluster's nodes. Each trial is one process of ``cpus_per_trial`` CPUs (and a GPU with ``scaling.gpu``),
    or with ``scaling.workers`` > 1 that many Ray Train workers of ``cpus_per_trial`` CPUs (and a GPU) each."""
    space.validate(cfg)
    for uri in (out, data, teacher, student):
        storage.is_s3(uri)  # a malformed URI is refused here, before Ray starts
    if trials < 1 or rungs < 1:
        raise ConfigError("tune.trials" if trials < 1 else "tune.rungs", trials if trials < 1 else rungs, ">= 1")
    if cpus_per_trial < 1:
        raise ConfigError("--cpus-per-trial", cpus_per_trial, ">= 1")
    if cfg.scaling.workers > 1:  # --cpus-per-trial: CPUs for each of a trial's training processes
        cfg = replace(cfg, scaling={"cpus_per_worker": cpus_per_trial})
    request = TuneRequest(cfg.to_dict(), teacher, student, data, out, dict(space.ranges), dict(space.choices),
                          trials, metric, rungs, cpus_per_trial, resume)
    if cfg.scaling.ray_address:
        return _search_on_cluster(request, cfg.scaling.ray_address)
    return _search(request, shared_storage=False)


def _search_on_cluster(request: TuneRequest, address: str) -> dict:
    """The search as a Ray job: every URI on S3 (the trials run on other machines), Tune's experiment beside the
    results in the bucket (Tune needs storage every node reaches)."""
    from scalekd.train.ray_runner import run_ray_job

    for flag, uri in (("--out", request.out), ("--data", request.data), ("--teacher", request.teacher),
                      ("--student", request.student)):
        if not storage.is_s3(uri):
            raise ConfigError(flag, uri, "an s3:// URI: on a cluster the trials run on other machines")
    search_record.start_or_resume(request, request.config["train"]["seed"])  # refusals here, before any job
    config = {**request.config, "scaling": {**request.config["scaling"], "ray_address": ""}}
    payload = {**request.__dict__, "config": config, "resume": True}  # the job continues the plan just read or made
    run_ray_job(address, "scalekd.tune", payload, "tune search", {"scalekd_stage": "tune", "out": request.out})
    results = json.loads(storage.read_text(storage.join(request.out, "results.json")))
    return _summary(results["trials"], request.metric, request.out, tuple(request.ranges) + tuple(request.choices))


def _search(request: TuneRequest, shared_storage: bool) -> dict:
    """The search in this Ray (a private local one, or the cluster's inside a Ray job). ``shared_storage``: Tune's
    experiment under ``out`` in S3, which every node reaches; else in a local folder. Resuming reads the search's
    own JSON record (``scalekd.search_record``), never Tune's pickled state."""
    import ray

    from scalekd.config import config_from_dict
    from scalekd.train.ray_runner import init_ray

    cfg, out, metric = config_from_dict(request.config), request.out, request.metric
    names = tuple(request.ranges) + tuple(request.choices)
    plan, new = search_record.plan_or_resume(request, cfg.train.seed)  # refusals before Ray starts
    init_ray()
    if not shared_storage:  # a private local Ray: a trial larger than this machine would wait forever
        _check_trial_fits(request.cpus_per_trial, cfg.scaling.gpu, ray.cluster_resources(), cfg.scaling.workers)
    if new:
        search_record.write_plan(request, plan)
    to_run = search_record.trials_to_run(out, plan, request.rungs)
    if request.resume:
        log.info("the search at %s: %d of %d trials to run", out, len(to_run), len(plan))
    grid = list(_run_trials(request, cfg, plan, to_run, shared_storage)) if to_run else []
    _mark_ended(grid, out)
    rows = search_record.result_rows(out, plan, metric)
    if not rows:
        errors = [str(r.error) for r in grid if r.error]
        raise RuntimeError(f"no tune trial reported {metric}; first error: {errors[0] if errors else 'none'}")
    best_cfg = replace(cfg, distill=distill_overrides(rows[0]))
    storage.write_text(storage.join(out, "best.yaml"), best_cfg.to_yaml())
    storage.write_json(storage.join(out, "results.json"), {"metric": metric, "trials": rows})
    storage.write_text(storage.join(out, "results.md"), results_table(rows, metric, names) + "\n")
    return _summary(rows, metric, out, names)


def _run_trials(request: TuneRequest, cfg: Config, plan: list[dict], to_run: list[int], shared_storage: bool):
    """Tune over the planned trials in ``to_run``: ASHA stops weak ones at a rung; a trial whose worker dies is
    restarted (``TRIAL_RETRIES``) and continues from its record. Departure from a single uninterrupted search:
    a resumed search's scheduler compares only the trials it runs, not those that ended before."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    # Trials run in their own working directory: hand them absolute local paths.
    base = {"config": request.config, "out": storage.absolute(request.out), "data": storage.absolute(request.data),
            "teacher": storage.absolute(request.teacher), "student": storage.absolute(request.student),
            "rungs": request.rungs, "plan": plan}
    workers = cfg.scaling.workers
    # With Ray Train workers the trial only drives them and evaluates: its workers hold the CPUs (and GPUs), and
    # the trial reserves memory alone (Ray refuses an empty request; a CPU would starve a machine the workers fill).
    trial_resources: dict[str, float] = ({"cpu": request.cpus_per_trial, "gpu": 1.0 if cfg.scaling.gpu else 0.0}
                                         if workers == 1 else {"memory": TRIAL_DRIVER_MEMORY})
    slots = int(ray.cluster_resources().get("CPU", 1)) // (request.cpus_per_trial * workers)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=request.rungs, grace_period=1, reduction_factor=2)
    storage_path, filesystem = _experiment_storage(request.out, shared_storage)
    tuner = tune.Tuner(
        tune.with_resources(_trial, trial_resources),
        param_space={"trial": tune.grid_search(to_run), "_base": base},
        tune_config=tune.TuneConfig(metric=request.metric, mode="max", scheduler=scheduler,
                                    max_concurrent_trials=max(1, slots)),
        # A new experiment per start: a resumed search never reads (unpickles) the one before.
        run_config=tune.RunConfig(name=f"scalekd-tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=storage_path,
                                  storage_filesystem=filesystem, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES)))
    return tuner.fit()


def _mark_ended(grid, out: str) -> None:
    """Trials that finished without error (every rung, or stopped early by ASHA) are not run again on resume."""
    for result in grid:
        if result.error is None and result.config:
            search_record.mark_ended(search_record.trial_out(out, result.config["trial"]))


def _summary(rows: list[dict], metric: str, out: str, names: tuple[str, ...]) -> dict:
    log.info("tune results:\n%s", results_table(rows, metric, names))
    best = rows[0]
    return {"best": {n: best[n] for n in names}, metric: best[metric], "trials": len(rows),
            "best_config": storage.join(out, "best.yaml"), "table": json.loads(json.dumps(rows))}


def _experiment_storage(out: str, shared: bool):
    """(storage path, pyarrow filesystem or None) of the search's Ray Tune experiment."""
    if shared:
        p = storage.S3Path.parse(out)
        return f"{p.bucket}/{storage.join(p.key, 'experiment').lstrip('/')}", storage.arrow_filesystem()
    if storage.is_s3(out):
        return os.path.join(storage.cache_dir(), "tune", out.replace("://", "_").replace("/", "_")), None
    return os.path.abspath(storage.join(out, "experiment")), None


def main(argv: list[str]) -> int:
    """Entry point of a search submitted as a Ray job: run it on this cluster, its state in the bucket."""
    import base64

    request = TuneRequest(**json.loads(base64.b64decode(argv[0])))
    _search(request, shared_storage=True)
    return 0


def _check_trial_fits(cpus: int, gpu: bool, have: dict, workers: int = 1) -> None:
    """``cpus`` (and a GPU with ``gpu``) for each of the trial's ``workers`` processes."""
    cpus_here, gpus_here = have.get("CPU", 0), have.get("GPU", 0)
    fits = f"a trial that fits this machine ({cpus_here:g} CPUs, {gpus_here:g} GPUs), or a Ray cluster (--ray-address)"
    if cpus * workers > cpus_here:
        raise ConfigError("--cpus-per-trial" if workers == 1 else "--workers", cpus if workers == 1 else workers,
                          f"{cpus} CPUs for each of {workers} workers: {fits}")
    if gpu and gpus_here < workers:
        raise ConfigError("--gpu", True, fits)


def results_table(rows: list[dict], metric: str, names: tuple[str, ...]) -> str:
    """Markdown: the searched values, the metric and AP (in %) and the student's iterations, per trial."""
    header = f"| {' | '.join(names)} | {metric} | AP | iterations |\n|{'---|' * (len(names) + 3)}\n"
    return header + "\n".join(
        f"| {' | '.join('-' if r[n] is None else f'{r[n]:.4g}' for n in names)} | {100 * r[metric]:.2f} | "
        f"{100 * (r['AP'] or 0):.2f} | {r['iteration']} |" for r in rows)


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))

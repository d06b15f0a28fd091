"""Ray Tune over the loss weights alpha, beta, gamma: each trial a short distillation from the warm
student, reporting a validation metric (AP_S by default) at each rung for ASHA to stop weak trials.

Distillation losses can sit orders of magnitude above or below the detection loss on a new dataset;
this search is the documented answer (DESIGN.md, "Loss scales").
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

from scalekd import storage
from scalekd.config import Config, ConfigError, replace

log = logging.getLogger(__name__)
WEIGHTS = ("alpha", "beta", "gamma")


@dataclass(frozen=True)
class TuneSpace:
    """Log-uniform ranges (low, high) per loss weight."""

    ranges: dict

    @classmethod
    def parse(cls, text: str) -> TuneSpace:
        ranges = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            name, _, bounds = item.partition("=")
            low, sep, high = bounds.partition(":")
            if name not in WEIGHTS or not sep:
                raise ConfigError(f"tune.space.{name or '?'}", item, "entries look like alpha=0.001:0.1 "
                                  f"for {', '.join(WEIGHTS)}")
            try:
                ranges[name] = (float(low), float(high))
            except ValueError:
                raise ConfigError(f"tune.space.{name}", bounds, "two numbers, low:high") from None
        space = cls(ranges)
        space.validate()
        return space

    @classmethod
    def around_paper(cls, cfg: Config, factor: float = 4.0) -> TuneSpace:
        """Each weight from its paper value / factor to x factor."""
        return cls({n: (v / factor, v * factor) for n, v in zip(WEIGHTS, cfg.loss_weights())})

    def validate(self) -> None:
        if not self.ranges:
            raise ConfigError("tune.space", self.ranges, "at least one of alpha, beta, gamma")
        for name, (low, high) in self.ranges.items():
            if not (low > 0 and high > low and math.isfinite(high)):
                raise ConfigError(f"tune.space.{name}", [low, high],
                                  "a log-uniform range needs 0 < low < high (finite)")


def rung_stops(cfg: Config, rungs: int) -> list[tuple[int, int]]:
    """Per rung: (the distill stage's iteration to stop at, the student's iterations done by then). The stage
    first runs the assistant alone (``csa.warmup_iterations``), so the rungs split the student's iterations that
    follow it: a rung inside the assistant's warm-up would score the unchanged warm student."""
    from scalekd.train.loop import stage_iterations

    student, assistant = stage_iterations(cfg, "distill")
    done = [max(1, student * rung // rungs) for rung in range(1, rungs + 1)]
    return [(assistant + d, d) for d in done]


def _trial(params: dict) -> None:
    """One trial: distill in rungs from the warm student, report validation metrics after each."""
    from ray import tune

    from scalekd.config import config_from_dict
    from scalekd.data.coco import dataset_from_root
    from scalekd.eval.evaluate import evaluate_model
    from scalekd.train.loop import StageRequest, run_stage

    base = params["_base"]
    cfg = replace(config_from_dict(base["config"]), distill={n: params[n] for n in WEIGHTS if n in params})
    out = storage.join(base["out"], "trials", tune.get_context().get_trial_id())
    val = dataset_from_root(base["data"], cfg.data.val_split)
    for stop, student_iterations in rung_stops(cfg, base["rungs"]):
        run_stage(StageRequest("distill", cfg.to_dict(), base["data"], out, teacher=base["teacher"],
                               student_init=base["student"], stop_at=stop))
        result = evaluate_model("trial", storage.join(out, "model.pt"), val, cfg, speed_images=1)
        tune.report({**result.metrics, "iteration": student_iterations,
                     **{n: params[n] for n in WEIGHTS if n in params}})


def run_tune(cfg: Config, teacher: str, student: str, data: str, out: str, space: TuneSpace, trials: int = 8,
             metric: str = "AP_S", rungs: int = 2, cpus_per_trial: int = 1) -> dict:
    """Run (or resume) the search; writes results.json, results.md and best.yaml under ``out``."""
    space.validate()
    if trials < 1 or rungs < 1:
        raise ConfigError("tune.trials" if trials < 1 else "tune.rungs", trials if trials < 1 else rungs, ">= 1")
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from scalekd.train.ray_runner import init_ray

    init_ray()
    experiment_dir = (os.path.join(storage.cache_dir(), "tune", out.replace("://", "_").replace("/", "_"))
                      if storage.is_s3(out) else os.path.abspath(storage.join(out, "experiment")))
    name = "scalekd-tune"
    # Trials run in their own working directory: hand them absolute local paths.
    base = {"config": cfg.to_dict(), "out": storage.absolute(out), "data": storage.absolute(data),
            "teacher": storage.absolute(teacher), "student": storage.absolute(student), "rungs": rungs}
    trainable = tune.with_resources(_trial, {"cpu": cpus_per_trial})
    path = os.path.join(experiment_dir, name)
    if tune.Tuner.can_restore(path):
        log.info("resuming the search in %s", path)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        param_space = {n: tune.loguniform(lo, hi) for n, (lo, hi) in space.ranges.items()}
        param_space["_base"] = base
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=rungs, grace_period=1, reduction_factor=2)
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=trials, scheduler=scheduler,
                                        max_concurrent_trials=max(1, (os.cpu_count() or 1) // cpus_per_trial)),
            run_config=tune.RunConfig(name=name, storage_path=experiment_dir, verbose=0))
    grid = tuner.fit()
    rows = []
    for result in grid:
        if result.metrics and metric in result.metrics:
            rows.append({**{n: result.metrics.get(n) for n in WEIGHTS}, metric: result.metrics[metric],
                         "AP": result.metrics.get("AP"), "iteration": result.metrics.get("iteration"),
                         "path": result.path})
    if not rows:
        errors = [str(r.error) for r in grid if r.error]
        raise RuntimeError(f"no tune trial reported {metric}; first error: {errors[0] if errors else 'none'}")
    rows.sort(key=lambda r: r[metric], reverse=True)
    best = rows[0]
    best_cfg = replace(cfg, distill={n: best[n] for n in WEIGHTS if best.get(n) is not None})
    storage.write_text(storage.join(out, "best.yaml"), best_cfg.to_yaml())
    storage.write_json(storage.join(out, "results.json"), {"metric": metric, "trials": rows})
    header = f"| alpha | beta | gamma | {metric} | AP | iterations |\n|---|---|---|---|---|---|\n"
    table = header + "\n".join(
        f"| {r['alpha']:.4g} | {r['beta']:.4g} | {r['gamma']:.4g} | {100 * r[metric]:.2f} | "
        f"{100 * (r['AP'] or 0):.2f} | {r['iteration']} |" for r in rows)
    storage.write_text(storage.join(out, "results.md"), table + "\n")
    log.info("tune results:\n%s", table)
    return {"best": {n: best[n] for n in WEIGHTS}, metric: best[metric], "trials": len(rows),
            "best_config": storage.join(out, "best.yaml"), "table": json.loads(json.dumps(rows))}

"""A tune search's own record, in JSON beside its results: the planned trials and every rung each trial reported.

Resuming a search reads this record and nothing of Ray Tune's experiment state, which Ray restores by unpickling
(``tuner.pkl``: code from whoever could write the folder or the bucket). So a search resumes from any machine that
reaches its ``--out``, local or ``s3://``, and resuming never runs code found there (docs/security.md).

Layout under the search's ``out``::

    search.json                        what was asked (identity) and each trial's parameters, drawn once
    trials/trial-NNN/rungs/R.json      rung R's report: the metrics, the parameters, the node it ran on
    trials/trial-NNN/ended.json        the trial ended (all rungs, or stopped early by the scheduler)
    trials/trial-NNN/...               the trial's distillation stage (its checkpoints: a restart resumes them)
"""

from __future__ import annotations

import json
import math
import random
import time

from scalekd import storage
from scalekd.config import ConfigError

SEARCH_FILE = "search.json"
RECORD_VERSION = 1


def plan_trials(ranges: dict, choices: dict, trials: int, seed: int) -> list[dict]:
    """Each trial's parameters, drawn once from the space (log-uniform ranges, uniform choices) with ``seed``, so
    the plan, and not Tune's sampler state, is what a resumed search continues."""
    rng = random.Random(seed)
    plan = []
    for _ in range(trials):
        params = {n: math.exp(rng.uniform(math.log(lo), math.log(hi))) for n, (lo, hi) in ranges.items()}
        params.update({n: rng.choice(list(values)) for n, values in choices.items()})
        plan.append(params)
    return plan


def search_identity(request) -> dict:
    """What makes two searches the same one: the recipe (less where it runs: ``scaling``, ``storage``), the
    inputs, the space, the trial count, the metric and the rungs."""
    config = {k: v for k, v in request.config.items() if k not in ("scaling", "storage")}
    return {"config": config, "data": request.data, "teacher": request.teacher, "student": request.student,
            "ranges": {n: list(v) for n, v in request.ranges.items()},
            "choices": {n: list(v) for n, v in request.choices.items()},
            "trials": request.trials, "metric": request.metric, "rungs": request.rungs}


def start_or_resume(request, seed: int) -> list[dict]:
    """The search's plan, written to ``out`` when new (``plan_or_resume`` then ``write_plan``)."""
    plan, new = plan_or_resume(request, seed)
    if new:
        write_plan(request, plan)
    return plan


def write_plan(request, plan: list[dict]) -> None:
    storage.write_json(storage.join(request.out, SEARCH_FILE),
                       {"version": RECORD_VERSION, "identity": search_identity(request), "trials": plan})


def plan_or_resume(request, seed: int) -> tuple[list[dict], bool]:
    """(the search's plan, whether it is new), writing nothing: a new plan (refused where ``out`` holds a search
    and ``resume`` is not asked), or the stored one when resuming the same search (refused, naming what differs,
    when it is not)."""
    uri = storage.join(request.out, SEARCH_FILE)
    found = storage.exists(uri)
    if not request.resume:
        if found:
            raise ConfigError("--out", request.out, f"already holds a search ({uri}); pass --resume to continue "
                              "it, or choose a new --out")
        return plan_trials(request.ranges, request.choices, request.trials, seed), True
    if not found:
        raise ConfigError("--resume", request.out, f"there is no search to resume at {uri}")
    stored = _read_record(uri)
    wanted = json.loads(json.dumps(search_identity(request)))  # tuples as lists, as stored
    differ = [k for k in wanted if stored["identity"].get(k) != wanted[k]]
    if differ:
        raise ConfigError("--resume", request.out, f"the search there differs in {', '.join(differ)}; resume it "
                          "with the same settings, or start a new search at another --out")
    return stored["trials"], False


def _read_record(uri: str) -> dict:
    try:
        record = json.loads(storage.read_text(uri))
        if record.get("version") != RECORD_VERSION or not isinstance(record.get("identity"), dict):
            raise ValueError(f"version {record.get('version')!r}")
        names = set(record["identity"]["ranges"]) | set(record["identity"]["choices"])
        if len(record["trials"]) != record["identity"]["trials"]:
            raise ValueError(f"{len(record['trials'])} trials planned for {record['identity']['trials']}")
        for i, params in enumerate(record["trials"]):
            if set(params) != names or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                                               for v in params.values()):
                raise ValueError(f"trials[{i}] is not a value >= 0 for each of {sorted(names)}")
        return record
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise ConfigError("--resume", uri, f"not a search record this version reads ({exc})") from None


def trial_out(out: str, index: int) -> str:
    return storage.join(out, "trials", f"trial-{index:03d}")


def record_rung(trial: str, rung: int, report: dict) -> None:
    storage.write_json(storage.join(trial, "rungs", f"{rung}.json"), report)


def rung_reports(trial: str) -> list[dict]:
    """The rungs a trial reported, in order (1, 2, ... with no gap)."""
    reports: list[dict] = []
    while storage.exists(uri := storage.join(trial, "rungs", f"{len(reports) + 1}.json")):
        reports.append(json.loads(storage.read_text(uri)))
    return reports


def mark_ended(trial: str) -> None:
    storage.write_json(storage.join(trial, "ended.json"), {"ended": time.time()})


def trials_to_run(out: str, plan: list[dict], rungs: int) -> list[int]:
    """Trials not yet ended: never started, cut short by a lost search, or failed."""
    return [i for i in range(len(plan)) if not storage.exists(storage.join(trial_out(out, i), "ended.json"))
            and len(rung_reports(trial_out(out, i))) < rungs]


def result_rows(out: str, plan: list[dict], metric: str) -> list[dict]:
    """One row per trial that reported ``metric`` (its last rung), best first."""
    rows = []
    for index in range(len(plan)):
        reports = rung_reports(trial_out(out, index))
        if reports and metric in reports[-1]:
            rows.append({**reports[-1], "trial": index, "path": trial_out(out, index)})
    return sorted(rows, key=lambda r: r[metric], reverse=True)
